"""Hostile input, round two (issue 18, Python side): every case a user or an attacker tried that gave a
traceback, unbounded memory or time, or a misleading answer, each through the code path the user takes.

Readers must refuse what is not a regular file (a FIFO would block forever, /dev/zero never ends), read a
header before the payload it promises, and give only their module's one-line error.
"""

import gzip
import os
import resource
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from nn_numba import checkpoint, config, data
from nn_numba.errors import NNError
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
    line = error_line(cli("train", f))
    assert key in line and "out of range" in line
    assert not (tmp_path / "runs").exists()  # nothing left behind


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


def peak(fn, *args) -> int:
    """Peak bytes allocated (Python and NumPy) while fn(*args) runs; its NNError is swallowed."""
    tracemalloc.start()
    try:
        fn(*args)
    except NNError:
        pass
    finally:
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return size


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


def test_loading_costs_about_the_file_size(tmp_path):
    """A 784-250-250-10 checkpoint with Adam state (3.2 MB): the file once, plus small change."""
    m = MLP.init([784, 250, 250, 10], np.random.default_rng(0))
    optim = checkpoint.OptimState("adam", 5, [[a.copy() for wb in zip(m.weights, m.biases) for a in wb]] * 2)
    f = tmp_path / "big.ck"
    checkpoint.save(f, checkpoint.Checkpoint(m.sizes, m.weights, m.biases, {"epoch": 1}, optim))
    ck = checkpoint.load(f)
    assert np.array_equal(ck.weights[0], m.weights[0]) and ck.weights[0].flags.writeable
    assert ck.weights[0].flags.aligned and ck.weights[0].flags.c_contiguous
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
