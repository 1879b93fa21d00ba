"""Where Numba keeps the compiled kernels: a folder keyed by the kernels' sources and the compiler's versions.

Numba's own cache checks only the source file of the function it compiled, so a kernel whose callee (a
function or table in another module, e.g. simd.py or kernels.PIXEL) changed would load its old machine code
(numba issues #1833, #9483). Here every change to the package's kernel sources, or to Python, NumPy, Numba
or llvmlite, gives a new folder, so compiled code is never older than its Python:

    $XDG_CACHE_HOME/nn-numba/kernels/<key>/   (usually ~/.cache/nn-numba/kernels/<key>/)
    $NUMBA_CACHE_DIR/nn-numba/<key>/          when NUMBA_CACHE_DIR is set

`use()` points numba.config.CACHE_DIR there; Numba reads it when an @njit(cache=True) decorator runs, so
every module with cached kernels calls `use()` before its first one. It also locks each kernel's cache
entry while a process reads or writes it: Numba numbers a kernel's files as it reads its index, so two
processes saving different specialisations at once (train and predict on an empty cache) would each write
an index without the other's entry, and one could name the other's machine code (numba #4807, #10128).

Folders of other keys that no process has opened for KEEP_SECONDS are removed (one is a few MB), and so
are Numba's files in the package's own __pycache__, where it caches by default.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import llvmlite
import numba
import numpy as np
from numba.core import caching, config

from . import simd
from .data import cache_dir

PACKAGE = Path(__file__).resolve().parent
KEEP_SECONDS = 24 * 3600  # other keys' folders unused this long are removed; a process touches its own
_KEY = re.compile(r"[0-9a-f]{16}")
_FROM = re.compile(r"^\s*from ([\w.]+) import (\([^)]*\)|[^\n#]*)", re.M)  # module, imported names
_DECORATORS = {"njit", "jit", "intrinsic", "overload", "register_jitable"}  # what makes compiled code
_dir: Path | None = None


def sources(package: Path = PACKAGE) -> list[Path]:
    """The package's modules with compiled code (they import a Numba decorator) and every package module
    they import, transitively (the callees and globals that Numba compiles into their code), sorted. This
    module is not one: it only says where the code goes."""
    todo = [p for p in package.glob("*.py") if any(m.split(".")[0] == "numba" and _DECORATORS & set(n)
                                                   for m, n in _from(p))]
    seen: set[Path] = set()
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo += [q for q in _imports(p, package) if q.is_file() and q.name != Path(__file__).name]
    return sorted(seen)


def _from(path: Path) -> list[tuple[str, list[str]]]:
    """Every `from MODULE import NAMES` of a source file, as (MODULE, NAMES)."""
    return [(m, re.findall(r"\w+", names)) for m, names in _FROM.findall(path.read_text(encoding="utf-8"))]


def _imports(path: Path, package: Path) -> list[Path]:
    """The package modules `path` imports: `from .x import`, `from . import x`, `from <package>.x import`."""
    out = []
    for mod, names in _from(path):
        if mod.startswith(".") or mod.split(".")[0] == package.name:
            sub = mod.removeprefix(package.name).lstrip(".")
            out += [package / f"{n.split('.')[0]}.py" for n in ([sub] if sub else names)]
    return out


def key(package: Path = PACKAGE) -> str:
    """16 hex digits of SHA-256 over the kernel sources, the vector width they compile for (simd.W) and the
    versions of Python, NumPy, Numba, llvmlite."""
    h = hashlib.sha256()
    for v in (f"{simd.W} lanes", sys.version, np.__version__, numba.__version__, llvmlite.__version__):
        h.update(v.encode() + b"\0")
    for p in sources(package):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def root() -> Path:
    """The folder holding one folder per key."""
    user = os.environ.get("NUMBA_CACHE_DIR")
    return Path(user).expanduser() / "nn-numba" if user else cache_dir().parent / "kernels"


def clear_old(top: Path, keep: str, now: float | None = None) -> None:
    """Remove the folders in `top` named like a key, other than `keep`, last used KEEP_SECONDS ago or more."""
    now = time.time() if now is None else now
    try:
        entries = list(top.iterdir())
    except OSError:
        return
    for d in entries:
        if d.name == keep or not _KEY.fullmatch(d.name) or not d.is_dir():
            continue
        try:
            if now - d.stat().st_mtime >= KEEP_SECONDS:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def folder() -> Path:
    """root()/key(), created and marked as used now. If it cannot be written, a temporary folder that
    lives as long as this process (its kernels are compiled afresh)."""
    k = key()
    path = root() / k
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.utime(path)
    except OSError:
        tmp = tempfile.mkdtemp(prefix="nn-numba-kernels-")
        atexit.register(shutil.rmtree, tmp, True)
        return Path(tmp)
    clear_old(path.parent, k)
    for f in PACKAGE.glob("__pycache__/*.nb[ic]"):  # where Numba cached them without us: never read again
        try:
            f.unlink()
        except OSError:
            pass
    return path


def _locked(method, mode: int):
    """Numba's IndexDataCacheFile `method` under `flock(mode)` of a file beside the kernel's index: a
    reader (LOCK_SH) sees an index and the files it names as one writer (LOCK_EX) left them."""
    def call(self, *args):
        try:
            lock = open(self._index_path + ".lock", "ab")
        except OSError:  # a folder this process cannot write: it saves nothing there either
            return method(self, *args)
        with lock:
            try:
                fcntl.flock(lock, mode)
            except OSError:  # a filesystem without locks (ENOLCK): unguarded, as Numba itself is
                pass
            return method(self, *args)
    call.locked = True
    return call


def _lock_entries() -> None:
    """Make Numba's cache entries' reads and writes atomic between processes (once per process)."""
    entry = caching.IndexDataCacheFile
    if not getattr(entry.save, "locked", False):
        entry.save = _locked(entry.save, fcntl.LOCK_EX)
        entry.load = _locked(entry.load, fcntl.LOCK_SH)


def use() -> Path:
    """Point Numba's cache at this package's folder (found once per process), with its entries locked
    (_lock_entries); returns it."""
    global _dir
    if _dir is None:
        _dir = folder()
        _lock_entries()
    config.CACHE_DIR = str(_dir)
    return _dir


def cached(name: str) -> bool:
    """True when the compiled `module.function` (e.g. "kernels.linear_forward") is in the cache already."""
    return any(use().glob(f"*/{name}-*.nbi"))
