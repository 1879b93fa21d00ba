"""Nothing lost, nothing crashes: Ctrl-C, SIGKILL, divergence, full disks and hostile input.

The training tests drive real `nn-numba train` subprocesses on real MNIST (NN_NUMBA_DATA) with a small
network (784-32-10, batch 256, half the training set held out) so that a whole run takes seconds. The
reference run and the interrupted/resumed runs must end with bit-identical weights and optimiser state.
"""

import collections
import gzip
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nn_numba import checkpoint, config, data
from nn_numba.errors import NNError

ROOT = Path(__file__).resolve().parent.parent

CFG = """\
[model]
sizes = [784, 32, 10]
[data]
val_split = 0.5
[optim]
name = "adam"
lr = 0.002
[train]
epochs = 2
batch_size = 256
seed = 3
threads = 2
"""
# momentum: with weight decay 1 and lr 10 each step multiplies the weights by about -9, so it overflows
# within a few dozen steps (Adam's steps are bounded by lr and never reach Inf)
MOM = CFG.replace('name = "adam"\nlr = 0.002', 'name = "momentum"\nlr = 0.05').replace("epochs = 2", "epochs = 1")
DIVERGE = MOM.replace("lr = 0.05", "lr = 10.0\nweight_decay = 1.0").replace("epochs = 1", "epochs = 2")
TIMING = ("seconds", "samples_per_s")  # the only metrics allowed to differ between equivalent runs
ERROR = re.compile(r"^nn-numba: error: \S.*$")


def env(mnist: Path) -> dict:
    return os.environ | {"NN_NUMBA_DATA": str(mnist), "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def nn(mnist: Path, *args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nn_numba.cli", *map(str, args)], env=env(mnist), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **kw)


def one_error_line(p: subprocess.CompletedProcess) -> str:
    """The run failed with exactly one `nn-numba: error:` line on stderr (after any progress bars)."""
    assert p.returncode != 0, p.stdout
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("epoch ")]
    assert len(lines) == 1 and ERROR.match(lines[0]), p.stderr
    return lines[0]


def run_folder(stdout: str) -> Path:
    m = re.search(r"^(?:run|resuming) (\S+)", stdout, re.M)
    assert m, stdout
    return Path(m.group(1))


def params(ck: checkpoint.Checkpoint) -> list[np.ndarray]:
    out = [a for wb in zip(ck.weights, ck.biases) for a in wb]
    return out + [a for slot in ck.optim.slots for a in slot] if ck.optim else out


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights and optimiser state in last.ck, same best.ck weights, same metrics."""
    ca, cb = checkpoint.load(a / "last.ck"), checkpoint.load(b / "last.ck")
    assert ca.optim.step == cb.optim.step
    for x, y in zip(params(ca), params(cb), strict=True):
        assert np.array_equal(x, y)
    for x, y in zip(params(checkpoint.load(a / "best.ck")), params(checkpoint.load(b / "best.ck")), strict=True):
        assert np.array_equal(x, y)
    ha = [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(a)]
    hb = [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(b)]
    assert ha == hb and len(ha) == ca.meta["config"]["train"]["epochs"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def progress(run: Path) -> tuple[int, int]:
    """(epoch, batch) of the state saved in last.ck; (-1, 0) if there is none yet."""
    if not (run / "last.ck").exists():
        return (-1, 0)
    st = checkpoint.load(run / "last.ck").meta["resume"]
    return (st["epoch"], st["batch"])


def assert_whole(run: Path) -> None:
    """Every file under a final name is complete: checkpoints load, config.toml parses, metrics.jsonl is a
    prefix of last.ck's history. Temp files (NAME.tmp-PID) may be left by a SIGKILL, nothing else."""
    for f in run.iterdir():
        if ".tmp-" in f.name:
            continue
        assert f.name in {"config.toml", "metrics.jsonl", "best.ck", "last.ck"}, f
        if f.suffix == ".ck":
            checkpoint.load(f)
    config.load_config(run / "config.toml")
    if (run / "metrics.jsonl").exists():
        hist = checkpoint.load(run / "last.ck").meta["history"]
        rows = metrics(run)
        assert rows == hist[:len(rows)] and len(hist) - len(rows) <= 1


