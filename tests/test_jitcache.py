"""The kernel cache folder: keyed by the kernel sources and versions, never stale, old folders cleared."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nn_numba import jitcache

PACKAGE = Path(jitcache.__file__).parent


def test_sources_are_the_compiled_modules_and_what_they_import():
    names = {p.name for p in jitcache.sources()}
    assert {"kernels.py", "simd.py", "augment.py"} <= names  # njit / intrinsic, and kernels imports simd
    assert not {"cli.py", "train.py", "report.py", "jitcache.py"} & names


def test_every_cached_kernel_module_sets_the_folder_first():
    for p in PACKAGE.glob("*.py"):
        text = p.read_text()
        if "cache=True" in text and p.name != "jitcache.py":
            assert -1 < text.find("jitcache.use()") < text.find("cache=True"), p.name


def test_key_follows_the_kernel_sources(tmp_path):
    pkg = tmp_path / PACKAGE.name
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    k = jitcache.key(pkg)
    assert k == jitcache.key(PACKAGE) and len(k) == 16
    (pkg / "cli.py").write_text((pkg / "cli.py").read_text() + "\n# not a kernel source\n")
    assert jitcache.key(pkg) == k
    (pkg / "simd.py").write_text((pkg / "simd.py").read_text() + "\n# a callee of every product\n")
    assert jitcache.key(pkg) != k


def test_root_honours_numba_cache_dir_and_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert jitcache.root() == tmp_path / "numba" / "nn-numba"
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jitcache.root() == tmp_path / "xdg" / "nn-numba" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    assert jitcache.root() == Path.home() / ".cache" / "nn-numba" / "kernels"


def test_kernels_are_cached_in_the_keyed_folder():
    from nn_numba import kernels

    kernels.density(np.ones((2, 8), np.float32), 2)
    assert jitcache.cached("kernels.density")
    assert jitcache.use() == jitcache.root() / jitcache.key()


def test_old_folders_are_cleared(tmp_path):
    now = time.time()
    day = jitcache.KEEP_SECONDS
    for name, age in (("0" * 16, 2 * day), ("1" * 16, 0.5 * day), ("2" * 16, 2 * day), ("notes", 2 * day)):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (now - age, now - age))
    jitcache.clear_old(tmp_path, keep="2" * 16, now=now)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1" * 16, "2" * 16, "notes"]


# A copy of the package compiles two kernels whose callees live in other modules: augment.shift_gather reads
# kernels.PIXEL (Numba freezes the table into its machine code), kernels.gather_nonzeros lists its pixels with
# simd.vlist, which compares them with simd's vector of zeros.
PROBE = """
import sys
import numpy as np
from nn_numba import augment, jitcache, kernels
X = np.zeros((2, 784), np.uint8)
X[:, 100:108] = [0, 1, 2, 3, 128, 200, 254, 255]
idx = np.arange(2, dtype=np.int64)
shifted = np.empty((2, 784), np.float32)
augment.shift_gather(X, idx, np.zeros(2, np.int64), np.zeros(2, np.int64), shifted)
out = np.empty((2, 784), np.float32)
bufs = (np.zeros(2, np.int32), np.zeros((2, 784), np.int32), np.zeros((2, 784), np.float32))
kernels.gather_nonzeros(X, idx, out, *bufs)
np.savez(sys.argv[1], shifted=shifted, gathered=out, count=bufs[0])
print(jitcache.use())
"""


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path.name} no longer holds {old!r}: update this test"
    path.write_text(text.replace(old, new))


def test_a_changed_callee_recompiles_its_caller(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "pkg" / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    pkg = tmp_path / "pkg" / PACKAGE.name
    (tmp_path / "probe.py").write_text(PROBE)
    (pkg / "__pycache__").mkdir()
    legacy = pkg / "__pycache__" / "augment.shift_gather-77.py311.nbi"  # Numba's default place
    legacy.write_bytes(b"old")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkg"), "NUMBA_CACHE_DIR": str(tmp_path / "cache")}

    def run(name):
        r = subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(tmp_path / name)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        return np.load(tmp_path / name), Path(r.stdout.strip())

    before, folder = run("before.npz")
    assert folder.parent == tmp_path / "cache" / "nn-numba" and folder.name == jitcache.key(pkg)
    assert list(folder.glob("*/augment.shift_gather-*.nbi")) and not list(pkg.glob("__pycache__/*.nb[ic]"))
    assert before["shifted"][0, 100:108].tolist() == (np.array([0, 1, 2, 3, 128, 200, 254, 255]) / 255).astype(
        np.float32).tolist()
    assert (before["gathered"][:, :96] == 0).all() and before["count"][0] == 7  # one pair, 7 pixels lit

    # the callees change, their callers' files do not: the callers must be compiled again
    _edit(pkg / "kernels.py", "PIXEL = (np.arange(256, dtype=np.float32) / np.float32(255))",
          "PIXEL = (np.arange(256, dtype=np.float32) / np.float32(510))")
    _edit(pkg / "simd.py", "_ZERO = ir.Constant(_vec, [0.0] * W)", "_ZERO = ir.Constant(_vec, [7.0] * W)")
    after, folder2 = run("after.npz")
    assert np.array_equal(after["shifted"], before["shifted"] / 2)  # the new table, not the frozen old one
    assert after["count"][0] == 784  # every pixel differs from the new "zero", 7.0
    assert folder2 != folder and folder2.parent == folder.parent


PRODUCT = """
import numpy as np
from nn_numba import kernels
X = kernels.aligned_zeros((3, 1024))[:, :784]  # a strided batch, as the activations are
Y = kernels.aligned_zeros((3, 256))[:, :250]
kernels.linear_forward(X, np.zeros((250, 784), np.float32), np.zeros(250, np.float32), Y, True)
"""
LOGITS = """
import numpy as np
from nn_numba.model import MLP
m = MLP.init([784, 250, 250, 10], np.random.default_rng(0))
X = np.random.default_rng(1).random((5, 784), dtype=np.float32)
np.save({out!r}, m.logits(X))
"""


def test_inference_after_a_product_compiled_elsewhere_loads_from_the_cache(tmp_path):
    """One process compiles a product (as training does), the next compiles inference around it from the
    cache, a third loads that: all three run, and the third's logits are the second's (a compiled caller of a
    cache-loaded parallel kernel once crashed when it was itself loaded from the cache)."""
    env = os.environ | {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    outs = [tmp_path / "a.npy", tmp_path / "b.npy"]
    for code in (PRODUCT, LOGITS.format(out=str(outs[0])), LOGITS.format(out=str(outs[1]))):
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    np.testing.assert_array_equal(np.load(outs[0]), np.load(outs[1]))


TWICE = """
from numba import njit


