"""The package as a user gets it: a wheel, installed into a fresh venv outside the repository, trains a
shipped config by name from an empty folder.

Offline and quick: the wheel is built with this venv's setuptools (no build isolation), installed
without dependencies, and the new venv finds NumPy, Numba & co. in this venv's site-packages through a
.pth file. Only the wheel provides nn_numba (checked). Numba compiles the kernels afresh for the
installed copy, which is most of this test's time.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

NAMES = ["default", "best", "no-augment", "seed"]


def sh(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """nn_numba-*.whl built from a copy of the sources the package needs (nothing else from the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT / "nn_numba", src / "nn_numba", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
       "-w", tmp / "dist", src)
    [whl] = (tmp / "dist").glob("nn_numba-*.whl")
    return whl


def test_the_wheel_holds_the_configs_once(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(f"nn_numba/configs/{p.name}" for p in (ROOT / "nn_numba" / "configs").glob("*.toml"))
    assert sorted(n for n in names if n.endswith(".toml")) == shipped
    assert {f"nn_numba/configs/{n}.toml" for n in NAMES} <= set(shipped)
    assert not any(n.startswith(("tests/", "configs/", "cpp/")) for n in names)


def test_installed_wheel_trains_a_shipped_config_by_name(wheel, tmp_path, mnist_path):
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    purelib = sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(purelib, "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # numpy, numba, ...
    sh(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel)

    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NUMBA_CACHE_DIR")}
    env["NN_NUMBA_DATA"] = str(mnist_path)
    where = sh(py, "-c", "import nn_numba; print(nn_numba.__file__)", cwd=work, env=env).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the wheel's copy, not the repository's

    listing = sh(venv / "bin" / "nn-numba", "configs", cwd=work, env=env).stdout
    assert [line.split()[0] for line in listing.splitlines()[:4]] == NAMES
    r = sh(venv / "bin" / "nn-numba", "train", "no-augment", "--epochs", "1", "--batch-size", "512", "--quiet",
           cwd=work, env=env, timeout=900)
    assert "done: best epoch 1" in r.stdout
    runs = [p for p in (work / "runs").iterdir() if p.name != "latest"]
    assert len(runs) == 1 and (runs[0] / "best.ck").is_file() and (work / "runs" / "latest" / "best.ck").is_file()
    assert "weight_decay = 0.0001" in (runs[0] / "config.toml").read_text()  # no-augment.toml's own value
