"""Ctrl-C while `nn-numba train` starts (loading MNIST, compiling the kernels): exit code 130 and one line."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

LINE = "nn-numba: error: interrupted (Ctrl-C)\n"


def _start(tmp_path, mnist_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}  # empty cache
    return subprocess.Popen([sys.executable, "-m", "nn_numba.cli", "train", str(ROOT / "configs" / "default.toml"),
                             "--out", str(tmp_path / "runs"), "--data-dir", str(mnist_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop(p):
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    return p.returncode, err


def test_ctrl_c_while_compiling(tmp_path, mnist_path):
    p = _start(tmp_path, mnist_path)
    seen = ""
    for line in p.stdout:  # the compile notice, then the augmentation line just before the compile starts
        seen += line
        if line.startswith("augment ") and "compiling kernels" in seen:
            break
    else:
        pytest.fail(f"no compile notice: {p.wait()} {p.stderr.read()}")
    code, err = _stop(p)
    assert code == 130 and err.count("\n") == 1, err
    # the signal lands in the compile (or, on a busy machine, in the few statements before it)
    assert err.startswith("nn-numba: error: interrupted"), err
    if "before the first step" in err:
        assert "nothing was trained" in err, err
    assert not list((tmp_path / "runs").glob("*/*.ck"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see the open data file")
def test_ctrl_c_while_loading_data(tmp_path, mnist_path):
    p = _start(tmp_path, mnist_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:  # until it has the training images open
        try:
            if any("train-images" in os.readlink(f) for f in Path(f"/proc/{p.pid}/fd").iterdir()):
                break
        except OSError:  # an fd closed while we looked
            pass
        time.sleep(0.002)
    else:
        p.kill()
        pytest.fail("never saw the training images open")
    assert _stop(p) == (130, LINE)
