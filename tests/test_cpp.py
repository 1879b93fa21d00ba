"""The C++ port (cpp/): built with cmake once per session, then checked against Python.

(1) a checkpoint written by `nn-cpp train` loads with nn_numba.checkpoint and predicts the same in NumPy;
(2) a checkpoint saved by Python is evaluated/predicted by `nn-cpp` like a float64 NumPy forward does;
(3) training steps of `nn-cpp train` equal a float64 NumPy step written from docs/training.md;
(4) configs: nn-cpp reads the TOML files and rejects bad ones with nn_numba.config's own words;
(5) augmentation: nn-cpp distorts an image like nn_numba.augment's kernels under the same draws;
(6) run folders across languages: one epoch in one trainer, resumed for one more in the other.
The C++ unit tests themselves run under ctest (cpp/ci.sh).
"""

import gzip
import json
import os
import shutil
import signal
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
    run(nn_cpp, "train", "--data-dir", mnist_path, "--out", tmp_path, "--limit", 2000, "--epochs", 1,
        "--batch-size", 64, "--seed", 3, "--quiet")
    out = tmp_path / "latest" / "best.ck"
    ck = checkpoint.load(out, sizes=[784, 250, 250, 10])
    assert ck.meta["producer"] == "nn-cpp 0.1.0" and ck.meta["epoch"] == 1 and ck.optim is None
    last = checkpoint.load(tmp_path / "latest" / "last.ck")
    assert last.optim.kind == "adam" and last.optim.step == -(-1800 // 64)  # 10 % of 2000 held out
    assert not list(tmp_path.glob("*/*.tmp-*"))

    X, y = test_set
    Z = ref.forward(ck.weights, ck.biases, X)[-1]
    acc = float((Z.argmax(1) == y).mean())
    loss = float(ref.losses(Z, y).mean())
    assert acc > 0.7  # one epoch on 1,800 images (~0.85): clearly learned something
    ev = json.loads(run(nn_cpp, "evaluate", out, "--data-dir", mnist_path, "--json"))
    # float32 vs float64 may flip a near-tie or two
    assert abs(ev["accuracy"] - acc) <= 2e-4 and abs(ck.meta["test_acc"] - acc) <= 2e-4
    assert ev["loss"] == pytest.approx(loss, rel=1e-4)
    assert ck.meta["test_loss"] == pytest.approx(loss, rel=1e-4)


def test_cpp_threads_do_not_change_results(nn_cpp, mnist_path, tmp_path):
    def params(threads: int, seed: int) -> list[np.ndarray]:
        out = tmp_path / f"t{threads}-{seed}"
        run(nn_cpp, "train", "--data-dir", mnist_path, "--out", out, "--limit", 600, "--epochs", 1,
            "--batch-size", 100, "--threads", threads, "--seed", seed, "--shift", 1, "--rotate", 5, "--quiet")
        ck = checkpoint.load(out / "latest" / "last.ck")
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
                      (["predict", tmp_path / "a.ck", tmp_path / "x.pgm", "--index", "3"], "x.pgm: ")]:
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
    run(nn_cpp, "train", "--data-dir", mnist_path, "--out", tmp_path / "b", "--init", tmp_path / "a.ck",
        "--limit", batch * steps, "--batch-size", batch, "--epochs", 1, "--no-shuffle", "--val-split", 0,
        "--optimizer", opt, "--reduction", reduction, "--lr", lr, "--weight-decay", wd, "--schedule",
        "constant", "--sizes", ",".join(map(str, sizes)), "--quiet", *extra)
    got = checkpoint.load(tmp_path / "b" / "latest" / "last.ck", sizes=sizes)

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


# ---- (4) configs --------------------------------------------------------------------------------


