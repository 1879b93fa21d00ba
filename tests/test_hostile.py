"""Hostile input, round two (issue 18, Python side): every case a user or an attacker tried that gave a
traceback, unbounded memory or time, or a misleading answer, each through the code path the user takes.

Readers must refuse what is not a regular file (a FIFO would block forever, /dev/zero never ends), read a
header before the payload it promises, and give only their module's one-line error.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nn_numba import config

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real `nn-numba` command, stdout strict UTF-8 as PYTHONIOENCODING=utf-8:strict makes it."""
    e = os.environ | {"PYTHONIOENCODING": "utf-8:strict", "OPENBLAS_NUM_THREADS": "1"} | (env or {})
    return subprocess.run([sys.executable, "-m", "nn_numba.cli", *map(os.fsencode, map(str, args))], env=e,
                          cwd=ROOT, capture_output=True, timeout=timeout)


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
