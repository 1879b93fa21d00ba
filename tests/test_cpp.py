"""The C++ port (cpp/): built with cmake once per session, then checked against Python.

(1) a checkpoint written by `nn-cpp train` loads with nn_numba.checkpoint and predicts the same in NumPy;
(2) a checkpoint saved by Python is evaluated/predicted by `nn-cpp` like a float64 NumPy forward does;
(3) training steps of `nn-cpp train` equal a float64 NumPy step written from docs/training.md.
The C++ unit tests themselves run under ctest (cpp/ci.sh).
"""

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import reference as ref

from nn_numba import checkpoint

ROOT = Path(__file__).resolve().parent.parent
CPP = ROOT / "cpp"
BUILD = CPP / "build"


@pytest.fixture(scope="session")
def nn_cpp() -> Path:
    """cpp/build/nn-cpp, configured and (incrementally) built on first use."""
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"cannot build the C++ port: {', '.join(missing)} not found; install cmake and g++ "
                    "(Debian: apt-get install cmake g++ zlib1g-dev)")
    steps = [["cmake", "--build", str(BUILD), "-j2", "--target", "nn-cpp"]]
    if not (BUILD / "CMakeCache.txt").exists():
        steps.insert(0, ["cmake", "-S", str(CPP), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release"])
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return BUILD / "nn-cpp"


def run(exe: Path, *args: str) -> str:
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, f"nn-cpp {' '.join(map(str, args))} failed: {r.stderr}"
    return r.stdout


def idx(path: Path, count: int | None = None) -> np.ndarray:
    """First `count` items (all if None) of a u8 IDX file, shaped (n, 784) or (n,)."""
    with gzip.open(path, "rb") as f:
        ndim = f.read(4)[3]
        dims = np.frombuffer(f.read(4 * ndim), ">u4").astype(int)
        n = dims[0] if count is None else count
        item = int(np.prod(dims[1:]))
        a = np.frombuffer(f.read(n * item), np.uint8)
    return a.reshape(n, item) if ndim > 1 else a


@pytest.fixture(scope="session")
def test_set(mnist_path: Path) -> tuple[np.ndarray, np.ndarray]:
    X = idx(mnist_path / "t10k-images-idx3-ubyte.gz").astype(np.float32) / np.float32(255)
    return X, idx(mnist_path / "t10k-labels-idx1-ubyte.gz").astype(np.int64)


def he(sizes, seed) -> checkpoint.Checkpoint:
    rng = np.random.default_rng(seed)
    Ws = [(rng.standard_normal((o, i)) * np.sqrt(2 / i)).astype(np.float32) for i, o in zip(sizes, sizes[1:])]
    bs = [(0.01 * rng.standard_normal(o)).astype(np.float32) for o in sizes[1:]]
    return checkpoint.Checkpoint(list(sizes), Ws, bs, {"producer": "nn-numba 0.1.0", "note": "test_cpp"})


# ---- (1) C++ -> Python --------------------------------------------------------------------------


def test_cpp_checkpoint_loads_in_python(nn_cpp, mnist_path, test_set, tmp_path):
    out = tmp_path / "cpp.ck"
    run(nn_cpp, "train", "--data-dir", mnist_path, "--out", out, "--limit", 2000, "--epochs", 1,
        "--batch-size", 64, "--seed", 3, "--quiet")
    ck = checkpoint.load(out, sizes=[784, 250, 250, 10])
    assert ck.meta["producer"] == "nn-cpp 0.1.0" and ck.meta["epoch"] == 1
    assert ck.optim.kind == "adam" and ck.optim.step == -(-1800 // 64)  # 10 % of 2000 held out
    assert not list(tmp_path.glob("*.tmp-*"))

    X, y = test_set
    Z = ref.forward(ck.weights, ck.biases, X)[-1]
    acc = float((Z.argmax(1) == y).mean())
    loss = float(ref.losses(Z, y).mean())
    assert acc > 0.7  # one cosine epoch on 1,800 images (~0.8): clearly learned something
    ev = json.loads(run(nn_cpp, "evaluate", out, "--data-dir", mnist_path, "--json"))
    # float32 vs float64 may flip a near-tie or two
    assert abs(ev["accuracy"] - acc) <= 2e-4 and abs(ck.meta["test_acc"] - acc) <= 2e-4
    assert ev["loss"] == pytest.approx(loss, rel=1e-4)
    assert ck.meta["test_loss"] == pytest.approx(loss, rel=1e-4)


def test_cpp_threads_do_not_change_results(nn_cpp, mnist_path, tmp_path):
    def params(threads: int, seed: int) -> list[np.ndarray]:
        out = tmp_path / f"t{threads}-{seed}.ck"
        run(nn_cpp, "train", "--data-dir", mnist_path, "--out", out, "--limit", 600, "--epochs", 1,
            "--batch-size", 100, "--threads", threads, "--seed", seed, "--quiet")
        ck = checkpoint.load(out)
        return ck.weights + ck.biases

    one, two = params(1, 5), params(2, 5)
    assert all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))  # bit for bit
    assert not np.array_equal(one[0], params(1, 6)[0])  # and the seed does matter


# ---- (2) Python -> C++ --------------------------------------------------------------------------


def test_python_checkpoint_in_cpp(nn_cpp, mnist_path, test_set, tmp_path):
    """A checkpoint trained by `nn-numba train`, evaluated and predicted by nn-cpp."""
    from nn_numba.config import from_dict
    from nn_numba.model import MLP
    from nn_numba.model import evaluate as py_evaluate
    from nn_numba.train import train

    cfg = from_dict({"model": {"sizes": [784, 100, 10]}, "train": {"epochs": 1, "batch_size": 256,
                                                                   "out": str(tmp_path)}})
    path = train(cfg, data_dir=str(mnist_path), quiet=True) / "best.ck"
    ck = checkpoint.load(path)
    X, y = test_set
    Z = ref.forward(ck.weights, ck.biases, X)[-1]
    py_loss, py_acc, _ = py_evaluate(MLP.from_checkpoint(ck), (X * 255).round().astype(np.uint8), y)
    top2 = np.sort(Z, axis=1)[:, -2:]
    tie = (top2[:, 1] - top2[:, 0]) < 1e-5 * np.abs(Z).max(axis=1)  # too close for float32 to settle

    ev = json.loads(run(nn_cpp, "evaluate", path, "--data-dir", mnist_path, "--json"))
    assert abs(ev["accuracy"] - float((Z.argmax(1) == y).mean())) <= tie.mean() + 1e-12
    assert abs(ev["accuracy"] - py_acc) <= tie.mean() + 1e-12  # what `nn-numba evaluate` prints
    assert ev["loss"] == pytest.approx(py_loss, rel=1e-5)
    assert ev["loss"] == pytest.approx(float(ref.losses(Z, y).mean()), rel=1e-4)

    got = json.loads(run(nn_cpp, "predict", path, mnist_path / "t10k-images-idx3-ubyte.gz",
                         "--index", "0:10000", "--json"))["predictions"]
    assert [p["index"] for p in got] == list(range(10000))
    assert [p["label"] for p in got] == y.tolist()
    logits = np.array([p["logits"] for p in got])
    assert np.abs(logits - Z).max() <= 1e-4 * np.abs(Z).max()
    digits = np.array([p["digit"] for p in got])
    assert tie.sum() <= 5 and (digits == Z.argmax(1))[~tie].all()  # typically 0 or 1 near-ties
    probs = np.array([p["probs"] for p in got])
    assert np.allclose(probs.sum(1), 1, atol=1e-5)


def test_predict_pgm_and_errors(nn_cpp, tmp_path):
    ck = he([784, 20, 10], seed=2)
    checkpoint.save(tmp_path / "a.ck", ck)
    img = (np.arange(784) % 256).astype(np.uint8)
    (tmp_path / "x.pgm").write_bytes(b"P5\n28 28\n255\n" + img.tobytes())
    got = json.loads(run(nn_cpp, "predict", tmp_path / "a.ck", tmp_path / "x.pgm", "--json"))["predictions"][0]
    Z = ref.forward(ck.weights, ck.biases, img[None].astype(np.float32) / np.float32(255))[-1][0]
    assert got["digit"] == int(Z.argmax())
    assert np.allclose(got["logits"], Z, rtol=1e-4, atol=1e-5)

    (tmp_path / "bad.ck").write_bytes((tmp_path / "a.ck").read_bytes()[:-1])
    (tmp_path / "bad.pgm").write_bytes(b"P5\n28 28\n255\n" + img.tobytes()[:-3])
    for args, msg in [(["evaluate", tmp_path / "bad.ck", "--data-dir", tmp_path], "bad.ck: "),
                      (["predict", tmp_path / "a.ck", tmp_path / "bad.pgm"], "bad.pgm: truncated"),
                      (["predict", tmp_path / "a.ck", tmp_path / "x.pgm", "--index", "3"], "x.pgm: "),
                      (["train", "--data-dir", tmp_path, "--out", tmp_path / "a.ck"], "a.ck: already exists")]:
        r = subprocess.run([str(nn_cpp), *map(str, args)], capture_output=True, text=True)
        assert r.returncode == 1, r.stderr
        assert r.stderr.startswith("nn-cpp: error: ") and msg in r.stderr and r.stderr.count("\n") == 1
    assert checkpoint.load(tmp_path / "a.ck").weights[0].tobytes() == ck.weights[0].tobytes()  # untouched


# ---- (3) training steps -------------------------------------------------------------------------


@pytest.mark.parametrize("opt, reduction, lr, wd, extra", [
    ("sgd", "sum", 1e-3, 0.0, []),
    ("momentum", "mean", 0.05, 1e-3, []),
    ("momentum", "mean", 0.05, 0.0, ["--nesterov"]),
    ("adam", "mean", 1e-3, 1e-2, []),
])
def test_cpp_steps_match_float64(nn_cpp, mnist_path, tmp_path, opt, reduction, lr, wd, extra):
    sizes = [784, 32, 16, 10]
    init = he(sizes, seed=4)
    checkpoint.save(tmp_path / "a.ck", init)
    batch, steps = 64, 2  # two steps: the second one uses the optimizer state of the first
    run(nn_cpp, "train", "--data-dir", mnist_path, "--out", tmp_path / "b.ck", "--init", tmp_path / "a.ck",
        "--limit", batch * steps, "--batch-size", batch, "--epochs", 1, "--no-shuffle", "--val-split", 0,
        "--optimizer", opt, "--reduction", reduction, "--lr", lr, "--weight-decay", wd, "--schedule",
        "constant", "--quiet", *extra)
    got = checkpoint.load(tmp_path / "b.ck", sizes=sizes)

    X = idx(mnist_path / "train-images-idx3-ubyte.gz", batch * steps).astype(np.float32) / np.float32(255)
    y = idx(mnist_path / "train-labels-idx1-ubyte.gz", batch * steps).astype(np.int64)
    o = ref.Optimizer(opt, lr, momentum=0.9, nesterov=bool(extra), wd=wd)
    P = ref.train(init.weights, init.biases, X, y, steps, batch, o, reduction)
    slots = ref.slots(o, len(P))
    params = [p for wb in zip(got.weights, got.biases, strict=True) for p in wb]
    moved = max(np.abs(p - np.asarray(q, np.float64)).max() for p, q in
                zip(P, [p for wb in zip(init.weights, init.biases, strict=True) for p in wb], strict=True))
    assert moved > 1e-4  # the step did something measurable
    for name, a, b in zip(["W", "B"] * 3, params, P, strict=True):
        assert np.abs(a - b).max() <= 1e-5, f"{opt}: {name} differs by {np.abs(a - b).max():.2e}"
    assert got.optim.kind == opt and got.optim.step == steps and len(got.optim.slots) == len(slots)
    for s_got, s_ref in zip(got.optim.slots, slots, strict=True):
        for a, b in zip(s_got, s_ref, strict=True):
            assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max())