def cpp(exe: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The message of a failed nn-cpp run, checked to be one line `nn-cpp: error: ...` with exit code 1."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.startswith("nn-cpp: error: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr[len("nn-cpp: error: "):-1]


BAD_CONFIGS = [
    "[optim]\nlrr = 1\n", "[optimizer]\n", "[optim]\nlr = 0\n", "[optim]\neps = 0.0\n", "[train]\nepochs = 0\n",
    "[train]\nepochs = 1.5\n", "[schedule]\nwarmup_epochs = 'x'\n", "[schedule]\nwarmup_epochs = inf\n",
    "[optim]\nname = \"rmsprop\"\n", "[model]\nsizes = [784, 10.5]\n", "[model]\nsizes = [784, 5]\n",
    "[model]\nsizes = [784, 0, 10]\n", "[data]\nshuffle = 1\n", "[augment]\nelastic_sigma = 1.0\n",
    "[augment]\nshift = 15\n", "data = \"x\"\n", "[train]\nseed = -1\n", "[train]\nbatch_size = true\n",
    "[model]\nsizes = [784, 10000, 10000, 10]\n", "[model]\nsizes = [784, 5000, 10]\n[train]\nbatch_size = 60000\n",
    "[data]\ndir = \"a\\u0000b\"\n", "[train]\nout = 3\n",
]


@pytest.mark.parametrize("text", BAD_CONFIGS)
def test_bad_config_same_message_as_python(nn_cpp, tmp_path, text):
    from nn_numba.config import ConfigError, load_config

    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as py:
        load_config(path)
    r = cpp(nn_cpp, "train", "--config", path, "--out", tmp_path / "runs")
    assert one_line_error(r) == str(py.value)
    assert not (tmp_path / "runs").exists()  # nothing written


def test_unreadable_configs(nn_cpp, tmp_path):
    from nn_numba.config import ConfigError, load_config

    (tmp_path / "bin.toml").write_bytes(b"\x00\xff\xfe")
    (tmp_path / "big.toml").write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    (tmp_path / "syntax.toml").write_text("[train\nepochs = 3\n")
    for name in ("bin.toml", "big.toml", "no-such.toml", "."):
        with pytest.raises(ConfigError) as py:
            load_config(tmp_path / name)
        assert one_line_error(cpp(nn_cpp, "train", "--config", tmp_path / name)) == str(py.value)
    msg = one_line_error(cpp(nn_cpp, "train", "--config", tmp_path / "syntax.toml"))
    assert msg.startswith(f"{tmp_path / 'syntax.toml'}: not valid TOML: ") and "line 1" in msg  # toml++'s words


@pytest.mark.parametrize("flag, value, table, key", [
    ("--epochs", "4294967297", "train", "epochs"), ("--batch-size", "4294967360", "train", "batch_size"),
    ("--threads", "100000", "train", "threads"), ("--seed", "-1", "train", "seed"), ("--lr", "0", "optim", "lr"),
    ("--warmup-epochs", "nan", "schedule", "warmup_epochs"), ("--step-epochs", "0", "schedule", "step_epochs"),
])
def test_bad_flags_range_checked_before_narrowing(nn_cpp, tmp_path, flag, value, table, key):
    """Flags are config keys: held in 64 bits (or float64), then checked like nn_numba's overrides."""
    from nn_numba.config import Config, ConfigError, from_dict

    d = Config().to_dict()
    d[table][key] = float(value) if "." in value or value == "nan" or key in ("lr", "warmup_epochs") else int(value)
    with pytest.raises(ConfigError) as py:
        from_dict(d, "command line")
    r = cpp(nn_cpp, "train", flag, value, "--out", tmp_path / "runs")
    assert one_line_error(r) == str(py.value)
    assert not (tmp_path / "runs").exists()


# ---- (5) augmentation ---------------------------------------------------------------------------


def counter_uniform(seed: int, stream: int, epoch: int, i: int, k: int) -> float:
    """uniform() of docs/training.md in Python integers: independent of both trainers' code."""
    m64 = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        return z ^ (z >> 31)

    a = mix(mix(seed) ^ stream)
    a = mix(mix((a + epoch) & m64) + i & m64)
    return (mix((a + 0x9E3779B97F4A7C15 * (k + 1)) & m64) >> 11) * 2.0**-53


@pytest.mark.parametrize("aug", [
    {"shift": 3},
    {"shift": 2, "rotate": 30.0, "scale": 0.2},
    {"rotate": 12.0, "elastic_alpha": 2.0, "elastic_sigma": 4.0},
    {"shift": 2, "rotate": 12.0, "scale": 0.12, "elastic_alpha": 3.0, "elastic_sigma": 6.0},
])
def test_augmentation_matches_python_kernels(nn_cpp, mnist_path, tmp_path, aug):
    """Same image, same draws: nn-cpp's distortion equals nn_numba.augment's kernels to 1e-5 (both are
    float32; Python's kernels use fastmath), and nn-cpp's draws equal the contract's formulas."""
    from nn_numba import augment as A

    X = idx(mnist_path / "train-images-idx3-ubyte.gz", 8)
    path = tmp_path / "eight-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + np.array([8, 28, 28], ">u4").tobytes() + X.tobytes())
    flags = [x for k, v in aug.items() for x in (f"--{k.replace('_', '-')}", v)]
    G = A.grid_size(aug.get("elastic_sigma", 4.0)) + 2
    for i, seed, epoch, q in [(0, 0, 0, 0), (5, 7, 3, 12345)]:
        got = json.loads(run(nn_cpp, "augment", path, "--index", i, "--seed", seed, "--epoch", epoch,
                             "--position", q, *flags))
        u = [counter_uniform(seed, 3, epoch, q, k) for k in range(4 + 2 * G * G)]
        s, rot, sc = aug.get("shift", 0), aug.get("rotate", 0.0), aug.get("scale", 0.0)
        alpha = aug.get("elastic_alpha", 0.0)
        dx, dy = (int(np.floor(u[k] * (2 * s + 1))) - s for k in (0, 1))
        assert (got["dx"], got["dy"]) == (dx, dy)
        assert got["angle"] == pytest.approx(rot * (2 * u[2] - 1), abs=1e-12)
        assert got["scale"] == pytest.approx(1 + sc * (2 * u[3] - 1), abs=1e-12)
        field = np.float32([alpha * (2 * x - 1) for x in u[4:]]).reshape(1, 2, G, G)
        if alpha:
            assert np.array_equal(np.float32(got["field"]).reshape(1, 2, G, G), field)
        out = np.zeros((1, 784), np.float32)
        at = np.array([i], np.int64)
        if not (rot or sc or alpha):
            A.shift_gather(X, at, np.array([dx]), np.array([dy]), out)
        else:
            mats = A.affine_mats(np.array([got["angle"]]), np.array([got["scale"]]), np.array([dx]), np.array([dy]))
            if alpha:
                A.elastic_gather(X, at, mats, field, out)
            else:
                A.affine_gather(X, at, mats, out)
        px = np.float32(got["pixels"])
        assert np.abs(px - out[0]).max() <= 1e-5
        assert np.abs(px - X[i] / np.float32(255)).max() > 0.1  # it did distort the digit


# ---- (6) run folders across languages -----------------------------------------------------------

# The step schedule's rate depends only on the step counter (not on the planned number of epochs), so a
# run stopped after one epoch and resumed for a second sees the rates of an uninterrupted two-epoch run.
RECIPE = """
[model]
sizes = [784, 64, 10]
[schedule]
name = "step"
step_epochs = 1
gamma = 0.5
warmup_epochs = 0.3
[augment]
shift = 1
rotate = 8.0
[train]
epochs = 2
batch_size = 128
seed = 11
"""
STEPS = -(-54000 // 128)  # per epoch


def py_train(config: Path, out: Path, data: Path, epochs: int, resume: Path | None = None) -> Path:
    from nn_numba.config import apply_overrides, load_config
    from nn_numba.train import train

    cfg = apply_overrides(load_config(config), epochs=epochs, out=str(out))
    return train(cfg, data_dir=str(data), resume=str(resume) if resume else None, quiet=True)


def params(ck: checkpoint.Checkpoint) -> np.ndarray:
    return np.concatenate([a.ravel() for wb in zip(ck.weights, ck.biases, strict=True) for a in wb])


def py_accuracy(ck: checkpoint.Checkpoint, test_set) -> float:
    from nn_numba.model import MLP
    from nn_numba.model import evaluate as py_evaluate

    X, y = test_set
    return py_evaluate(MLP.from_checkpoint(ck), (X * 255).round().astype(np.uint8), y)[1]


def check_crossed(mixed: Path, ref: Path, epoch1: checkpoint.Checkpoint, producer: str, test_set) -> None:
    """`mixed` (one epoch in each trainer) against `ref` (both epochs in the trainer of epoch 1).

    Both start from the same weights (epoch 1 is the same) and see the same batches, rates and
    distortions in epoch 2; they differ only in float32 rounding (each trainer sums in its own order, which
    leaves the weights about 1e-6 apart relative to how far epoch 2 moved them). So: the same step, rate
    and history; test accuracy within 0.2 points (rounding may flip a few borderline digits; a different
    split or data order could stay within that too, hence the next check); and weights and Adam moments
    within 1e-3 of the distance epoch 2 moved them (a different data order or different draws would put
    them about as far apart as that distance).
    """
    last, want = checkpoint.load(mixed / "last.ck"), checkpoint.load(ref / "last.ck")
    hist = [json.loads(line) for line in (mixed / "metrics.jsonl").read_text().splitlines()]
    ref_hist = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert last.meta["producer"].startswith(producer) and last.meta["history"] == hist
    assert [r["epoch"] for r in hist] == [1, 2] and hist[0] == {**ref_hist[0], **{k: hist[0][k] for k in
                                                                                  ("seconds", "samples_per_s")}}
    assert last.optim.step == want.optim.step == hist[1]["step"] == 2 * STEPS
    assert last.meta["resume"]["epoch"] == 2 and last.meta["resume"]["batch"] == 0
    assert hist[1]["lr"] == pytest.approx(ref_hist[1]["lr"], rel=1e-12)  # the schedule's position carried over
    acc, ref_acc = py_accuracy(last, test_set), py_accuracy(want, test_set)
    assert abs(acc - ref_acc) <= 0.002, (acc, ref_acc)
    assert acc == pytest.approx(hist[1]["test_acc"], abs=2e-4)  # what the run folder says
    moved = np.linalg.norm(params(want) - params(epoch1))
    apart = np.linalg.norm(params(last) - params(want))
    assert apart < 1e-3 * moved, (apart, moved)
    for a, b in zip(last.optim.slots, want.optim.slots, strict=True):  # Adam's moments carried over too
        d = np.concatenate([x.ravel() - z.ravel() for x, z in zip(a, b, strict=True)])
        assert np.linalg.norm(d) < 1e-3 * np.linalg.norm(np.concatenate([z.ravel() for z in b]))


needs_counter_rng = pytest.mark.xfail(
    __import__("importlib").util.find_spec("nn_numba.rng") is None, strict=True,
    reason="the Python trainer does not yet draw from the shared counter-based generator (nn_numba/rng.py)")


@needs_counter_rng
def test_python_epoch_then_cpp_epoch(nn_cpp, mnist_path, test_set, tmp_path):
    (tmp_path / "c.toml").write_text(RECIPE)
    run1 = py_train(tmp_path / "c.toml", tmp_path / "mixed", mnist_path, epochs=1)
    epoch1 = checkpoint.load(run1 / "last.ck")
    run(nn_cpp, "train", "--resume", run1, "--epochs", 2, "--data-dir", mnist_path, "--quiet")
    ref = py_train(tmp_path / "c.toml", tmp_path / "ref", mnist_path, epochs=2)
    check_crossed(run1, ref, epoch1, "nn-cpp", test_set)
    assert (tmp_path / "mixed" / "latest").resolve() == run1.resolve()
    assert "epochs = 2\n" in (run1 / "config.toml").read_text()  # the resolved config, rewritten


@needs_counter_rng
def test_cpp_epoch_then_python_epoch(nn_cpp, mnist_path, test_set, tmp_path):
    (tmp_path / "c.toml").write_text(RECIPE)
    run(nn_cpp, "train", "--config", tmp_path / "c.toml", "--epochs", 1, "--out", tmp_path / "mixed",
        "--data-dir", mnist_path, "--quiet")
    run1 = (tmp_path / "mixed" / "latest").resolve()
    epoch1 = checkpoint.load(run1 / "last.ck")
    py_train(run1 / "config.toml", tmp_path / "mixed", mnist_path, epochs=2, resume=run1)  # nn-cpp's config.toml
    run(nn_cpp, "train", "--config", tmp_path / "c.toml", "--out", tmp_path / "ref", "--data-dir", mnist_path,
        "--quiet")
    check_crossed(run1, (tmp_path / "ref" / "latest").resolve(), epoch1, "nn-numba", test_set)


def test_cpp_resume_is_bit_exact(nn_cpp, mnist_path, tmp_path):
    """Stopped by Ctrl-C (wherever that lands) or at an epoch's end, then resumed: the same bits as an
    uninterrupted run, since the data order and draws depend only on (seed, epoch, position). (The step
    schedule does not depend on the planned number of epochs, which the first run `a` changes.)"""
    common = ["--limit", 3000, "--sizes", "784,32,10", "--batch-size", 50, "--schedule", "step", "--step-epochs", 1,
              "--gamma", 0.7, "--warmup-epochs", 0.5, "--shift", 2, "--rotate", 10, "--elastic-alpha", 1,
              "--data-dir", mnist_path]
    run(nn_cpp, "train", *common, "--epochs", 3, "--out", tmp_path / "ref", "--quiet")
    run(nn_cpp, "train", *common, "--epochs", 1, "--out", tmp_path / "a", "--quiet")
    run(nn_cpp, "train", "--resume", tmp_path / "a" / "latest", "--epochs", 3, "--limit", 3000, "--quiet",
        "--data-dir", mnist_path)
    proc = subprocess.Popen([str(nn_cpp), *map(str, ["train", *common, "--epochs", 3, "--out", tmp_path / "b"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("run ")
    proc.send_signal(signal.SIGINT)  # the second mini-batch or so of epoch 1
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and err.startswith("nn-cpp: error: interrupted ") and "--resume" in err
    stopped = checkpoint.load(tmp_path / "b" / "latest" / "last.ck").meta["resume"]
    run(nn_cpp, "train", "--resume", tmp_path / "b" / "latest", "--limit", 3000, "--quiet", "--data-dir", mnist_path)
    want = checkpoint.load(tmp_path / "ref" / "latest" / "last.ck")
    for got in (tmp_path / "a", tmp_path / "b"):
        ck = checkpoint.load(got / "latest" / "last.ck")
        assert np.array_equal(params(ck), params(want)), (got, stopped)
        assert all(np.array_equal(x, z) for a, b in zip(ck.optim.slots, want.optim.slots, strict=True)
                   for x, z in zip(a, b, strict=True))
        assert ck.optim.step == want.optim.step == 3 * 54
        hist = [json.loads(line) for line in (got / "latest" / "metrics.jsonl").read_text().splitlines()]
        assert [r["train_loss"] for r in hist] == [r["train_loss"] for r in want.meta["history"]]


def test_python_tools_read_a_cpp_run(nn_cpp, mnist_path, tmp_path):
    """config.toml is nn_numba's resolved config; info, evaluate, predict and report work on the run."""
    from PIL import Image
    from typer.testing import CliRunner

    from nn_numba.cli import app
    from nn_numba.config import from_dict, load_config

    runs = tmp_path / "runs"
    d = load_config(ROOT / "configs" / "default.toml").to_dict()
    d["data"]["val_split"] = 0.1  # the recipe with a validation split: every column of metrics.jsonl
    (tmp_path / "recipe.toml").write_text(from_dict(d).to_toml())
    run(nn_cpp, "train", "--config", tmp_path / "recipe.toml", "--limit", 1000, "--epochs", 2,
        "--sizes", "784,32,10", "--out", runs, "--data-dir", mnist_path, "--quiet")
    d["train"].update(epochs=2, out=str(runs))
    d["model"]["sizes"] = [784, 32, 10]
    assert (runs / "latest" / "config.toml").read_text() == from_dict(d).to_toml()
    lines = (runs / "latest" / "metrics.jsonl").read_text().splitlines()
    assert [list(json.loads(r)) for r in lines] == [["epoch", "step", "lr", "train_loss", "train_acc", "val_loss",
                                                    "val_acc", "test_loss", "test_acc", "seconds", "samples_per_s"]] * 2

    cli = CliRunner()
    best = runs / "latest" / "best.ck"
    r = cli.invoke(app, ["info", str(runs / "latest" / "last.ck")])
    assert r.exit_code == 0 and "nn-cpp" in r.output and "adam" in r.output
    r = cli.invoke(app, ["evaluate", str(best), "--json", "--data-dir", str(mnist_path)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["accuracy"] == pytest.approx(checkpoint.load(best).meta["test_acc"], abs=2e-4)
    digit = idx(mnist_path / "t10k-images-idx3-ubyte.gz", 1)[0].reshape(28, 28)
    Image.fromarray(digit).save(tmp_path / "d.png")
    r = cli.invoke(app, ["predict", str(tmp_path / "d.png"), "--checkpoint", str(best), "--raw"])
    assert r.exit_code == 0, r.output
    r = cli.invoke(app, ["report", str(runs / "latest"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep").rglob("report.md")


# ---- (7) bad input on the new paths -------------------------------------------------------------


def test_resume_refuses_damaged_or_foreign_runs(nn_cpp, mnist_path, tmp_path):
    """One line, exit 1, and every file of the run stays as it was."""
    run(nn_cpp, "train", "--limit", 600, "--epochs", 1, "--sizes", "784,16,10", "--seed", 3,
        "--out", tmp_path / "runs", "--data-dir", mnist_path, "--quiet")
    good = (tmp_path / "runs" / "latest").resolve()
    ck = checkpoint.load(good / "last.ck")

    def variant(name: str, **files: bytes) -> Path:
        d = tmp_path / name
        shutil.copytree(good, d)
        for f, data in files.items():
            (d / f.replace("_", ".")).write_bytes(data)
        return d

    def with_meta(**meta) -> bytes:
        p = tmp_path / "m.ck"
        checkpoint.save(p, checkpoint.Checkpoint(ck.sizes, ck.weights, ck.biases, {**ck.meta, **meta}, ck.optim))
        return p.read_bytes()

    raw = (good / "last.ck").read_bytes()
    cases = [
        (variant("truncated", last_ck=raw[:-10]), [], "last.ck: "),
        (variant("foreign", last_ck=(ROOT / "tests" / "data" / "tiny.ck").read_bytes()), [], "has sizes 4-3-2"),
        (variant("no-state", last_ck=(good / "best.ck").read_bytes()), [], "holds no training state to resume from"),
        (variant("bad-state", last_ck=with_meta(resume={"epoch": -1, "batch": 0})), [], "training state is damaged"),
        (variant("bad-batch", last_ck=with_meta(resume={"epoch": 0, "batch": 999, "run_loss": 0.0,
                                                        "run_correct": 0})), [], "(batch 999 of an epoch of 9)"),
        (variant("no-config", config_toml=b"[train\n"), [], "config.toml: not valid TOML"),
        (good, ["--seed", 4], "it was trained with [train] seed = 3, the config says 4; resume with the run's own"),
        (good, ["--optimizer", "sgd"], "it was trained with [optim] name = 'adam', the config says 'sgd'"),
        (tmp_path / "nowhere", [], "nowhere"),
        (good, ["--limit", 0], "it was trained with --limit 600, this run asks for 0"),
    ]
    for folder, extra, msg in cases:
        before = {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}
        r = cpp(nn_cpp, "train", "--resume", folder, "--epochs", 2, "--limit", 600, "--data-dir", mnist_path, *extra)
        assert msg in one_line_error(r), (folder.name, r.stderr)
        after = {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}
        assert after == before, folder.name
