"""Shared test set-up.

OpenBLAS threads left spinning by a NumPy matmul slow Numba's parallel kernels tenfold on this 2-core
machine, so the float64 references below use BLAS with one thread only.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def mnist_dir() -> Path:
    """Real MNIST: $NN_NUMBA_DATA (CI points it at ../shared/mnist), else ../shared/mnist beside the
    project, else the per-user cache, which a newcomer's first test run fills from the public mirrors."""
    if os.environ.get("NN_NUMBA_DATA"):
        return Path(os.environ["NN_NUMBA_DATA"]).resolve()
    shared = ROOT.parent / "shared" / "mnist"
    if (shared / "train-images-idx3-ubyte.gz").exists():
        return shared.resolve()
    from nn_numba.data import download_command

    return download_command(None)


@pytest.fixture(scope="session")
def mnist_path() -> Path:
    d = mnist_dir()
    if not (d / "train-images-idx3-ubyte.gz").exists() and not (d / "train-images-idx3-ubyte").exists():
        pytest.fail(f"real MNIST not found in {d}: set NN_NUMBA_DATA to the folder with the four IDX files")
    return d


@pytest.fixture
def nn_main(monkeypatch, capsys):
    """nn_main("export", ...) runs the command in this process: (exit code, stdout, stderr)."""
    import sys

    from nn_numba import cli

    def command(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["nn-numba", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            cli.main()
        out, err = capsys.readouterr()
        return e.value.code, out, err

    return command
