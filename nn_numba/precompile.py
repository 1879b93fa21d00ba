"""Compiling the kernels a command will call before it calls them, in parallel processes that fill the cache.

Numba compiles under one lock per process, so a first run would compile its kernels one after the other.
Instead the command records a plan (`record`: the code that will call the kernels runs once on stand-in
data of the real types, with every compiled function of the package swapped for a stub that notes its
name and argument types), and `start` spawns a worker per spare core when some kernel of the plan is not
in the cache yet. The workers and, once it calls `Job.join`, the command itself take the plan's kernels
largest first, each claimed by one of them (a file created exclusively), compile them into the kernel
cache (jitcache.py) and exit; the command then loads what the workers compiled from the cache. Compiled
code is the same wherever it was compiled, so the results are too.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from numba.core.dispatcher import Dispatcher

from . import jitcache

Entry = tuple[str, str, tuple]  # module, function, Numba argument types


def record(run: Callable[[], object]) -> list[Entry]:
    """The compiled functions of the package that run() calls from Python, with their argument types, in
    order of first call. Nothing is compiled or computed: each returns 0 and leaves its outputs as they
    were; if run() fails for want of what they compute, the plan is the calls before that (a plan only
    saves time: what it misses is compiled on its first call)."""
    calls: dict[Entry, None] = {}

    def stub(f: Dispatcher) -> Callable[..., int]:
        def note(*args: object) -> int:
            calls[(f.py_func.__module__, f.py_func.__name__, tuple(f.typeof_pyval(a) for a in args))] = None
            return 0
        return note

    swapped = [(m, name, f) for m in list(sys.modules.values()) if m.__name__.startswith(f"{__package__}.")
               for name, f in list(vars(m).items()) if isinstance(f, Dispatcher)]
    try:
        for m, name, f in swapped:
            setattr(m, name, stub(f))
        run()
    except Exception:  # noqa: BLE001, S110 -- code that needed what a stub did not compute: the plan so far
        pass
    finally:
        for m, name, f in swapped:
            setattr(m, name, f)
    return list(calls)


def _kernel(e: Entry) -> Dispatcher:
    return getattr(importlib.import_module(e[0]), e[1])


def _callees(f: Dispatcher, seen: dict[Dispatcher, None]) -> dict[Dispatcher, None]:
    """f and the compiled functions it calls, directly or not (those its module's globals name)."""
    if f not in seen:
        seen[f] = None
        code = f.py_func.__code__
        names = set(code.co_names).union(*(c.co_names for c in code.co_consts if inspect.iscode(c)))
        for n in names:
            g = f.py_func.__globals__.get(n)
            if isinstance(g, Dispatcher):
                _callees(g, seen)
    return seen


def _size(f: Dispatcher) -> int:
    """The length of f's bytecode, its nested functions' included: what Numba compiles (its source would
    count the comments too, and reading it takes a millisecond per function)."""
    code = f.py_func.__code__
    return len(code.co_code) + sum(len(c.co_code) for c in code.co_consts if inspect.iscode(c))


def largest_first(plan: list[Entry]) -> list[Entry]:
    """The plan, the kernels that take longest to compile first. Numba compiles a kernel with the functions it
    calls, unless they are in the cache already: a kernel costs the size of itself and of the functions it
    calls that no costlier kernel calls (those are compiled and saved by then)."""
    kernels = {e[:2]: _callees(_kernel(e), {}) for e in plan}
    counted: set[Dispatcher] = set()
    cost = {}
    for k, fs in sorted(kernels.items(), key=lambda kv: sum(map(_size, kv[1])), reverse=True):
        cost[k] = sum(_size(f) for f in fs if f not in counted)
        counted.update(fs)
    return sorted(plan, key=lambda e: cost[e[:2]], reverse=True)


def compile_claimed(plan: list[Entry], claims: Path) -> None:
    """Compile (or load from the cache) each kernel of the plan that no other process has claimed. One that
    fails is left to its first call, which compiles it again and reports the error where it belongs.

    A claim covers every specialisation of one kernel, so one process compiles them all and the helpers
    they share once. (Two processes saving specialisations of one kernel at once would also be safe: the
    kernel cache locks each entry, jitcache.py.)"""
    kernels = list(dict.fromkeys(e[:2] for e in plan))  # (module, function), in the plan's order
    for i, k in enumerate(kernels):
        try:
            os.close(os.open(claims / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        for e in plan:
            if e[:2] == k:
                try:
                    _kernel(e).compile(e[2])
                except Exception:  # noqa: BLE001, S112 -- see the docstring
                    continue


class Job:
    """Workers compiling a plan into the cache; `join` compiles the rest here and waits for them."""

    def __init__(self, plan: list[Entry], workers: int):
        self.plan = largest_first(plan)
        self.claims = Path(tempfile.mkdtemp(prefix="nn-numba-claims-"))
        payload = pickle.dumps((self.plan, self.claims))
        self.procs = []
        for _ in range(workers):
            try:
                p = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                self.procs.append(p)
                p.stdin.write(payload)
                p.stdin.close()
            except OSError:  # no worker (or a dead one): this process compiles what it would have
                pass

    def join(self) -> None:
        """Compile the kernels no worker took yet, then wait until the workers have saved theirs (a worker
        that failed leaves its kernel to be compiled when it is first called). A worker says so on its
        stdout before it exits: its interpreter's shutdown takes a few tenths of a second nobody waits for."""
        compile_claimed(self.plan, self.claims)
        for p in self.procs:
            p.stdout.readline()  # "done", or nothing when it died
        shutil.rmtree(self.claims, ignore_errors=True)

    def close(self, kill: bool = True) -> None:
        for p in self.procs:
            if kill:
                p.kill()
            p.wait()
            p.stdout.close()
        self.procs = []
        shutil.rmtree(self.claims, ignore_errors=True)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Nothing(Job):
    """The Job when everything is in the cache already: nothing to do."""

    def __init__(self) -> None:
        self.plan, self.procs = [], []

    def join(self) -> None:
        pass

    def close(self, kill: bool = True) -> None:
        pass


def missing(plan: list[Entry]) -> bool:
    """True when some kernel of the plan has no compiled version in the cache."""
    return not os.environ.get("NUMBA_DISABLE_JIT") and any(
        not jitcache.cached(f"{e[0].rsplit('.', 1)[-1]}.{e[1]}") for e in plan)


def start(plan: list[Entry]) -> Job:
    """Workers (one per core but this process's) compiling the plan, if some of it is not cached and the
    cache is the shared folder (not this process's temporary one, which workers would not see)."""
    if not missing(plan) or not jitcache.use().is_relative_to(jitcache.root()):
        return Nothing()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return Job(plan, max(1, cores - 1))


if __name__ == "__main__":
    compile_claimed(*pickle.load(sys.stdin.buffer))
    print("done", flush=True)
