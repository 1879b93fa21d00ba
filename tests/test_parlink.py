"""parlink: a parallel loop whose wrappers are compiled by linking alone computes what Numba's own compile
computes, and loads from the cache like it."""

import os
import subprocess
import sys

SCRIPT = '''
import sys
import numpy as np
from numba import njit, prange
if sys.argv[1] == "parlink":
    from nn_numba import parlink
    assert parlink.install()


@njit(parallel=True, cache=True)
def rows(x, out):
    for i in prange(x.shape[0]):
        s = np.float32(0)
        for j in range(x.shape[1]):
            s += x[i, j] * np.float32(1.5) - np.float32(0.25)
        out[i] = max(s, np.float32(0))


x = np.random.default_rng(0).standard_normal((300, 37)).astype(np.float32)
out = np.zeros(300, np.float32)
rows(x, out)
print(out.tobytes().hex(), len(rows.stats.cache_hits))
'''


def _run(tmp_path, mode: str, cache: str) -> tuple[str, int]:
    script = tmp_path / "k.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / cache)}
    r = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    values, hits = r.stdout.split()
    return values, int(hits)


def test_a_parallel_loop_linked_alone_computes_what_numba_computes_and_caches(tmp_path):
    stock, _ = _run(tmp_path, "stock", "a")
    compiled, hits = _run(tmp_path, "parlink", "b")
    assert hits == 0 and compiled == stock
    loaded, hits = _run(tmp_path, "parlink", "b")
    assert hits == 1 and loaded == stock  # the kernel's machine code from the cache, and it runs


def test_an_unverified_numba_is_left_as_it_is():
    code = ("import numba; numba.__version__ = '0.99.0'\n"
            "from numba.core import codegen; before = codegen.CPUCodeLibrary.finalize\n"
            "from nn_numba import parlink\n"
            "assert parlink.install() is False and codegen.CPUCodeLibrary.finalize is before\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