@njit(cache=True)
def f(x):
    return x + 1
"""
SAVER = """
import sys, time
from pathlib import Path
from numba.core import caching
from nn_numba import jitcache
jitcache.use()
save_index = caching.IndexDataCacheFile._save_index
def slow(self, overloads):  # a wide window between reading a kernel's index and writing it back
    time.sleep(1.5)
    save_index(self, overloads)
caching.IndexDataCacheFile._save_index = slow
sys.path.insert(0, {dir!r})
import twice
x = {arg}
Path({dir!r}, type(x).__name__).touch()
while not Path({dir!r}, "go").exists():
    time.sleep(0.01)
assert twice.f(x) == x + 1
"""
LOADER = """
import sys
from nn_numba import jitcache
jitcache.use()
sys.path.insert(0, {dir!r})
import twice
assert twice.f(1) == 2 and twice.f(1.5) == 2.5
print(len(twice.f.stats.cache_hits), len(twice.f.stats.cache_misses))
"""


def test_two_processes_saving_specialisations_of_one_kernel_at_once_keep_both(tmp_path):
    """Two commands that compile different specialisations of one kernel at the same time (train and predict
    on an empty cache) both keep theirs: Numba numbers a kernel's cache files as it reads its index, so
    unguarded the second writer's index drops the first's entry and can name the other's machine code."""
    (tmp_path / "twice.py").write_text(TWICE)
    env = os.environ | {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    run = [sys.executable, "-c"]
    savers = [subprocess.Popen(run + [SAVER.format(dir=str(tmp_path), arg=a)], env=env, stderr=subprocess.PIPE,
                               text=True) for a in ("1", "1.5")]
    deadline = time.monotonic() + 300
    while not all((tmp_path / n).exists() for n in ("int", "float")) and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    for p in savers:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    r = subprocess.run(run + [LOADER.format(dir=str(tmp_path))], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["2", "0"]  # both loaded from the cache, none compiled again


def test_a_folder_without_file_locks_still_caches(tmp_path, monkeypatch):
    """Where flock fails (some network filesystems: ENOLCK), a kernel's cache entry is read and written
    unlocked, as Numba does, instead of failing the command."""
    from numba.core import caching

    def no_locks(fd, op):
        raise OSError(37, "No locks available")

    jitcache.use()  # the entries are locked from here on
    monkeypatch.setattr(jitcache.fcntl, "flock", no_locks)
    entry = caching.IndexDataCacheFile(str(tmp_path), "f-1.py311", ("stamp", 1))
    entry.save(("sig",), b"code")
    assert entry.load(("sig",)) == b"code"
