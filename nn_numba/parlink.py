"""A parallel loop's code compiled once, inside the kernel that runs it, instead of once more per wrapper.

Numba compiles a `prange` loop into three code libraries: the loop's body as a function of its own, a
gufunc wrapper that calls it, and a parallel wrapper that hands it to the threads. Each one links in the one
before, and each is optimised and turned into machine code on its own before the kernel links them all
and does it again. Only the kernel's machine code is ever run or cached: in numba 0.68,
`parfors.parfor_lowering.call_parallel_gufunc` only links the three, and the body's own executable, made
when it is lowered, is never called. With `install()`, the body is lowered without being made executable
(`no_compile`) and all three are finalised by linking alone: their IR goes into the kernel, which
optimises and compiles everything once. That is about a third of the first compile of the training
kernels (docs/performance.md, "What the cold start does").

The kernel's IR is the same, so its code computes the same values: LLVM may optimise in another order, but
no kernel is compiled with fastmath, and IEEE arithmetic does not depend on the order of the passes.
The patch is for the Numba versions whose parfor lowering was read and tested (VERIFIED); with any other,
`install()` leaves Numba as it is and the first compile is just slower.
"""

from __future__ import annotations

import numba
from numba.core import codegen, compiler
from numba.core.compiler_lock import require_global_compiler_lock
from numba.np.ufunc import parallel, wrappers

VERIFIED = ("0.68",)  # numba major.minor
_orig: dict = {}  # what install() replaced


def install() -> bool:
    """Compile parallel loops' bodies and wrappers by linking alone, from now on in this process; False for
    a Numba that is not VERIFIED (then nothing changes)."""
    if _orig:
        return True
    if ".".join(numba.__version__.split(".")[:2]) not in VERIFIED:
        return False
    lib = codegen.CPUCodeLibrary
    _orig.update(compile_ir=compiler.compile_ir, compile_wrapper=wrappers._GufuncWrapper._compile_wrapper,
                 build_wrapper=parallel.build_gufunc_wrapper, finalize=lib.finalize)
    compiler.compile_ir = _compile_ir
    wrappers._GufuncWrapper._compile_wrapper = _compile_wrapper
    parallel.build_gufunc_wrapper = _build_gufunc_wrapper
    lib.finalize = _finalize
    return True


def _compile_ir(typingctx, targetctx, func_ir, args, return_type, flags, locals, *rest, **kw):  # the body
    body = kw.get("pipeline_class", compiler.Compiler).__name__ == "ParforGufuncCompiler"
    if body:  # the loop's body: lowered, never made executable on its own
        flags = flags.copy()
        flags.no_compile = True
    cres = _orig["compile_ir"](typingctx, targetctx, func_ir, args, return_type, flags, locals, *rest, **kw)
    if body:
        cres.library._nn_link_only = True
    return cres


def _compile_wrapper(self, wrapper_name):  # the gufunc wrapper
    out = _orig["compile_wrapper"](self, wrapper_name)
    if self.is_parfors:
        out._nn_link_only = True
    return out


def _build_gufunc_wrapper(py_func, cres, sin, sout, cache, is_parfors):  # the parallel wrapper
    info = _orig["build_wrapper"](py_func, cres, sin, sout, cache, is_parfors)
    if is_parfors:
        info.library._nn_link_only = True
    return info


def _finalize(self):
    """CodeLibrary.finalize, but for the libraries marked above only the linking, with its reload hooks."""
    if not getattr(self, "_nn_link_only", False):
        return _orig["finalize"](self)
    require_global_compiler_lock()
    self._raise_if_finalized()
    seen = set()
    for other in self._linking_libraries:
        if other not in seen:
            seen.add(other)
            self._reload_init.update(other._reload_init)
            self._final_module.link_in(other._get_module_for_linking(), preserve=True)
    self._finalized = True
    return None
