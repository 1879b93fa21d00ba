"""A parallel loop's wrappers compiled once, inside the kernel that runs them, instead of once more each.

Numba compiles a `prange` loop into three code libraries: the loop's body as a function of its own, a
gufunc wrapper that calls it, and a parallel wrapper that hands it to the threads. Each one links in the one
before, and each is optimised and turned into machine code on its own before the kernel links them all
and does it again. Only the kernel's machine code is ever run or cached; the two wrappers' own machine code
is never called (in numba 0.68, `parfors.parfor_lowering.call_parallel_gufunc` only links them). With
`install()`, a wrapper made for a parallel loop is finalised by linking alone: its IR goes into the kernel,
which optimises and compiles everything once. That is a quarter of the first compile of the training
kernels (docs/performance.md, "What the cold start does").

The kernel's IR is the same, so its code computes the same values: LLVM may optimise in another order, but
no kernel is compiled with fastmath, and IEEE arithmetic does not depend on the order of the passes.
The patch is for the Numba versions whose parfor lowering was read and tested (VERIFIED); with any other,
`install()` leaves Numba as it is and the first compile is just slower.
"""

from __future__ import annotations

import numba
from numba.core import codegen
from numba.core.compiler_lock import require_global_compiler_lock
from numba.np.ufunc import parallel, wrappers

VERIFIED = ("0.68",)  # numba major.minor
_installed = False


def install() -> bool:
    """Compile parallel loops' wrappers by linking alone, from now on in this process; False for a Numba
    that is not VERIFIED (then nothing changes)."""
    global _installed
    if _installed:
        return True
    if ".".join(numba.__version__.split(".")[:2]) not in VERIFIED:
        return False
    lib = codegen.CPUCodeLibrary
    compile_wrapper, build_wrapper, finalize = (wrappers._GufuncWrapper._compile_wrapper,
                                                parallel.build_gufunc_wrapper, lib.finalize)

    def _compile_wrapper(self, wrapper_name):  # the gufunc wrapper
        out = compile_wrapper(self, wrapper_name)
        if self.is_parfors:
            out._nn_link_only = True
        return out

    def build_gufunc_wrapper(py_func, cres, sin, sout, cache, is_parfors):  # the parallel wrapper
        info = build_wrapper(py_func, cres, sin, sout, cache, is_parfors)
        if is_parfors:
            info.library._nn_link_only = True
        return info

    def _finalize(self):
        if not getattr(self, "_nn_link_only", False):
            return finalize(self)
        require_global_compiler_lock()
        self._raise_if_finalized()
        seen = set()
        for other in self._linking_libraries:  # what CodeLibrary.finalize links, with its reload hooks
            if other not in seen:
                seen.add(other)
                self._reload_init.update(other._reload_init)
                self._final_module.link_in(other._get_module_for_linking(), preserve=True)
        self._finalized = True
        return None

    wrappers._GufuncWrapper._compile_wrapper = _compile_wrapper
    parallel.build_gufunc_wrapper = build_gufunc_wrapper
    lib.finalize = _finalize
    _installed = True
    return True
