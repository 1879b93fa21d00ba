"""Hostile input, round two (issue 18, Python side): every case a user or an attacker tried that gave a
traceback, unbounded memory or time, or a misleading answer, each through the code path the user takes.

Readers must refuse what is not a regular file (a FIFO would block forever, /dev/zero never ends), read a
header before the payload it promises, and give only their module's one-line error.
"""

import gzip
import io
import json
import math
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_robustness import peak  # noqa: E402

import nn_numba.predict as P
from nn_numba import checkpoint, config, data
from nn_numba.errors import NNError, printable
from nn_numba.model import MLP

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """The real `nn-numba` command, stdout strict UTF-8 as PYTHONIOENCODING=utf-8:strict makes it."""
    e = os.environ | {"PYTHONIOENCODING": "utf-8:strict", "OPENBLAS_NUM_THREADS": "1"} | (env or {})
    return subprocess.run([sys.executable, "-m", "nn_numba.cli", *map(os.fsencode, map(str, args))], env=e,
                          cwd=ROOT, capture_output=True, timeout=timeout, **kw)


def error_line(p: subprocess.CompletedProcess) -> str:
    """The one `nn-numba: error:` line of a failed command (stderr as text, undecodable bytes escaped)."""
    err = p.stderr.decode("utf-8", "backslashreplace")
    assert p.returncode == 1, (p.returncode, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nn-numba: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("key", ["beta1", "beta2"])
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_beta_of_one_is_refused_before_any_run_folder(tmp_path, key, name):
    f = tmp_path / "c.toml"
    f.write_text(f'[optim]\nname = "{name}"\n{key} = 1.0\n[train]\nout = "{tmp_path / "runs"}"\n')
    with pytest.raises(config.ConfigError, match=rf"\[optim\] {key} = 1.0 is out of range \[0.0, 1.0\)"):
        config.load_config(f)
    if (key, name) == ("beta2", "sgd"):  # through the command once: one line, no run folder
        line = error_line(cli("train", f))
        assert key in line and "out of range" in line
        assert not (tmp_path / "runs").exists()


def test_beta_just_below_one_is_accepted(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[optim]\nbeta1 = 0.999999\nbeta2 = 0.9999999\n")
    assert config.load_config(f).optim.beta2 == 0.9999999


def test_utf8_bom_config_is_read(tmp_path):
    f = tmp_path / "bom.toml"
    f.write_bytes(b"\xef\xbb\xbf[train]\nepochs = 3\n")
    assert config.load_config(f).train.epochs == 3


def test_config_fifo_is_refused_not_waited_for(tmp_path):
    f = tmp_path / "fifo.toml"
    os.mkfifo(f)
    # in a child process: a blocking open would hang, and the timeout turns that into a failure
    assert "not a regular file" in error_line(cli("train", f, timeout=30))


def test_config_device_is_refused():
    with pytest.raises(config.ConfigError, match="not a regular file"):
        config.load_config("/dev/zero")


# -------------------------------------------------------------------------------------------- checkpoint


def mnist_model(path: Path, scale: float = 1.0, seed: int = 0, meta: dict | None = None) -> Path:
    """A 784-16-10 checkpoint with He-initialised weights times `scale`."""
    m = MLP.init([784, 16, 10], np.random.default_rng(seed))
    ws = [w * np.float32(scale) for w in m.weights]
    checkpoint.save(path, checkpoint.Checkpoint(m.sizes, ws, m.biases, meta or {"epoch": 1}))
    return path


def limited(gb: float):
    """preexec_fn: the child may map at most `gb` GB, so a reader that runs away fails fast."""
    def set_limit():
        resource.setrlimit(resource.RLIMIT_AS, (int(gb * 2**30), int(gb * 2**30)))
    return set_limit


def test_checkpoint_link_to_dev_zero_is_refused(tmp_path):
    link = tmp_path / "zero.ck"
    link.symlink_to("/dev/zero")
    # in a child allowed 2 GB: a reader that reads /dev/zero to its end fails there, not on this machine
    assert "not a regular file (a character device)" in error_line(cli("info", link, timeout=60,
                                                                       preexec_fn=limited(2)))


@pytest.mark.parametrize("args", [["info", "{f}"], ["evaluate", "{f}"], ["predict", "x.png", "--checkpoint", "{f}"],
                                  ["train", "configs/default.toml", "--resume", "{f}"]])
def test_checkpoint_fifo_is_refused_not_waited_for(tmp_path, args):
    f = tmp_path / "fifo.ck"
    os.mkfifo(f)
    line = error_line(cli(*[a.format(f=f) for a in args], timeout=30))
    assert "not a regular file (a FIFO" in line and str(f) in line


def test_non_checkpoint_is_refused_after_its_first_bytes(tmp_path):
    f = tmp_path / "big.ck"
    with open(f, "wb") as out:
        out.write(b"PK\x03\x04")  # a zip, say
        out.truncate(256 << 20)  # sparse: costs no disk
    assert peak(checkpoint.load, f) < 64 << 10


def test_header_promising_more_than_the_file_holds_is_refused_before_reading(tmp_path):
    """A valid header for 784-1000000-10 (3 GB of weights) in a 256 MB file: truncated, found from the header."""
    sizes = [784, 1_000_000, 10]
    f = tmp_path / "liar.ck"
    with open(f, "wb") as out:
        out.write(struct.pack("<4s5I3I", b"NNCK", 1, 36, 1, 1, 2, *sizes))
        out.truncate(256 << 20)
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load(f)
    assert peak(checkpoint.load, f) < 64 << 10


@pytest.mark.parametrize("pad", range(4))
def test_loading_costs_about_the_file_size(tmp_path, pad):
    """A 784-250-250-10 checkpoint with Adam state (3.2 MB): the file once, plus small change. META of
    each length mod 4, so OPTM's floats start at every alignment; every array comes back aligned."""
    m = MLP.init([784, 250, 250, 10], np.random.default_rng(0))
    flat = [a for wb in zip(m.weights, m.biases) for a in wb]
    optim = checkpoint.OptimState("adam", 5, [[a + 1 for a in flat], [a * 2 for a in flat]])
    f = tmp_path / "big.ck"
    checkpoint.save(f, checkpoint.Checkpoint(m.sizes, m.weights, m.biases, {"e": "x" * pad}, optim))
    ck = checkpoint.load(f)
    got = [a for wb in zip(ck.weights, ck.biases) for a in wb] + ck.optim.slots[0] + ck.optim.slots[1]
    want = flat + optim.slots[0] + optim.slots[1]
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b) and a.dtype == np.float32
        assert a.flags.writeable and a.flags.aligned and a.flags.c_contiguous
    assert peak(checkpoint.load, f) < f.stat().st_size + (256 << 10)


# ------------------------------------------------------------------------------------------------- IDX


def test_gzip_bomb_claiming_a_million_images_is_refused_before_inflating(tmp_path, mnist_path):
    """800 KB of gzip that inflates to 784 MB, its IDX header claiming 1,000,000 images (under the general cap)."""
    mb = gzip.compress(bytes(1 << 20), 9)  # one gzip member per MB: the reader accepts members back to back
    folder = tmp_path / "mnist"
    folder.mkdir()
    bomb = folder / "train-images-idx3-ubyte.gz"
    with open(bomb, "wb") as f:
        f.write(gzip.compress(struct.pack(">IIII", 0x803, 1_000_000, 28, 28)))
        for _ in range(748):
            f.write(mb)
    assert bomb.stat().st_size < 1 << 20
    for name in data.FILES:
        if not (folder / name).exists():
            (folder / name).symlink_to(mnist_path / name)
    with pytest.raises(data.DataError, match="header claims 1000000 images, expected 60000"):
        data.load_mnist(str(folder))
    assert peak(data.load_mnist, str(folder)) < 4 << 20  # two 1 MB read buffers; not the 748 MB inside


def test_idx_fifo_is_refused_not_waited_for(tmp_path):
    f = tmp_path / "fifo.idx"
    os.mkfifo(f)
    code = f"from nn_numba import data\ndata.read_idx({str(f)!r}, 'images')"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert "DataError" in p.stderr and "not a regular file (a FIFO" in p.stderr, p.stderr


# -------------------------------------------------------------------------------- what the user is shown


def test_printable_escapes_what_a_terminal_would_act_on():
    assert printable("a\nb\x1b[31mc\x00\x7f\x9b") == "a\\nb\\x1b[31mc\\x00\\x7f\\x9b"
    assert printable(os.fsdecode(b"digit\xff.png")) == "digit\\xff.png"  # the byte, as ls -b shows it
    assert printable("x\ud800y") == "x\\ud800y"
    assert printable("réponse 数字 ✓\u202fz") == "réponse 数字 ✓\u202fz"  # printable Unicode stays


def with_meta_text(path: Path, text: str) -> Path:
    """A 784-16-10 checkpoint whose META JSON text is exactly `text` (CRC recomputed)."""
    buf = mnist_model(path, meta={"producer": "@" * len(text)}).read_bytes()[:-4]
    buf = buf.replace(b'"' + b"@" * len(text) + b'"', b'"' + text.encode() + b'"')
    path.write_bytes(buf + struct.pack("<I", zlib.crc32(buf)))
    return path


def test_info_escapes_meta_and_undecodable_names(tmp_path):
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/bad\xff.ck")
    with_meta_text(Path(name), "lone \\ud800 then \\u001b[2J\\u001b[31mred")
    assert checkpoint.load(name).meta["producer"] == "lone \ud800 then \x1b[2J\x1b[31mred"
    p = cli("info", name)
    out = p.stdout.decode("utf-8")  # strict: the output is UTF-8
    assert p.returncode == 0 and "Traceback" not in p.stderr.decode(), p.stderr
    assert "\x1b" not in out and "lone \\ud800 then \\x1b[2J\\x1b[31mred" in out
    assert "bad\\xff.ck" in out
    js = cli("info", name, "--json")
    assert json.loads(js.stdout)["producer"] == "lone \ud800 then \x1b[2J\x1b[31mred"


def test_errors_name_undecodable_files_in_one_line(tmp_path):
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/no\xff\nsuch.ck")
    line = error_line(cli("info", name))
    assert "no\\xff\\nsuch.ck: file not found" in line


# -------------------------------------------------------------------------------------------------- predict


def digit_png(path: Path, side: int = 280, width: int = 24) -> Path:
    """A '7' in black ink on white paper, side x side pixels, strokes `width` px wide."""
    a = np.full((side, side), 255, np.uint8)
    u = side // 10
    a[2 * u:2 * u + width, 2 * u:8 * u] = 0  # the bar
    for r in range(2 * u, 9 * u):  # the diagonal
        c = 8 * u - (r - 2 * u) * 5 * u // (7 * u)
        a[r, max(c - width, 0):c] = 0
    Image.fromarray(a).save(path)
    return path


def test_nan_and_cielab_tiffs_are_errors_for_that_image_only(tmp_path, capsys):
    nan = np.zeros((40, 40), np.float32)
    nan[10:30, 18:22] = 1.0
    nan[0, 0] = np.nan
    Image.fromarray(nan, mode="F").save(tmp_path / "nan.tif")
    Image.new("LAB", (40, 40), (100, 128, 128)).save(tmp_path / "lab.tif")
    good = digit_png(tmp_path / "good.png")
    for name, says in (("nan.tif", "NaN or infinite pixel values"), ("lab.tif", None)):
        try:
            P.preprocess(tmp_path / name)
        except P.ImageError as e:
            assert says is None or says in str(e)
    rc = P.predict_images([str(tmp_path / "nan.tif"), str(tmp_path / "lab.tif"), str(good)], Uniform())
    out, err = capsys.readouterr()
    assert rc == 1 and out.startswith(f"{good}: ") and out.count("\n") == 1, out
    errs = err.splitlines()
    assert len(errs) == 2 and "nan.tif: " in errs[0] and "lab.tif: " in errs[1], err


def test_cielab_lightness_is_read_as_grey(tmp_path):
    grey = digit_png(tmp_path / "g.png")
    lab = Image.merge("LAB", [Image.open(grey), Image.new("L", (280, 280), 128), Image.new("L", (280, 280), 128)])
    lab.save(tmp_path / "lab.tif")
    np.testing.assert_array_equal(P.preprocess(tmp_path / "lab.tif"), P.preprocess(grey))


class Uniform:
    """A stand-in model: every digit equally likely (the answer does not matter where it is used)."""

    def predict_proba(self, X):
        return np.full((len(X), 10), 0.1, np.float32)


def peak_rss(args: list, tmp: Path) -> tuple[float, subprocess.CompletedProcess]:
    """Peak resident memory (MB) of `nn-numba ARGS` run in a child, and its result."""
    with open(tmp / "out", "w+b") as out, open(tmp / "err", "w+b") as err:
        proc = subprocess.Popen([sys.executable, "-m", "nn_numba.cli", *map(str, args)], cwd=ROOT, stdout=out,
                                stderr=err, env=os.environ | {"OPENBLAS_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return usage.ru_maxrss / 1024, subprocess.CompletedProcess(args, proc.returncode, out.read(), err.read())


def test_a_huge_sparse_picture_costs_what_a_small_one_does(tmp_path):
    """A 7000x7000 RGB PNG of a thin line (about 100 KB): read at a reduced size, not processed at 49 Mpx."""
    a = np.full((7000, 7000, 3), 255, np.uint8)
    a[1000:6000, 3500:3503] = 0  # a '1' drawn with a 3-px pen
    Image.fromarray(a).save(tmp_path / "big.png", optimize=False)
    del a
    small = digit_png(tmp_path / "small.png")  # for the memory of an ordinary run
    ck = mnist_model(tmp_path / "m.ck")
    big_mb, p = peak_rss(["predict", tmp_path / "big.png", "--checkpoint", ck], tmp_path)
    assert p.returncode == 0, p.stderr
    small_mb, q = peak_rss(["predict", small, "--checkpoint", ck], tmp_path)
    assert q.returncode == 0, q.stderr
    assert big_mb < small_mb + 250, (big_mb, small_mb)  # the RGB pixels once (147 MB), then a reduced copy
    x = P.preprocess(tmp_path / "big.png")
    x = x.reshape(28, 28)  # still a vertical stroke: ink in every row of the box, all of it in the middle
    assert x[5:23].max(axis=1).min() > 0.5 and x[:, :11].max() == 0 and x[:, 17:].max() == 0


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_a_large_picture_read_reduced_gives_what_it_gives_read_whole(tmp_path, monkeypatch, fmt):
    big = digit_png(tmp_path / "big.png", side=3000, width=200)
    if fmt == "jpeg":
        Image.open(big).save(tmp_path / "big.jpg", quality=90)
        big = tmp_path / "big.jpg"
    reduced = P.preprocess(big)
    assert max(P.load_image(big).size) <= 1024
    monkeypatch.setattr(P, "MAX_SIDE", 10**6)
    whole = P.preprocess(big)
    assert np.abs(reduced - whole).mean() < 0.01 and np.abs(reduced - whole).max() < 0.15


def test_results_are_printed_as_each_image_is_read(tmp_path, monkeypatch):
    for i in range(4):
        digit_png(tmp_path / f"{i}.png", side=60, width=6)
    read = []
    real = P.load_image
    monkeypatch.setattr(P, "load_image", lambda f, *a, **kw: read.append(f) or real(f, *a, **kw))

    class Out:
        seen: list = []

        def write(self, s):
            if s.strip():
                self.seen.append((len(read), s))

        def flush(self):
            pass

    out = Out()
    assert P.predict_images([str(tmp_path)], Uniform(), out=out) == 0
    assert [n for n, _ in out.seen] == [1, 2, 3, 4]  # line k is out before image k + 1 is read


def test_names_with_newlines_and_undecodable_bytes_stay_one_line(tmp_path):
    ck = mnist_model(tmp_path / "m.ck")
    nl = digit_png(tmp_path / "a\nb.png", side=60, width=6)
    raw = os.fsdecode(os.fsencode(str(tmp_path)) + b"/c\xff.png")
    digit_png(Path(raw), side=60, width=6)
    p = cli("predict", nl, raw, tmp_path / "missing\x1b[2J.png", "--checkpoint", ck)
    out, err = p.stdout.decode("utf-8"), p.stderr.decode("utf-8")  # strict: both are UTF-8
    assert p.returncode == 1 and "Traceback" not in err, err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{tmp_path}/a\\nb.png: ") and "c\\xff.png: " in lines[1]
    assert err.count("\n") == 1 and "missing\\x1b[2J.png: no such file" in err
    recs = [json.loads(line) for line in cli("predict", nl, "--checkpoint", ck, "--json").stdout.splitlines()]
    assert [r["path"] for r in recs] == [str(nl)]


def strict_json(line: str):
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON: {line}"))


def test_huge_weights_are_an_error_not_nan(tmp_path, mnist_path):
    """Finite weights of 1e30 make the logits overflow: no 'nan%' answer, no NaN in JSON, exit 1."""
    ck = mnist_model(tmp_path / "huge.ck", scale=1e30)
    fine = mnist_model(tmp_path / "m.ck", scale=1e15)  # large but finite logits: a real (bad) answer
    img = digit_png(tmp_path / "seven.png", side=60, width=6)
    runs = {"text": ["predict", img, "--checkpoint", ck], "json": ["predict", img, "--checkpoint", ck, "--json"],
            "eval": ["evaluate", ck, "--json"], "fine": ["evaluate", fine, "--json"]}
    e = os.environ | {"NN_NUMBA_DATA": str(mnist_path), "OPENBLAS_NUM_THREADS": "1"}
    procs = {k: subprocess.Popen([sys.executable, "-m", "nn_numba.cli", *map(str, a)], env=e, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, a in runs.items()}
    p = {k: subprocess.CompletedProcess(runs[k], None, *pr.communicate(timeout=300)) for k, pr in procs.items()}
    for k, pr in procs.items():
        p[k].returncode = pr.returncode
    for k in ("text", "json"):
        line = error_line(p[k])
        assert p[k].stdout == b"" and "seven.png: the network's outputs overflow" in line, line
    assert "outputs overflow" in error_line(p["eval"]) and p["eval"].stdout == b""
    assert p["fine"].returncode == 0 and strict_json(p["fine"].stdout)["loss"] > 1e10


def test_evaluate_names_an_undecodable_checkpoint(tmp_path, mnist_path):
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/m\xff.ck")
    mnist_model(Path(name))
    p = cli("evaluate", name, env={"NN_NUMBA_DATA": str(mnist_path)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode("utf-8").startswith(f"{tmp_path}/m\\xff.ck: test accuracy")


# -------------------------------------------------------------------------------------------------- report


def fake_run(folder: Path, rows: list, **cfg) -> Path:
    """A run folder as train writes it: config.toml, metrics.jsonl (rows as given) and a 784-16-10 best.ck."""
    folder.mkdir(parents=True)
    c = config.from_dict({"model": {"sizes": [784, 16, 10]}, **cfg})
    (folder / "config.toml").write_text(c.to_toml())
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mnist_model(folder / "best.ck", meta={"epoch": 1})
    return folder


def row(epoch: int, spe: int, **kw) -> dict:
    r = {"epoch": epoch, "step": epoch * spe, "lr": 0.001, "train_loss": 0.5 / epoch, "train_acc": 0.8,
         "val_loss": 0.6 / epoch, "val_acc": 0.75, "test_loss": 0.6 / epoch, "test_acc": 0.76, "seconds": 2.0,
         "samples_per_s": 27000.0}
    return r | kw


def test_report_with_null_and_mistyped_metrics_still_writes_everything(tmp_path, mnist_path):
    spe = 844  # 54,000 training images in batches of 64
    rows = [row(1, spe, val_loss=None, test_acc=None), row(2, spe, train_loss="abc", lr=[1], seconds=None),
            row(3, spe, val_acc=True)]
    run = fake_run(tmp_path / "run", rows, train={"epochs": 3})
    from nn_numba import report

    [s] = report.report([str(run)], data_dir=str(mnist_path), quiet=True)
    md = (run / "report" / "report.md").read_text()
    for f in ("curves", "confusion", "mistakes", "lr"):
        assert (run / "report" / f"{f}.png").stat().st_size > 1000
    assert "nan" not in md.lower()
    table = [ln for ln in md.splitlines() if ln.startswith("| 1 |") or ln.startswith("| 2 |")]
    assert len(table) == 2 and table[0].count("| - |") == 2 and table[1].count("| - |") >= 2, table
    assert "metrics.jsonl" in md and "not a number" in md  # the page says which values it could not use
    assert s["best_epoch"] == 1  # epoch 3's val_acc (true) is not a number: epochs 1 and 2 tie at 0.75


def test_report_cost_follows_the_epochs_run_not_planned(tmp_path, mnist_path, monkeypatch):
    """A run planned for 3,000 epochs (one step each), two of them run: the schedule is computed for what
    was run and a bounded stretch of the plan, not for every planned step (100,000 epochs of 844 steps
    took 386 s and 7 GB)."""
    from nn_numba import report, schedule

    calls = []
    real = schedule.lr_at
    monkeypatch.setattr(schedule, "lr_at", lambda *a: calls.append(a[1]) or real(*a))
    run = fake_run(tmp_path / "run", [row(1, 1), row(2, 1)], train={"epochs": 3000, "batch_size": 54_000},
                   schedule={"name": "cosine", "warmup_epochs": 0.5})
    [s] = report.report([str(run)], data_dir=str(mnist_path), quiet=True)
    assert s["lr_gap"] < 1  # computed at the recorded steps
    assert len(calls) < 100 and max(calls) < 100, (len(calls), max(calls))


def test_report_on_huge_weights_is_one_error(tmp_path, mnist_path):
    run = fake_run(tmp_path / "run", [row(1, 844)])
    mnist_model(run / "best.ck", scale=1e30)
    line = error_line(cli("report", run, env={"NN_NUMBA_DATA": str(mnist_path)}))
    assert "best.ck: the network's outputs overflow" in line and not (run / "report").exists()


def test_saving_a_lone_surrogate_in_meta_is_a_checkpoint_error(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="meta is not valid JSON"):
        mnist_model(tmp_path / "m.ck", meta={"producer": "x\ud800"})
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- property tests
# Each reader, fed what Hypothesis makes up, ends in its own module's error or a result, never another
# exception, within the memory its input justifies. Small example counts keep each under a few seconds.

FAST = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
sizes_st = st.lists(st.one_of(st.sampled_from([0, 1, 10, 784, 10**6, 10**6 + 1, 2**32 - 1]), st.integers(0, 2**32 - 1)),
                    min_size=1, max_size=70)


@st.composite
def crafted_checkpoints(draw) -> bytes:
    """A header with any L and sizes (often lying: huge sizes, a wrong header_bytes), some payload, then
    sections with any tag and a length up to 2^64 - 1, the CRC fixed up half of the time."""
    sizes = draw(sizes_st)
    L = draw(st.one_of(st.just(len(sizes) - 1), st.integers(0, 2**32 - 1)))
    hb = draw(st.one_of(st.just(24 + 4 * len(sizes)), st.integers(0, 2**32 - 1)))
    buf = struct.pack(f"<4s5I{len(sizes)}I", b"NNCK", 1, hb, 1, 1, L, *sizes)
    buf += draw(st.binary(max_size=600))
    for _ in range(draw(st.integers(0, 3))):
        tag = draw(st.sampled_from([b"META", b"OPTM", b"XTRA", b"\xff\x00ab"]))
        n = draw(st.one_of(st.integers(0, 64), st.sampled_from([2**31, 2**63, 2**64 - 1])))
        buf += struct.pack("<4sIQ", tag, draw(st.sampled_from([0, 1])), n) + draw(st.binary(max_size=64))
    return buf + struct.pack("<I", zlib.crc32(buf) if draw(st.booleans()) else draw(st.integers(0, 2**32 - 1)))


@FAST
@given(crafted_checkpoints())
def test_property_crafted_checkpoint_headers(tmp_path, raw):
    f = tmp_path / "x.ck"
    f.write_bytes(raw)
    try:
        checkpoint.describe(f)
    except checkpoint.CheckpointError as e:
        assert "\n" not in str(e)
    assert peak(checkpoint.load, f) < len(raw) + (128 << 10)  # the file once, plus small change


@FAST
@given(st.sampled_from(["images", "labels"]), st.integers(0, 2**32 - 1), st.sampled_from([28, 27, 0, 2**32 - 1]),
       st.binary(max_size=2000), st.booleans(), st.sampled_from([None, 0, 3, 10000]))
def test_property_idx_headers_against_a_count(tmp_path, kind, n, side, body, gz, count):
    head = struct.pack(">II", 0x801, n) if kind == "labels" else struct.pack(">IIII", 0x803, n, side, 28)
    raw = head + body
    f = tmp_path / "x.idx"
    f.write_bytes(gzip.compress(raw, 1) if gz else raw)
    try:
        a = data.read_idx(f, kind, count)
        assert count is None or len(a) == count
    except data.DataError as e:
        assert "\n" not in str(e)
    assert peak(data.read_idx, f, kind, count) < 4 * len(raw) + (3 << 20)


betas = st.one_of(st.floats(0, 1), st.sampled_from([1.0, 1 - 2**-53, 0.0]), st.integers(0, 2))


@FAST
@given(betas, betas, st.booleans())
def test_property_accepted_betas_never_divide_by_zero(tmp_path, b1, b2, bom):
    f = tmp_path / "c.toml"
    text = f"[optim]\nbeta1 = {b1!r}\nbeta2 = {b2!r}\n"
    f.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    try:
        o = config.load_config(f).optim
    except config.ConfigError:
        return
    for t in (1, 2, 10**6):  # the bias corrections of train_step
        assert math.isfinite(1.0 / (1.0 - o.beta1**t)) and math.isfinite(1.0 / (1.0 - o.beta2**t))


def small_picture(fmt: str, mode: str) -> bytes:
    a = np.zeros((12, 10), np.uint8)
    a[2:10, 4:6] = 255
    im = Image.fromarray(a).convert(mode)
    b = io.BytesIO()
    im.save(b, format=fmt)
    return b.getvalue()


PICTURES = [small_picture(f, m) for f, m in (("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"), ("TIFF", "F"),
                                             ("TIFF", "I;16"), ("TIFF", "CMYK"), ("GIF", "P"), ("BMP", "RGB"),
                                             ("JPEG", "L"), ("WEBP", "RGB"), ("TIFF", "LAB"))]


@FAST
@given(st.sampled_from(PICTURES), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6),
       st.one_of(st.none(), st.integers(8, 2000)))
def test_property_damaged_pictures_are_image_errors(tmp_path, pic, flips, cut):
    """Small real pictures in eleven formats and modes, bytes changed and cut: a result or an ImageError."""
    b = bytearray(pic)
    for i, v in flips:
        if i < len(b):
            b[i] = v
    f = tmp_path / "x.img"
    f.write_bytes(bytes(b[:cut]))
    try:
        x = P.preprocess(f)
        assert x.shape == (784,) and np.isfinite(x).all()
    except P.ImageError as e:
        assert "\n" not in str(e)


def report_keys() -> tuple[str, ...]:
    from nn_numba import report

    return report.NEED


metric_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**20), st.floats(), st.text(max_size=5),
                          st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.none()))


@FAST
@given(st.lists(st.dictionaries(st.sampled_from([*report_keys(), "val_acc", "val_loss", "samples_per_s"]),
                                metric_values, min_size=6), max_size=4))
def test_property_metrics_rows_give_rows_or_one_error(tmp_path, rows):
    from nn_numba import report

    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        hist, notes = report.read_metrics(f)
    except NNError as e:
        assert "\n" not in str(e)
        return
    for r in hist:
        assert all(isinstance(r[k], int) for k in ("epoch", "step"))
        assert all(isinstance(v, float) and (math.isnan(v) or math.isfinite(v)) or isinstance(v, int) and
                   not isinstance(v, bool) for v in r.values())


def test_predict_refuses_a_fifo_as_a_picture(tmp_path):
    f = tmp_path / "pipe.png"
    os.mkfifo(f)
    ck = mnist_model(tmp_path / "m.ck")
    assert "pipe.png: not a regular file" in error_line(cli("predict", f, "--checkpoint", ck, timeout=30))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # ~1.5 s each
@given(st.lists(st.fixed_dictionaries({k: metric_values for k in ("lr", "train_loss", "test_acc", "val_acc")} |
                                      {"epoch": st.integers(0, 2**64), "step": st.integers(0, 2**64)}),
                min_size=1, max_size=4))
def test_property_any_metrics_rows_can_be_plotted(tmp_path, rows):
    """Whatever numbers metrics.jsonl holds, the curves and the schedule plot are drawn (matplotlib runs)."""
    from nn_numba import report

    f = tmp_path / "metrics.jsonl"
    full = [row(1, 1) | r for r in rows]
    f.write_text("".join(json.dumps(r) + "\n" for r in full))
    hist, _ = report.read_metrics(f)
    if not hist:
        return
    cfg = config.from_dict({"train": {"epochs": 100_000, "batch_size": 64}})
    run = report.Run(tmp_path, cfg, hist, None)
    report.plot_curves(run, tmp_path / "c.png")
    report.plot_lr(run, tmp_path / "lr.png")


def test_raw_names_the_size_in_the_file_not_the_reduced_one(tmp_path):
    big = digit_png(tmp_path / "big.png", side=2048, width=100)
    with pytest.raises(P.ImageError, match="--raw needs a 28x28 MNIST-style image, got 2048x2048"):
        P.preprocess(big, raw=True)
