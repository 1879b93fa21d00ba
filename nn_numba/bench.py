"""`nn-numba bench`: how fast the Numba kernels train, next to NumPy/BLAS doing the same job.

Every measurement runs in a child process whose environment fits it: the Numba side with
OPENBLAS_NUM_THREADS=1 (spinning OpenBLAS workers slow parallel Numba kernels tenfold), the NumPy side
with OPENBLAS_NUM_THREADS=T, one pair of children per thread count. The parent only sends requests and
alternates A and B, so the two sides see the same machine state; it imports neither numpy nor numba.
Data are MNIST's training images when they are on this machine (`--data mnist`, the default): speed
does depend on the pixels, because the first layer skips the 81 % of them that are 0. `--data random`
(uniform pixels, none 0) times the dense path. The network is 784-250-250-10, float32, softmax
cross-entropy with mean loss, plain SGD. Beside each epoch: its share of the time the GEMM rate needs for
the dense FLOPs and for the FLOPs it actually performs (`actual_flop`); per thread count the vector width
the kernels use, and the default recipe's epoch beside the same epoch without augmentation (`recipe`).
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import NNError

SIZES = [784, 250, 250, 10]
N_TRAIN = 60_000
_PRODUCTS = [SIZES[l] * SIZES[l + 1] for l in range(len(SIZES) - 1)]  # multiply-adds per sample and layer
# One training step, per sample: forward and weight gradient of every layer, input gradient of every layer
# but the first (nothing needs the gradient at the pixels); 2 FLOP per multiply-add.
FLOP_PER_SAMPLE = 2 * (2 * sum(_PRODUCTS) + sum(_PRODUCTS[1:]))
# The FLOPs a step on real data performs: the first layer's forward and weight-gradient products skip the
# zero pixels, so per sample they cost 2 multiply-adds per lit pixel and output; the other layers are dense.
DENSE_FLOP_AFTER_FIRST = 2 * 3 * sum(_PRODUCTS[1:])
INFER_FLOP = 2 * sum(_PRODUCTS)
LR = 0.01
CPP = Path(__file__).resolve().parent.parent / "cpp" / "build" / "nn-cpp"


# ---------------------------------------------------------------------------------------------------
# Child side: one process per (implementation, thread count), answering JSON requests line by line.


def _best(fn, reps: int, min_time: float = 0.02) -> float:
    """Seconds per call of fn(): calls are batched to >= min_time, the fastest of `reps` batches."""
    fn()
    n, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= min_time:
            break
        n *= 2
    times = [t / n]
    for _ in range(reps - 1):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return min(times)



def timed_passes(rng, B: int, samples: int, reps: int, warmup: int, step) -> dict:
    """Seconds of each of `reps` shuffled passes of `samples` samples in mini-batches of B, after `warmup`
    untimed ones; step(idx) trains on one mini-batch and returns its summed loss. Both sides use this."""
    times, loss = [], 0.0
    for r in range(warmup + reps):
        t0 = time.perf_counter()
        order = rng.permutation(N_TRAIN)[:samples]
        total = 0.0
        for i in range(0, samples, B):
            total += step(order[i:i + B])
        if r >= warmup:
            times.append(time.perf_counter() - t0)
        loss = total / samples
    return {"times": times, "loss": loss}


def actual_flop(X_u8) -> float:
    """FLOPs of one training pass over the images X_u8 (n, 784), counting the first layer's forward and
    weight-gradient multiply-adds over lit pixels only (what the sparse kernels compute) and every other
    product dense. All pixels lit gives FLOP_PER_SAMPLE per image."""
    import numpy as np

    return float(2 * 2 * SIZES[1] * np.count_nonzero(X_u8) + len(X_u8) * DENSE_FLOP_AFTER_FIRST)


def load_data(data: str):
    """(uint8 images (60000, 784), int64 labels, description): MNIST's training set, found where `nn-numba
    train` finds it but never downloaded here, or random pixels and labels (`data` "random", or MNIST is
    missing: the description says so)."""
    import numpy as np

    why = ""
    if data == "mnist":
        from .data import load_mnist
        from .errors import NNError

        try:
            m = load_mnist(download_ok=False)
            nz = float(np.count_nonzero(m.train_x[:6000])) / m.train_x[:6000].size
            return m.train_x, m.train_y.astype(np.int64), f"MNIST training images ({100 * nz:.0f} % of pixels non-zero)"
        except NNError as e:
            why = f" (MNIST not found: {str(e).split(';')[0]})"
    rng = np.random.default_rng(0)
    X = rng.integers(1, 256, (N_TRAIN, SIZES[0]), dtype=np.uint8)
    return X, rng.integers(0, SIZES[-1], N_TRAIN).astype(np.int64), "random (uniform pixels, none 0)" + why


class NumbaSide:
    """The project's kernels, as `nn-numba train` runs them."""

    def __init__(self, threads: int, data: str):
        import numba
        import numpy as np

        from . import kernels as K

        numba.set_num_threads(threads)
        self.np, self.K, self.numba = np, K, numba
        self.X, self.y, self.data = load_data(data)
        self.rng = np.random.default_rng(0)
        self.sessions = {}

    def info(self) -> dict:
        self.kernels(64, 1)  # a parallel kernel must have run before the threading layer is known
        from . import simd
        from .data import resolve_data_dir

        mnist = self.data.startswith("MNIST")  # the C++ epoch then trains on the same files
        return {"numba": self.numba.__version__, "threading_layer": self.numba.threading_layer(),
                "numba_threads": self.numba.get_num_threads(), "data": self.data,
                "data_dir": str(resolve_data_dir()[0]) if mnist else None,
                "vector_lanes": simd.W, "host_lanes": simd.host_lanes(),
                "actual_flop_per_epoch": actual_flop(self.X[:N_TRAIN])}

    def _model(self):
        from .model import MLP

        np = self.np
        return MLP.init(SIZES, np.random.default_rng(0))

    def epoch(self, B: int, samples: int, reps: int, warmup: int = 0) -> dict:
        """Seconds per `samples`-sample pass at batch B, SGD with mean loss; the fastest of `reps`.

        The loop `nn-numba train` runs without augmentation: per mini-batch one Trainer.gather and one
        Trainer.train_step (its buffers).
        """
        from .config import from_dict
        from .trainer import Trainer

        tr = Trainer(from_dict({"optim": {"name": "sgd", "lr": LR, "reduction": "mean"}}), self._model(), B)

        def step(idx):
            return tr.train_step(tr.gather(self.X, idx), self.y[idx], LR, listed=True)

        return timed_passes(self.rng, B, samples, reps, warmup, step)

    def recipe(self, augment: bool, reps: int, warmup: int = 0) -> dict:
        """Seconds of each of `reps` epochs of the default recipe (configs/default.toml: augmentation, Adam
        on the mean loss, its batch size and training images), or of the same recipe with augmentation off, through
        train.run_epoch, the loop `nn-numba train` runs; `warmup` untimed tails of 20 mini-batches first.
        One session per kind for the worker's life, its run folder in a temporary folder."""
        from types import SimpleNamespace

        from .train import run_epoch

        s = self._session(augment)
        times = []
        for r in range(warmup + reps):
            s.progress.batch = s.steps_per_epoch - 20 if r < warmup else 0
            seconds, n = run_epoch(s, SimpleNamespace(hit=False))
            s.progress.epoch += 1
            if r >= warmup:
                times.append(seconds)
        return {"times": times, "samples": len(s.tr_idx), "batch": s.cfg.train.batch_size}

    def _session(self, augment: bool):
        from .config import load_config, with_values
        from .train import Session

        if augment not in self.sessions:
            out = tempfile.mkdtemp(prefix="nn-numba-bench-")
            atexit.register(shutil.rmtree, out, True)
            off = {} if augment else {f"augment.{k}": 0 for k in ("shift", "rotate", "scale", "elastic_alpha")}
            cfg = with_values(load_config("default"), {**off, "train.out": out})
            self.sessions[augment] = Session(cfg, None, None, True, "recipe")
        return self.sessions[augment]

    def kernels(self, B: int, reps: int) -> dict:
        """Seconds per call of every kernel of one training step at batch B."""
        from .optim import plain

        np, K = self.np, self.K
        model = self._model()
        rng = np.random.default_rng(1)
        (W1, b1), (W2, b2), (W3, b3) = (model.layer(l) for l in range(3))
        az = K.aligned_zeros  # the trainer's buffers are 64-byte aligned too (docs/performance.md)
        X = az((B, SIZES[0]))
        X[:] = K.PIXEL[self.X[:B]]
        A1, A2, dA1, dA2 = (az((B, K.pad(250)))[:, :250] for _ in range(4))  # rows padded, as the trainer's
        Z, dZ = az((B, 10)), az((B, 10))
        loss, pred = np.zeros(B, np.float32), np.zeros(B, np.int64)
        y = self.y[:B]
        G = az(model.params.shape)
        out = {}
        K.linear_forward(X, W1, b1, A1, True)
        K.linear_forward(A1, W2, b2, A2, True)
        K.linear_forward(A2, W3, b3, Z, False)
        K.softmax_xent(Z, y, dZ, loss, pred, 1.0 / B)
        dA2[:] = rng.standard_normal((B, 250), dtype=np.float32) * np.float32(1e-3)

        def dw(l, A, dY, kind):
            W, b = model.layer(l)
            gW, gb = K.layer_views(G, model.sizes_arr, l)
            m, v, work = az(W.shape), az(b.shape), az(K.work_size(W.shape[0], B))
            return lambda: K.linear_backward_weight(dY, A, work, K.Param(W, gW, m, m), K.Param(b, gb, v, v),
                                                    plain(kind, 1e-9))

        # the first layer as train_step runs it on sparse inputs: transposed weights, X's non-zeros
        WT, GT, WT2 = az((SIZES[0], K.pad(250))), az((SIZES[0], K.pad(250))), az((250, K.pad(250)))
        WT[:, :250] = W1.T
        nz = K.nonzeros_bufs(B, SIZES[0])
        cnt, cols, vals = nz.count, nz.cols, nz.vals
        K.nonzeros(X, cnt, cols, vals)
        K.nonzero_blocks(X, nz.block_count, nz.block_vals, nz.block_bands)

        def sparse_dw(kind):
            gb = np.zeros_like(b1)
            return lambda: K.sparse_backward_weight(nz, dA1, K.Param(WT, GT, GT, GT), K.Param(b1, gb, gb, gb),
                                                    plain(kind, 1e-9))

        calls = {
            "nonzeros rows + blocks": lambda: (K.nonzeros(X, cnt, cols, vals),
                                               K.nonzero_blocks(X, nz.block_count, nz.block_vals, nz.block_bands)),
            "fwd1 sparse +bias+relu": lambda: K.sparse_forward(cnt, cols, vals, WT, b1, A1, True),
            "dW1 sparse + db1 + sgd": sparse_dw(K.SGD),
            "fwd1 lin+bias+relu": lambda: K.linear_forward(X, W1, b1, A1, True),
            "fwd2 lin+bias+relu": lambda: K.linear_forward(A1, W2, b2, A2, True),
            "fwd2 training's, Wᵀ made": lambda: K.linear_forward_t(A1, W2, WT2, b2, A2, True),
            "fwd3 lin+bias": lambda: K.linear_forward(A2, W3, b3, Z, False),
            "softmax-xent+grad": lambda: K.softmax_xent(Z, y, dZ, loss, pred, 1.0 / B),
            "bwd dA2 = dZ3 W3 * mask": lambda: K.linear_backward_input(dZ, W3, A2, dA2),
            "bwd dA1 = dZ2 W2 * mask": lambda: K.linear_backward_input(dA2, W2, A1, dA1),
            "dW3 + db3": dw(2, A2, dZ, K.NO_UPDATE),
            "dW2 + db2": dw(1, A1, dA2, K.NO_UPDATE),
            "dW1 + db1": dw(0, X, dA1, K.NO_UPDATE),
            "dW1 + db1 + sgd fused": dw(0, X, dA1, K.SGD),
            "sgd update (all params)": lambda: K.update(K.Param(model.params, G, G, G), plain(K.SGD, 1e-9)),
        }
        for name, fn in calls.items():
            out[name] = _best(fn, reps)
        return out

    def infer(self, reps: int) -> dict:
        K = self.K
        model = self._model()
        X = K.PIXEL[self.X[:10_000]]
        x1 = X[:1]
        # what predict, serve and the Python API call: MLP.logits, 1000 rows at a time
        t1000 = _best(lambda: model.logits(X, 1000), reps, 0.1)
        t1 = _best(lambda: model.logits(x1), reps)
        return {"batch1000_s_per_10k": t1000, "batch1_s": t1}


class NumpySide:
    """The reference: the same network trained by hand in NumPy, every product a BLAS call."""

    def __init__(self, threads: int, data: str):
        import numpy as np

        self.np = np
        X, self.y, _ = load_data(data)
        # float32 pixels ready in memory: NumPy's most favourable start (the Numba side gathers from uint8)
        self.X = X.astype(np.float32) / np.float32(255)
        self.rng = np.random.default_rng(0)

    def info(self) -> dict:
        np = self.np
        try:
            from threadpoolctl import threadpool_info

            blas = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                    for d in threadpool_info() if d.get("user_api") == "blas"]
        except ImportError:
            cfg = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
            blas = [{k: cfg.get(k) for k in ("name", "version", "openblas configuration")}]
        return {"numpy": np.__version__, "blas": blas, "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE")}

    def params(self):
        np = self.np
        rng = np.random.default_rng(0)
        ps = []
        for l in range(len(SIZES) - 1):
            W = rng.standard_normal((SIZES[l + 1], SIZES[l]), dtype=np.float32) * np.float32(np.sqrt(2 / SIZES[l]))
            ps += [W, np.zeros(SIZES[l + 1], np.float32)]
        return ps

    def step(self, x, y, ps, lr):
        """One SGD step, mean loss; W stored (out, in) as in the Numba model, so Z = X Wᵀ + b."""
        np = self.np
        W1, b1, W2, b2, W3, b3 = ps
        B = x.shape[0]
        rows = np.arange(B)
        a1 = x @ W1.T
        a1 += b1
        np.maximum(a1, 0, out=a1)
        a2 = a1 @ W2.T
        a2 += b2
        np.maximum(a2, 0, out=a2)
        z = a2 @ W3.T
        z += b3
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        loss = float(np.mean(np.log(s[:, 0]) - z[rows, y]))
        g3 = e / s
        g3[rows, y] -= 1
        g3 *= np.float32(1 / B)
        d2 = g3 @ W3
        d2 *= a2 > 0
        d1 = d2 @ W2
        d1 *= a1 > 0
        for p, g in zip(ps, (d1.T @ x, d1.sum(0), d2.T @ a1, d2.sum(0), g3.T @ a2, g3.sum(0))):
            p -= lr * g
        return loss

    def epoch(self, B: int, samples: int, reps: int, warmup: int = 0) -> dict:
        ps = self.params()
        return timed_passes(self.rng, B, samples, reps, warmup,
                            lambda idx: self.step(self.X[idx], self.y[idx], ps, LR) * len(idx))

    def kernels(self, B: int, reps: int) -> dict:
        np = self.np
        W1, b1, W2, b2, W3, b3 = self.params()
        x, y = self.X[:B], self.y[:B]
        A1 = np.maximum(x @ W1.T + b1, 0)
        A2 = np.maximum(A1 @ W2.T + b2, 0)
        Z = A2 @ W3.T + b3
        rng = np.random.default_rng(1)
        dZ = rng.standard_normal((B, 10), dtype=np.float32) * np.float32(1e-3)
        dA = rng.standard_normal((B, 250), dtype=np.float32) * np.float32(1e-3)
        rows = np.arange(B)
        P = np.concatenate([p.ravel() for p in self.params()])
        Gf = np.zeros_like(P)

        def fwd(a, W, b, relu):
            out = a @ W.T
            out += b
            return np.maximum(out, 0, out=out) if relu else out

        def softmax():
            z = Z - Z.max(axis=1, keepdims=True)
            e = np.exp(z)
            s = e.sum(axis=1, keepdims=True)
            loss = np.log(s[:, 0]) - z[rows, y]
            g = e / s
            g[rows, y] -= 1
            g *= np.float32(1 / B)
            return loss, g

        def sgd_fused():
            gW = dA.T @ x
            gb = dA.sum(0)
            W1.__isub__(np.float32(1e-9) * gW)
            b1.__isub__(np.float32(1e-9) * gb)

        calls = {
            "nonzeros rows + blocks": lambda: (np.nonzero(x), np.nonzero(x.T)),
            "fwd1 sparse +bias+relu": lambda: fwd(x, W1, b1, True),
            "dW1 sparse + db1 + sgd": sgd_fused,
            "fwd1 lin+bias+relu": lambda: fwd(x, W1, b1, True),
            "fwd2 lin+bias+relu": lambda: fwd(A1, W2, b2, True),
            "fwd2 training's, Wᵀ made": lambda: fwd(A1, W2, b2, True),
            "fwd3 lin+bias": lambda: fwd(A2, W3, b3, False),
            "softmax-xent+grad": softmax,
            "bwd dA2 = dZ3 W3 * mask": lambda: (dZ @ W3) * (A2 > 0),
            "bwd dA1 = dZ2 W2 * mask": lambda: (dA @ W2) * (A1 > 0),
            "dW3 + db3": lambda: (dZ.T @ A2, dZ.sum(0)),
            "dW2 + db2": lambda: (dA.T @ A1, dA.sum(0)),
            "dW1 + db1": lambda: (dA.T @ x, dA.sum(0)),
            "dW1 + db1 + sgd fused": sgd_fused,
            "sgd update (all params)": lambda: P.__isub__(np.float32(1e-9) * Gf),
        }
        return {name: _best(fn, reps) for name, fn in calls.items()}

    def gemm(self, reps: int) -> dict:
        np = self.np
        a = self.rng.random((2048, 2048), dtype=np.float32)
        b = self.rng.random((2048, 2048), dtype=np.float32)
        c = np.empty_like(a)
        t = _best(lambda: np.matmul(a, b, out=c), reps, 0.05)
        return {"gflops": 2 * 2048**3 / t / 1e9}

    def infer(self, reps: int) -> dict:
        np = self.np
        W1, b1, W2, b2, W3, b3 = self.params()
        X = self.X[:10_000]

        def fwd(x):
            a = np.maximum(x @ W1.T + b1, 0)
            a = np.maximum(a @ W2.T + b2, 0)
            return a @ W3.T + b3

        def batch1000():
            for i in range(0, 10_000, 1000):
                fwd(X[i:i + 1000])

        x1 = X[:1]
        return {"batch1000_s_per_10k": _best(batch1000, reps, 0.1), "batch1_s": _best(lambda: fwd(x1), reps)}


def worker(kind: str, threads: int, data: str) -> None:
    """Serve JSON requests {"op": name, ...args} from stdin, one JSON answer per line on stdout."""
    out = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr  # nothing else may write into the answer channel
    side = (NumbaSide if kind == "numba" else NumpySide)(threads, data)
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        try:
            ans = getattr(side, op)(**req)
        except Exception as e:  # reported to the parent, which turns it into an NNError
            ans = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(ans) + "\n")
        out.flush()


# ---------------------------------------------------------------------------------------------------
# Parent side.


class Child:
    def __init__(self, kind: str, threads: int, data: str):
        env = dict(os.environ)
        env["OPENBLAS_NUM_THREADS"] = "1" if kind == "numba" else str(threads)
        env["OMP_NUM_THREADS"] = str(threads)
        self.kind, self.threads, self.data = kind, threads, data
        self.p = subprocess.Popen([sys.executable, "-m", "nn_numba.bench", "--worker", kind, str(threads), data],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                  cwd=Path(__file__).resolve().parent.parent)

    def ask(self, op: str, **args) -> dict:
        self.p.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise NNError(f"bench: the {self.kind} worker ({self.threads} threads) died; run "
                          f"`python -m nn_numba.bench --worker {self.kind} {self.threads} {self.data}` to see why")
        ans = json.loads(line)
        if "error" in ans:
            raise NNError(f"bench: {self.kind} worker, {op}: {ans['error']}")
        if self.kind == "numpy" and self.threads > 1:
            time.sleep(0.2)  # let OpenBLAS's spinning workers fall asleep before the other side runs
        return ans

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=30)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "date": time.strftime("%Y-%m-%d %H:%M")}


_JIT_PROBE = """
import time; t0 = time.perf_counter()
import numpy as np
from nn_numba import kernels as K
from nn_numba.model import MLP
t1 = time.perf_counter()
from nn_numba.config import load_config
from nn_numba.trainer import Trainer
from nn_numba import precompile
from nn_numba.train import warm_plan, warm_step
cfg = load_config("default")  # as `train configs/default.toml` starts: Adam, augmentation, its batch size
B = cfg.train.batch_size
m = MLP.init(cfg.model.sizes, np.random.default_rng(0))
with precompile.start(warm_plan(cfg)) as job:  # its kernels compiled in parallel processes
    job.join()
tr = Trainer(cfg, m, B)
X = np.zeros((2 * B, 784), np.uint8); y = np.zeros(2 * B, np.int64); idx = np.arange(B)
warm_step(tr, cfg, X, y, idx)
tr.train_step(tr.augment(X, idx, cfg.augment, 0, 0, 0), y[:B], 1e-3, listed=True)
m.logits(tr.xb)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def jit_cost(cold: bool) -> dict:
    """Process start to the default recipe's first trained step (as `train configs/default.toml` gets
    there) and one inference: compiling into an empty cache, then from it."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="nn-numba-jit-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, OPENBLAS_NUM_THREADS="1")
        for name in (["cold", "warm"] if cold else ["warm0", "warm"]):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", _JIT_PROBE], env=env, capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parent.parent)
            wall = time.perf_counter() - t0
            if r.returncode:
                raise NNError(f"bench: the JIT probe failed: {r.stderr.strip().splitlines()[-1:]}")
            imp, first = map(float, r.stdout.split())
            out[name] = {"process_s": wall, "import_s": imp, "first_step_s": first}
    out.pop("warm0", None)
    return out


def cpp_epoch(B: int, threads: int, timeout: float, data_dir: str | None = None) -> dict | None:
    """One timed epoch of the C++ port (`nn-cpp bench`, SGD, mean loss) on MNIST's training images in
    data_dir (random pixels without it), if it has been built: the Numba column's data and optimiser."""
    if not CPP.exists():
        return None
    cmd = [str(CPP), "bench", "--batch-size", str(B), "--threads", str(threads), "--epochs", "1", "--optimizer", "sgd",
           "--json"] + (["--data-dir", data_dir] if data_dir else [])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        return {"seconds_per_epoch": d["seconds_per_epoch"], "samples_per_s": d["samples_per_s"],
                "optimizer": d.get("optimizer"), "data": d.get("data"), "loss": d.get("loss")}
    except subprocess.TimeoutExpired:
        return {"seconds_per_epoch": None, "note": f"timed out after {timeout:.0f} s"}
    except (OSError, ValueError, KeyError, IndexError) as e:
        return {"seconds_per_epoch": None, "note": f"failed: {e}"}


def _cpp_row(passes: list[dict | None], numba_s: float) -> dict | None:
    """The C++ column of an epoch row: its fastest pass, median and ratio to the Numba epoch."""
    if not passes or passes[0] is None:
        return None
    ok = [p for p in passes if p.get("seconds_per_epoch") is not None]
    if not ok:
        return passes[-1]
    times = [p["seconds_per_epoch"] for p in ok]
    return {**ok[-1], "seconds_per_epoch": min(times), "median_s": statistics.median(times),
            "samples_per_s": N_TRAIN / min(times), "passes": len(ok), "ratio": min(times) / numba_s}


# C901: the measurement phases one after the other, in the order of the report
def run(threads: list[int], batches: list[int], quick: bool = False, kernel_batch: int = 256,  # noqa: C901
        cpp: bool = True, progress=None, data: str = "mnist", passes: int | None = None) -> dict:
    """All measurements; returns the report dict (see docs/performance.md for the keys). `passes`: timed
    epoch passes per side and batch size (default 3, 2 with `quick`)."""
    say = progress or (lambda s: None)
    samples, reps = (12_000, 2) if quick else (N_TRAIN, 3)
    reps = passes or reps
    res = {"machine": machine(), "data": data,
           "network": "-".join(map(str, SIZES)), "flop_per_sample": FLOP_PER_SAMPLE,
           "epoch_samples": N_TRAIN, "measured_samples": samples, "reps": reps, "threads": {}}
    kids: dict[int, tuple[Child, Child]] = {}
    try:
        for T in threads:
            say(f"{T} thread(s): starting workers")
            kids[T] = (Child("numba", T, data), Child("numpy", T, data))
        gemm: dict[int, list[float]] = {}
        for T, (a, b) in kids.items():
            r = {"info": {**a.ask("info"), **b.ask("info")}}
            res["data"] = r["info"]["data"]
            # The GEMM rate is sampled at the start and before each batch size: a slow stretch of the host
            # during a single sample would make the limit look low.
            gemm[T] = [b.ask("gemm", reps=3 if quick else 5)["gflops"]]
            say(f"{T} thread(s): kernels at batch {kernel_batch}")
            kn = a.ask("kernels", B=kernel_batch, reps=3 if quick else 7)
            kp = b.ask("kernels", B=kernel_batch, reps=3 if quick else 7)
            r["kernels"] = {"batch": kernel_batch, "rows": [
                {"name": k, "numba_s": kn[k], "numpy_s": kp[k], "ratio": kn[k] / kp[k],
                 **_kernel_rate(k, kernel_batch, kn[k])} for k in kn]}
            r["epochs"] = []
            res["threads"][str(T)] = r
        for B in batches:
            say(f"epochs at batch {B}" + (", thread counts alternating" if len(kids) > 1 else ""))
            tn = {T: [] for T in kids}
            tp = {T: [] for T in kids}
            tc = {T: [] for T in kids}
            loss = {}
            for T, (a, b) in kids.items():
                gemm[T].append(b.ask("gemm", reps=2 if quick else 3)["gflops"])
                a.ask("epoch", B=B, samples=min(samples, 6000), reps=0, warmup=1)  # warm-up passes
                b.ask("epoch", B=B, samples=min(samples, 6000), reps=0, warmup=1)
            # One pass of each side at each thread count per round: Numba against NumPy and C++, and 2
            # threads against 1, under the same state of the host (whose second vCPU comes and goes).
            for _ in range(reps):
                for T, (a, b) in kids.items():
                    d = a.ask("epoch", B=B, samples=samples, reps=1)
                    tn[T] += d["times"]
                    e = b.ask("epoch", B=B, samples=samples, reps=1)
                    tp[T] += e["times"]
                    loss[T] = d["loss"], e["loss"]
                    if cpp and not quick:
                        data_dir = res["threads"][str(T)]["info"].get("data_dir")
                        tc[T].append(cpp_epoch(B, T, max(30.0, 20 * d["times"][0] * N_TRAIN / samples), data_dir))
            scale = N_TRAIN / samples
            for T in kids:
                row = {"batch": B, "numba_s": min(tn[T]) * scale,
                       "numba_median_s": statistics.median(tn[T]) * scale,
                       "numpy_s": min(tp[T]) * scale, "numpy_median_s": statistics.median(tp[T]) * scale,
                       "numba_loss": loss[T][0], "numpy_loss": loss[T][1]}
                row["ratio"] = row["numba_s"] / row["numpy_s"]
                row["numba_samples_per_s"] = N_TRAIN / row["numba_s"]
                row["numba_gflops"] = N_TRAIN * FLOP_PER_SAMPLE / row["numba_s"] / 1e9
                row["numpy_samples_per_s"] = N_TRAIN / row["numpy_s"]
                if tc[T]:
                    row["cpp"] = _cpp_row(tc[T], row["numba_s"])
                res["threads"][str(T)]["epochs"].append(row)
        for T, (a, b) in kids.items():
            r = res["threads"][str(T)]
            # the limit is the machine's best moment in this run, as each epoch time is its fastest pass
            r["gemm2048_gflops"], r["gemm2048_gflops_min"], r["gemm_samples"] = max(gemm[T]), min(gemm[T]), len(gemm[T])
            r["gemm_limited_epoch_s"] = N_TRAIN * FLOP_PER_SAMPLE / (max(gemm[T]) * 1e9)
            r["actual_limited_epoch_s"] = r["info"]["actual_flop_per_epoch"] / (max(gemm[T]) * 1e9)
            for row in r["epochs"]:
                row["gemm_fraction"] = r["gemm_limited_epoch_s"] / row["numba_s"]
                row["actual_fraction"] = r["actual_limited_epoch_s"] / row["numba_s"]
            say(f"{T} thread(s): inference")
            inf_n, inf_p = a.ask("infer", reps=3 if quick else 5), b.ask("infer", reps=3 if quick else 5)
            r["inference"] = {
                "batch1000_samples_per_s": {"numba": 10_000 / inf_n["batch1000_s_per_10k"],
                                            "numpy": 10_000 / inf_p["batch1000_s_per_10k"]},
                "batch1000_gflops": {"numba": 10_000 * INFER_FLOP / inf_n["batch1000_s_per_10k"] / 1e9,
                                     "numpy": 10_000 * INFER_FLOP / inf_p["batch1000_s_per_10k"] / 1e9},
                "batch1_latency_us": {"numba": inf_n["batch1_s"] * 1e6, "numpy": inf_p["batch1_s"] * 1e6}}
        recipe(kids, res, 1 if quick else reps, say)
    finally:
        for a, b in kids.values():
            a.close()
            b.close()
    say("JIT cost")
    res["jit"] = jit_cost(cold=not quick)
    return res


def recipe(kids: dict, res: dict, reps: int, say) -> None:
    """The default recipe's epoch and the same epoch without augmentation, at each thread count, into
    res["threads"][T]["recipe"] (None without MNIST: the recipe trains on its files). One pass of each
    kind at each thread count per round, as the plain epochs."""
    if not res["data"].startswith("MNIST"):
        for T in kids:
            res["threads"][str(T)]["recipe"] = None
        return
    say("the default recipe's epochs" + (", thread counts alternating" if len(kids) > 1 else ""))
    times = {(T, aug): [] for T in kids for aug in (True, False)}
    n = 0
    for a, _ in kids.values():
        for aug in (True, False):
            a.ask("recipe", augment=aug, reps=0, warmup=1)
    for _ in range(reps):
        for T, (a, _) in kids.items():
            for aug in (True, False):
                d = a.ask("recipe", augment=aug, reps=1)
                times[T, aug] += d["times"]
                n, B = d["samples"], d["batch"]
    for T in kids:
        aug, plain = times[T, True], times[T, False]
        res["threads"][str(T)]["recipe"] = {
            "samples": n, "batch": B, "augmented_s": min(aug), "augmented_median_s": statistics.median(aug),
            "plain_s": min(plain), "plain_median_s": statistics.median(plain),
            "augment_overhead": min(aug) / min(plain) - 1}


def _kernel_rate(name: str, B: int, t: float) -> dict:
    """GFLOP/s of the products, GB/s of the memory-bound parts."""
    n_in = {"1": 784, "2": 250, "3": 250}
    if name.startswith("fwd"):
        l = name[3]
        return {"gflops": 2 * B * n_in[l] * (10 if l == "3" else 250) / t / 1e9}
    if name.startswith("bwd"):
        return {"gflops": 2 * B * 250 * (10 if "W3" in name else 250) / t / 1e9}
    if name.startswith("dW"):
        l = name[2]
        return {"gflops": 2 * B * n_in[l] * (10 if l == "3" else 250) / t / 1e9}
    if name.startswith("softmax"):
        return {"gbps": B * 10 * 4 * 2 / t / 1e9}
    if name.startswith("nonzeros"):
        return {"gbps": 2 * B * SIZES[0] * 4 / t / 1e9}  # X read twice
    n = sum(SIZES[l] * SIZES[l + 1] + SIZES[l + 1] for l in range(len(SIZES) - 1))
    return {"gbps": 3 * 4 * n / t / 1e9}  # read p and g, write p


def table(res: dict) -> str:
    m = res["machine"]
    lines = [f"nn-numba bench  {m['date']}  {m['cpu']}, {m['cores']} cores, load {m['load_avg']}",
             f"network {res['network']}, {res['flop_per_sample'] / 1e6:.3f} MFLOP/sample/step; "
             f"data: {res['data']}",
             f"epochs: {res['measured_samples']} samples per pass scaled to {res['epoch_samples']}, "
             f"best of {res['reps']} passes (median in brackets), alternating Numba and NumPy"
             + (" and the thread counts" if len(res["threads"]) > 1 else "")]
    for T, r in res["threads"].items():
        i = r["info"]
        lines += ["", f"=== {T} thread(s): numba {i['numba']} ({i['threading_layer']} layer, "
                  f"{i['numba_threads']} threads, {i['vector_lanes']}-lane vectors; the host's widest: "
                  f"{i['host_lanes']}), numpy {i['numpy']}, BLAS {i['blas']}, "
                  f"OPENBLAS_NUM_THREADS={i['openblas_threads']} OPENBLAS_CORETYPE={i['openblas_coretype']}",
                  f"GEMM limit: numpy 2048^3 {r['gemm2048_gflops']:.1f} GFLOP/s (fastest of "
                  f"{r['gemm_samples']} samples over the run; slowest {r['gemm2048_gflops_min']:.1f}) -> "
                  f"{r['gemm_limited_epoch_s']:.3f} s/epoch at the dense {res['flop_per_sample'] / 1e6:.3f} "
                  f"MFLOP/sample, {r['actual_limited_epoch_s']:.3f} s/epoch at the "
                  f"{i['actual_flop_per_epoch'] / N_TRAIN / 1e6:.3f} MFLOP/sample a step actually performs "
                  f"(first layer over lit pixels only)", "",
                  f"kernels at batch {r['kernels']['batch']}:",
                  f"  {'kernel':26} {'numba us':>9} {'rate':>12} {'numpy us':>9} {'numba/numpy':>11}"]
        for k in r["kernels"]["rows"]:
            rate = f"{k['gflops']:.1f} GFLOP/s" if "gflops" in k else f"{k['gbps']:.1f} GB/s"
            lines.append(f"  {k['name']:26} {k['numba_s'] * 1e6:9.1f} {rate:>12} {k['numpy_s'] * 1e6:9.1f} "
                         f"{k['ratio']:11.2f}")
        lines.append("  (sparse rows: the first layer as training runs it on inputs with zeros, against NumPy's dense "
                     "product; their GFLOP/s count the dense product's FLOPs)")
        lines += ["", "training epoch (60,000 samples, SGD, mean loss; GFLOP/s count dense FLOPs; the epoch's share "
                  "of the time the GEMM rate needs for the dense FLOPs, and for the actual ones):",
                  f"  {'batch':>5} {'numba s':>15} {'samples/s':>10} {'GFLOP/s':>8} {'numpy s':>15} "
                  f"{'numba/numpy':>11} {'of GEMM limit':>13} {'of actual':>9} {'C++ s':>15} {'C++/numba':>9}"]
        for e in r["epochs"]:
            c = e.get("cpp")
            ok = c and c.get("seconds_per_epoch") is not None
            cs = f"{c['seconds_per_epoch']:6.3f} ({c.get('median_s', c['seconds_per_epoch']):.3f})" if ok else "-"
            cr = f"{c['ratio']:9.2f}" if ok and "ratio" in c else f"{'-':>9}"
            lines.append(f"  {e['batch']:5d} {e['numba_s']:6.3f} ({e['numba_median_s']:.3f}) "
                         f"{e['numba_samples_per_s']:10,.0f} {e['numba_gflops']:8.1f} "
                         f"{e['numpy_s']:6.3f} ({e['numpy_median_s']:.3f}) {e['ratio']:11.2f} "
                         f"{100 * e['gemm_fraction']:12.0f}% {100 * e['actual_fraction']:8.0f}% {cs:>15} {cr}")
        lines.append("  (C++: `nn-cpp bench --optimizer sgd --epochs 1 --data-dir DIR`, the Numba column's data, one "
                     "pass per round beside it; numpy: float32 pixels already in memory)")
        rc = r.get("recipe")
        if rc:
            lines += ["", f"default recipe (configs/default.toml: augmentation, Adam, batch {rc['batch']}; "
                      f"{rc['samples']:,} images, train's epoch loop): {rc['augmented_s']:.3f} s "
                      f"({rc['augmented_median_s']:.3f}); "
                      f"without augmentation {rc['plain_s']:.3f} s ({rc['plain_median_s']:.3f}): augmentation "
                      f"{100 * rc['augment_overhead']:+.0f} %"]
        inf = r["inference"]
        lines += ["", f"inference: batch 1000 numba {inf['batch1000_samples_per_s']['numba']:,.0f}/s "
                  f"({inf['batch1000_gflops']['numba']:.0f} GFLOP/s), numpy "
                  f"{inf['batch1000_samples_per_s']['numpy']:,.0f}/s; batch 1 latency numba "
                  f"{inf['batch1_latency_us']['numba']:.1f} us, numpy {inf['batch1_latency_us']['numpy']:.1f} us"]
    j = res["jit"]
    lines.append("")
    if "cold" in j:
        lines.append(f"JIT: empty cache {j['cold']['process_s']:.2f} s from process start to a trained step "
                     f"(compile {j['cold']['first_step_s']:.2f} s)")
    lines.append(f"JIT: warm cache {j['warm']['process_s']:.2f} s (import {j['warm']['import_s']:.2f} s, "
                 f"loading kernels {j['warm']['first_step_s']:.2f} s)")
    return "\n".join(lines)


def bench(threads: str = "1,2", batches: str = "32,64,256,1024", quick: bool = False, as_json: bool = False,
          kernel_batch: int = 256, data: str = "mnist", passes: int | None = None) -> None:
    """The `nn-numba bench` command."""
    try:
        ts = [int(t) for t in threads.split(",") if t.strip()]
        bs = [int(b) for b in batches.split(",") if b.strip()]
    except ValueError:
        raise NNError(f"bench: --threads {threads!r} / --batches {batches!r}: give comma-separated whole numbers") \
            from None
    if not ts or not bs or min(ts) < 1 or min(bs) < 1 or kernel_batch < 1 or (passes is not None and passes < 1):
        raise NNError("bench: --threads, --batches, --kernel-batch and --passes need positive numbers")
    big = max(bs + [kernel_batch])
    if big > N_TRAIN:  # an epoch's samples: a larger batch would only size buffers for it
        flag = "--batches" if big in bs else "--kernel-batch"
        raise NNError(f"bench: {flag} {big} is out of range [1, {N_TRAIN}] (the samples of an epoch)")
    if max(ts) > (os.cpu_count() or 1):
        raise NNError(f"bench: --threads {threads}: this machine has {os.cpu_count()} cores")
    if data not in ("mnist", "random"):
        raise NNError(f"bench: --data {data!r}: choose mnist (the training images, if present) or random")
    if quick:
        ts, bs = ts[:1], [b for b in bs if b in (64, 256)] or bs[:1]
    res = run(ts, bs, quick=quick, kernel_batch=kernel_batch, data=data, passes=passes,
              progress=None if as_json else lambda s: print(f"  ... {s}", file=sys.stderr, flush=True))
    print(json.dumps(res) if as_json else table(res))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        bench(*sys.argv[1:2])