@pytest.fixture(scope="module")
def cfgs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cfg")
    out = {}
    for name, text in (("small", CFG), ("mom", MOM), ("diverge", DIVERGE)):
        (d / f"{name}.toml").write_text(text)
        out[name] = d / f"{name}.toml"
    return out


@pytest.fixture(scope="module")
def ref(mnist_path, cfgs, tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run: what every interrupted and resumed run must reproduce exactly."""
    out = tmp_path_factory.mktemp("ref")
    p = nn(mnist_path, "train", cfgs["small"], "--out", out)
    assert p.returncode == 0, p.stderr
    return run_folder(p.stdout)


# ------------------------------------------------------------------------------------ interruptions


def start(mnist: Path, args: list, log: Path) -> tuple[subprocess.Popen, Path]:
    """Start `nn-numba train ...`; return once its loop is about to start (the `run`/`resuming` line)."""
    proc = subprocess.Popen([sys.executable, "-m", "nn_numba.cli", "train", *map(str, args)], env=env(mnist),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    head = ""
    while not re.search(r"^run \S+", head, re.M):
        line = proc.stdout.readline()
        if not line:  # exited before training (e.g. the resumed run was already complete)
            break
        head += line
    return proc, (run_folder(head) if head.strip() else None)


def test_sigint_and_sigkill_at_random_points_lose_nothing(mnist_path, cfgs, ref, tmp_path):
    """A chain of random interruptions (Ctrl-C, Ctrl-C twice, SIGKILL), each followed by --resume, ends
    bit-identical to the uninterrupted run; after each, everything on disk loads and progress never goes back.
    Seed 4 draws Ctrl-C, SIGKILL, Ctrl-C, SIGKILL, Ctrl-C twice, at 0.2-5 s into each process's training."""
    rng = random.Random(4)
    run, last = None, (-1, 0)
    for i in range(5):
        kind = rng.choice(["int", "int", "int2", "kill"])
        args = [cfgs["small"], "--resume", run] if run and (run / "last.ck").exists() else \
            [cfgs["small"], "--out", tmp_path / "out"]
        proc, folder = start(mnist_path, args, tmp_path / f"log{i}")
        if folder != run:  # a fresh run (the previous one was killed before its first checkpoint)
            run, last = folder, (-1, 0)
        time.sleep(rng.uniform(0.2, 5.0))
        if kind == "kill":
            proc.kill()
        else:
            proc.send_signal(signal.SIGINT)
            if kind == "int2":
                time.sleep(0.02)
                proc.send_signal(signal.SIGINT)
        rest = proc.stdout.read()
        code = proc.wait(timeout=120)
        err = (tmp_path / f"log{i}").read_text()
        assert "Traceback" not in err, err
        now = progress(run)
        if code == 0:  # finished before the signal landed
            assert "done:" in rest
            break
        if kind == "kill":
            assert code == -signal.SIGKILL
        else:
            assert code == 130, err
            msg = err.replace("\r", "\n").splitlines()[-1]
            assert ERROR.match(msg) and ("interrupted" in msg or "stopped at once" in msg), err
            assert f"--resume {run}" in msg
            if kind == "int":  # a single Ctrl-C always saves the finished mini-batches
                assert now > last and "saved" in msg
        assert now >= last, "a later checkpoint replaced by an earlier one"
        last = now
        assert_whole(run)
    p = nn(mnist_path, "train", cfgs["small"], "--resume", run)
    assert p.returncode == 0, p.stderr
    assert_whole(run)
    assert_same_run(ref, run)


def test_k_epochs_resumed_with_more_epochs_is_bit_identical(mnist_path, cfgs, ref, tmp_path):
    p = nn(mnist_path, "train", cfgs["small"], "--epochs", 1, "--out", tmp_path, "-q")
    assert p.returncode == 0, p.stderr
    run = Path(os.path.realpath(tmp_path / "latest"))
    assert len(metrics(run)) == 1
    again = nn(mnist_path, "train", cfgs["small"], "--resume", run, "--epochs", 1)  # already done
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
    p = nn(mnist_path, "train", cfgs["small"], "--resume", run / "last.ck", "--epochs", 2, "-q")
    assert p.returncode == 0, p.stderr
    # config.toml now says 2 epochs, as the reference's does (only the --out folders differ)
    a, b = config.load_config(run / "config.toml"), config.load_config(ref / "config.toml")
    a.train.out = b.train.out = ""
    assert a == b
    assert_same_run(ref, run)


def test_resume_refuses_a_different_split_or_optimiser(mnist_path, cfgs, ref, tmp_path):
    for old, new in (("seed = 3", "seed = 4"), ("val_split = 0.5", "val_split = 0.2"),
                     ('name = "adam"', 'name = "sgd"')):
        (tmp_path / "c.toml").write_text(CFG.replace(old, new))
        line = one_error_line(nn(mnist_path, "train", tmp_path / "c.toml", "--resume", ref))
        assert "cannot resume" in line and new.split(" = ")[0] in line
    assert "no training state" in one_error_line(nn(mnist_path, "train", cfgs["small"], "--resume", ref / "best.ck"))


@pytest.fixture(scope="module")
def mom_run(mnist_path, cfgs, tmp_path_factory) -> Path:
    """One good epoch with momentum SGD."""
    out = tmp_path_factory.mktemp("mom")
    p = nn(mnist_path, "train", cfgs["mom"], "--out", out, "-q")
    assert p.returncode == 0, p.stderr
    return Path(os.path.realpath(out / "latest"))


def snapshot(run: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in run.iterdir() if f.name != "config.toml"}


def test_divergence_stops_and_keeps_the_good_checkpoints(mnist_path, cfgs, mom_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(mom_run, run)
    plan = config.load_config(cfgs["diverge"])  # the run's own plan says lr 10 (a resume cannot change it)
    plan.train.epochs = 1
    (run / "config.toml").write_text(plan.to_toml())
    ck = checkpoint.load(run / "last.ck")
    ck.meta["config"] = plan.to_dict()
    checkpoint.save(run / "last.ck", ck)
    before = snapshot(run)
    line = one_error_line(nn(mnist_path, "train", cfgs["diverge"], "--resume", run, "--epochs", 2))
    assert re.search(r"training diverged at epoch 2, step \d+: .*try a smaller --lr", line), line
    assert snapshot(run) == before  # best.ck, last.ck and metrics.jsonl byte for byte


def test_disk_full_at_save_keeps_the_previous_checkpoint(mnist_path, cfgs, mom_run, tmp_path):
    """RLIMIT_FSIZE makes writes past 150 kB fail (EFBIG) as a full disk would: best.ck (100 kB) can still
    be written, last.ck (weights + velocity, 200 kB) cannot, so the old last.ck must survive intact."""
    run = tmp_path / "run"
    shutil.copytree(mom_run, run)
    old_last = (run / "last.ck").read_bytes()
    old_metrics = (run / "metrics.jsonl").read_bytes()

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    p = nn(mnist_path, "train", cfgs["mom"], "--resume", run, "--epochs", 2, "-q", preexec_fn=limit)
    line = one_error_line(p)
    assert "cannot save checkpoint" in line and "last.ck" in line and "unchanged" in line, line
    assert (run / "last.ck").read_bytes() == old_last
    assert (run / "metrics.jsonl").read_bytes() == old_metrics
    assert not [f for f in run.iterdir() if ".tmp-" in f.name]
    assert_whole(run)


def test_unwritable_out_fails_before_training(mnist_path, cfgs, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    t = time.perf_counter()
    line = one_error_line(nn(mnist_path, "train", cfgs["small"], "--out", tmp_path / "file" / "runs"))
    assert "cannot create the run folder" in line and "--out" in line, line
    assert time.perf_counter() - t < 60
    assert (tmp_path / "file").read_text() == "not a folder"


def test_check_space_refuses_a_nearly_full_disk(tmp_path, monkeypatch):
    from nn_numba import runs

    runs.check_space(tmp_path, 1000, 2)  # plenty of room
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**5, 10**5))
    with pytest.raises(NNError, match="not enough free space"):
        runs.check_space(tmp_path, 1000, 2)


def test_threads_out_of_range_get_a_sensible_answer(capsys):
    import numba

    from nn_numba import train

    limit, before = numba.config.NUMBA_NUM_THREADS, numba.get_num_threads()
    try:
        assert train.set_threads(0) == limit
        assert train.set_threads(limit + 100) == limit
        assert "more than the" in capsys.readouterr().out
        with pytest.raises(config.ConfigError):
            train.set_threads(-1)
    finally:
        numba.set_num_threads(before)


# ------------------------------------------------------------------------------------ hostile input


def peak(fn, *args) -> int:
    """Peak bytes Python allocated while fn(*args) raised an NNError (or returned)."""
    tracemalloc.start()
    try:
        fn(*args)
    except NNError:
        pass
    finally:
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return size


FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.one_of(st.binary(max_size=4000), st.text(max_size=2000).map(str.encode),
                 st.sampled_from(CFG.splitlines()).flatmap(lambda ln: st.text(max_size=40).map(
                     lambda t: (CFG.replace(ln, ln[:len(ln) // 2] + t)).encode()))))
def test_config_reader_only_raises_config_errors(tmp_path, raw):
    f = tmp_path / "c.toml"
    f.write_bytes(raw)
    assert peak(config.load_config, f) < 64 * len(raw) + (1 << 20)


values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=20),
                   st.lists(st.integers(-5, 10**6), max_size=5))
tables = st.dictionaries(st.sampled_from(["model", "data", "optim", "schedule", "augment", "train", "x"]),
                         st.dictionaries(st.sampled_from(["sizes", "dir", "val_split", "lr", "name", "epochs",
                                                          "batch_size", "out", "seed", "threads", "shift", "y"]),
                                         values, max_size=4), max_size=4)


@FAST
@given(tables)
def test_any_accepted_config_round_trips_through_its_toml(raw):
    """from_dict either refuses with a ConfigError or gives a config whose to_toml() reads back equal."""
    import tomllib

    try:
        cfg = config.from_dict(raw)
    except config.ConfigError:
        return
    assert config.from_dict(tomllib.loads(cfg.to_toml())) == cfg


@pytest.mark.parametrize("text, says", [
    ("", None),  # empty: all defaults
    ("[train]\nepochs = 1" + "0" * 400, "out of range"),
    ("[optim]\nlr = 1e999", "must be finite"),
    ("[model]\nsizes = [784, 100000, 100000, 10]", "parameters"),
    ("[train]\nbatch_size = 60000\n[model]\nsizes = [784, 20000, 10]", "activations"),
    ("[train]\nout = \"a\\u0000b\"", "NUL"),
    ("a = " + "[" * 50000 + "]" * 50000, "nested too deeply"),
    ("[train]\nepochs = \"ten\"", "whole number"),
])
def test_hostile_configs(tmp_path, text, says):
    f = tmp_path / "c.toml"
    f.write_text(text)
    if says is None:
        assert config.load_config(f) == config.Config()
        return
    with pytest.raises(config.ConfigError, match=says):
        config.load_config(f)


def test_config_reader_does_not_read_endless_files(tmp_path):
    with pytest.raises(config.ConfigError, match="not a regular file"):
        config.load_config("/dev/zero")
    with open(tmp_path / "big.toml", "wb") as f:
        f.truncate(10 << 20)
    with pytest.raises(config.ConfigError, match="larger than"):
        config.load_config(tmp_path / "big.toml")


def idx_header(kind: str, n: int, rows: int = 28, cols: int = 28) -> bytes:
    if kind == "labels":
        return struct.pack(">II", 0x801, n)
    return struct.pack(">IIII", 0x803, n, rows, cols)


idx_files = st.one_of(
    st.binary(max_size=3000),
    st.tuples(st.sampled_from(["images", "labels"]), st.integers(0, 2**32 - 1), st.sampled_from([28, 0, 2**31]),
              st.binary(max_size=3000)).map(lambda t: idx_header(t[0], t[1], t[2], 28) + t[3]),
    st.tuples(st.integers(0, 3), st.binary(max_size=20)).map(
        lambda t: idx_header("labels", t[0]) + bytes(t[0]) + t[1]),
)


@FAST
@given(idx_files, st.sampled_from(["images", "labels"]), st.booleans())
def test_idx_reader_only_raises_data_errors(tmp_path, raw, kind, gz):
    f = tmp_path / "x.idx"
    f.write_bytes(gzip.compress(raw, 1) if gz else raw)
    m = peak(data.read_idx, f, kind)
    assert m < 4 * len(raw) + (2 << 20)  # 1 MB read chunks; gzip: what really inflates, not the header's n


def test_idx_gzip_bomb_is_refused_before_inflating(tmp_path):
    f = tmp_path / "bomb.gz"
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    with open(f, "wb") as out:
        out.write(z.compress(idx_header("images", 2**31)))
        for _ in range(100):
            out.write(z.compress(bytes(1 << 20)))
        out.write(z.flush())
    assert peak(data.read_idx, f, "images") < 100 * f.stat().st_size + (64 << 20)


def good_checkpoint() -> bytes:
    return (ROOT / "tests" / "data" / "tiny.ck").read_bytes()


def with_crc(buf: bytes) -> bytes:
    return buf + struct.pack("<I", zlib.crc32(buf))


mutated = st.tuples(st.integers(0, 419), st.binary(min_size=0, max_size=40), st.integers(0, 40),
                    st.booleans()).map(
    lambda t: (lambda b: with_crc(b[:-4]) if t[3] and len(b) > 4 else b)(
        good_checkpoint()[:t[0]] + t[1] + good_checkpoint()[t[0] + t[2]:]))


@FAST
@given(st.one_of(st.binary(max_size=600), mutated))
def test_checkpoint_reader_only_raises_checkpoint_errors(tmp_path, raw):
    """Random bytes and a real checkpoint with bytes replaced, inserted or cut (with the CRC fixed up half of
    the time, so the structural checks behind it are reached)."""
    f = tmp_path / "x.ck"
    f.write_bytes(raw)
    assert peak(checkpoint.load, f) < 8 * len(raw) + (1 << 20)


def test_checkpoint_with_deeply_nested_meta(tmp_path):
    buf = good_checkpoint()[:-4]
    i = buf.index(b"META")
    (n,) = struct.unpack_from("<Q", buf, i + 8)
    deep = b"[" * 100_000 + b"]" * 100_000
    f = tmp_path / "deep.ck"
    f.write_bytes(with_crc(buf[:i + 8] + struct.pack("<Q", len(deep)) + deep + buf[i + 16 + n:]))
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(f)


def test_the_cli_never_prints_a_traceback(mnist_path, ref, tmp_path):
    """Bad inputs through the real command: one `nn-numba: error:` line and exit 1 (or click's usage, 2)."""
    t = tmp_path
    (t / "garbage.toml").write_bytes(bytes(range(256)) * 4)
    (t / "huge.toml").write_text("[model]\nsizes = [784, 99999, 99999, 10]")
    (t / "noise.ck").write_bytes(random.Random(0).randbytes(5000))
    (t / "short.ck").write_bytes((ref / "best.ck").read_bytes()[:50_000])
    (t / "digit.png").write_text("this is not a picture")
    cases = [
        (["train", t / "garbage.toml"], "not a text file"),
        (["train", t / "huge.toml"], "parameters"),
        (["train", t / "missing.toml"], "no such config file"),
        (["train", ROOT / "configs" / "default.toml", "--threads", "-1"], "threads"),
        (["train", ROOT / "configs" / "default.toml", "--resume", t / "noise.ck"], "not an nn-numba checkpoint"),
        (["evaluate", t / "noise.ck"], "noise.ck"),
        (["info", t / "short.ck"], "truncated"),
        (["predict", t / "digit.png", "--checkpoint", ref / "best.ck"], "digit.png"),
        (["train", ROOT / "configs" / "default.toml", "--epochs", "many"], None),  # click usage error
    ]
    procs = [subprocess.Popen([sys.executable, "-m", "nn_numba.cli", *map(str, args)], env=env(mnist_path),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args, _ in cases]
    for (args, says), proc in zip(cases, procs):
        out, err = proc.communicate(timeout=120)
        p = subprocess.CompletedProcess(args, proc.returncode, out, err)
        if says is None:
            assert p.returncode == 2 and "Usage:" in err and "Traceback" not in err, err
            continue
        assert p.returncode == 1, (args, err)
        assert says in one_error_line(p), (args, err)
