"""W float32 lanes as one Numba value: the vector registers a GEMM micro-kernel needs.

LLVM keeps the sums of a *dot-form* tile in registers by itself (`fastmath` lets it vectorise the
reduction), but not the sums of an *axpy-form* tile: there the accumulators are rows of the output,
and it reloads and re-stores them every few FMAs (docs/performance.md). Numba also turns
LLVM's SLP vectoriser off, so scalar accumulators are never packed into vectors. `f32v` closes that
gap: a value of this type *is* an LLVM `<W x float>`, which lives in one vector register, and each
function below is one or a few LLVM instructions. Kernels stay explicit loops inside `@njit`; there is
no BLAS and no x86 intrinsic here, so LLVM still schedules and allocates registers and the code compiles
for any CPU.

W is 16 (a zmm register) on CPUs with AVX-512 and 8 (a ymm register) on the others, chosen once at
import (`lanes`: NN_NUMBA_LANES=8 or 16 overrides it); kernels write their offsets in terms of W.
Results are deterministic for a given W; the two widths sum in different orders, so their last bits
differ.

    acc = vzero()
    for i in range(B):
        acc = vfma(vbload(C, i, j), vload(A, i, k), acc)   # acc[l] += C[i, j] * A[i, k + l], l < W
    vstore(Y, j, k, acc)

Arrays are 2-D float32. Vector loads and stores need contiguous rows (C layout, or a view such as
buf[:, :250]); they are unaligned and unchecked, so callers keep k + W <= the row length, or use the
masked `vloadn`/`vstoren` for the last n < W columns. No index wraps around.
"""

import os

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, models, register_model

from .errors import NNError


def host_lanes() -> int:
    """The widest float32 vector this CPU has, in lanes: 16 with AVX-512 (avx512f), else 8. Numba's
    NUMBA_CPU_FEATURES, when set, stands for the CPU (code compiled for another host)."""
    from llvmlite import binding
    from numba.core import config

    if config.CPU_FEATURES is not None:
        return 16 if "+avx512f" in config.CPU_FEATURES.split(",") else 8
    return 16 if binding.get_host_cpu_features().get("avx512f") else 8


def lanes() -> int:
    """The vector width the kernels compile for: NN_NUMBA_LANES (8 or 16) when set, else `host_lanes()`."""
    want = os.environ.get("NN_NUMBA_LANES", "").strip()
    if not want:
        return host_lanes()
    if want not in ("8", "16"):
        raise NNError(f"NN_NUMBA_LANES={want!r}: give 8 or 16 (float32 lanes per vector), or unset it")
    return int(want)


W = lanes()  # lanes: fixed for the process; the kernel cache keeps the code of each width apart (jitcache.key)
_f32, _i32 = ir.FloatType(), ir.IntType(32)
_vec, _ivec = ir.VectorType(_f32, W), ir.VectorType(_i32, W)
_ZERO = ir.Constant(_vec, [0.0] * W)


class F32v(types.Type):
    def __init__(self) -> None:
        super().__init__(name=f"f32x{W}")


f32v = F32v()


@register_model(F32v)
class _F32vModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _vec)


def _splat(builder, x):
    """A scalar (float or i32) in every lane."""
    vty = _ivec if x.type == _i32 else _vec
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(_i32, 0))
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), ir.Constant(_ivec, [0] * W))


def _check(ary, rows_contiguous=True):
    ok = isinstance(ary, types.Array) and ary.dtype == types.float32 and ary.ndim == 2
    if not ok or (rows_contiguous and ary.layout == "F"):
        raise TypingError(f"simd: need a 2-D float32 array{' with contiguous rows' * rows_contiguous}, got {ary}")


def _addr(context, builder, sig, args, vector=True):
    """Address of ary[i, k] (args = ary, i, k, ...): a `<W x float>*`, or a `float*` when not `vector`.
    The row stride comes from the array; the column stride is 4 bytes for vectors (contiguous rows) and
    read from the array for scalars (so a transposed view works)."""
    aryty, ity, kty = sig.args[:3]
    i = context.cast(builder, args[1], ity, types.intp)
    k = context.cast(builder, args[2], kty, types.intp)
    if vector:
        return _row_addr(context, builder, aryty, args[0], i, k)
    arr = context.make_array(aryty)(context, builder, args[0])
    row, col = cgutils.unpack_tuple(builder, arr.strides, 2)
    off = builder.add(builder.mul(i, row), builder.mul(k, col))
    p = builder.gep(builder.bitcast(arr.data, ir.IntType(8).as_pointer()), [off], inbounds=True)
    return builder.bitcast(p, _f32.as_pointer())


def _row_addr(context, builder, aryty, ary, i, k):
    """Address of ary[i, k] as a `<W x float>*`, i and k intp values: rows contiguous, 4 bytes a column."""
    arr = context.make_array(aryty)(context, builder, ary)
    row = cgutils.unpack_tuple(builder, arr.strides, 2)[0]
    off = builder.add(builder.mul(i, row), builder.mul(k, ir.Constant(i.type, 4)))
    p = builder.gep(builder.bitcast(arr.data, ir.IntType(8).as_pointer()), [off], inbounds=True)
    return builder.bitcast(p, _vec.as_pointer())


def _lanes(builder, n, lo=None):
    """<W x i1>: lane l < n (n <= 0: none, n >= W: all), and l >= lo when lo is given."""
    def lanes(cmp, x):
        x = builder.trunc(x, _i32) if x.type.width > 32 else x
        return builder.icmp_signed(cmp, ir.Constant(_ivec, list(range(W))), _splat(builder, x))
    return lanes("<", n) if lo is None else builder.and_(lanes("<", n), lanes(">=", lo))


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


@intrinsic
def vzero(typingctx):
    """W zeros."""
    return f32v(), lambda context, builder, sig, args: _ZERO


@intrinsic
def vbcast(typingctx, x):
    """The scalar x (cast to float32) in every lane."""
    def codegen(context, builder, sig, args):
        return _splat(builder, context.cast(builder, args[0], sig.args[0], types.float32))
    return f32v(types.float32), codegen


@intrinsic
def vbload(typingctx, ary, i, k):
    """ary[i, k] in every lane (a broadcast load); any layout."""
    _check(ary, rows_contiguous=False)

    def codegen(context, builder, sig, args):
        return _splat(builder, builder.load(_addr(context, builder, sig, args, vector=False), align=4))
    return f32v(ary, i, k), codegen


@intrinsic
def vload(typingctx, ary, i, k):
    """ary[i, k : k + W]."""
    _check(ary)

    def codegen(context, builder, sig, args):
        return builder.load(_addr(context, builder, sig, args), align=4)
    return f32v(ary, i, k), codegen


@intrinsic
def vstore(typingctx, ary, i, k, v):
    """ary[i, k : k + W] = v."""
    _check(ary)

    def codegen(context, builder, sig, args):
        builder.store(args[3], _addr(context, builder, sig, args), align=4)
        return context.get_dummy_value()
    return types.none(ary, i, k, f32v), codegen


@intrinsic
def ventry(typingctx, ary, i, k, v, lo, tag):
    """ary[i, k : k + 3] = lanes lo .. lo + 2 of v, and ary[i, k + 3] = the bits of the integer tag as an
    int32: a 16-byte entry of a list (three pixels and the sample they belong to), one shuffle and one
    store of four floats, no mask. lo a constant (an integer literal), lo + 3 <= W."""
    _check(ary)
    if not isinstance(lo, types.IntegerLiteral) or not 0 <= lo.literal_value <= W - 3:
        raise TypingError(f"simd.ventry: need a constant first lane 0 .. {W - 3}, got {lo}")
    first = lo.literal_value
    quad = ir.VectorType(_f32, 4)

    def codegen(context, builder, sig, args):
        bits = builder.bitcast(context.cast(builder, args[5], sig.args[5], types.int32), _f32)
        tagv = builder.insert_element(ir.Constant(_vec, ir.Undefined), bits, ir.Constant(_i32, 0))
        lanes = ir.Constant(ir.VectorType(_i32, 4), [first, first + 1, first + 2, W])  # W: tagv's lane 0
        entry = builder.shuffle_vector(args[3], tagv, lanes)
        builder.store(entry, builder.bitcast(_addr(context, builder, sig, args), quad.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.none(ary, i, k, f32v, lo, tag), codegen


@intrinsic
def vloadn(typingctx, ary, i, k, n):
    """ary[i, k : k + n] in the first n lanes, zeros after; nothing past them is read (a masked load)."""
    _check(ary)

    def codegen(context, builder, sig, args):
        p = _addr(context, builder, sig, args)
        return _call(builder, f"llvm.masked.load.v{W}f32.p0", _vec, [p, ir.Constant(_i32, 4), _lanes(builder, args[3]),
                                                                  _ZERO])
    return f32v(ary, i, k, n), codegen


@intrinsic
def vstoren(typingctx, ary, i, k, v, n):
    """ary[i, k : k + n] = the first n lanes of v (a masked store)."""
    _check(ary)

    def codegen(context, builder, sig, args):
        p = _addr(context, builder, sig, args)
        _call(builder, f"llvm.masked.store.v{W}f32.p0", ir.VoidType(), [args[3], p, ir.Constant(_i32, 4),
                                                                     _lanes(builder, args[4])])
        return context.get_dummy_value()
    return types.none(ary, i, k, f32v, n), codegen


@intrinsic
def vloadr(typingctx, ary, i, k, lo, hi):
    """ary[i, k + l] in lanes lo <= l < hi, zeros elsewhere; nothing else is read."""
    _check(ary)

    def codegen(context, builder, sig, args):
        p = _addr(context, builder, sig, args)
        return _call(builder, f"llvm.masked.load.v{W}f32.p0", _vec, [p, ir.Constant(_i32, 4),
                                                                  _lanes(builder, args[4], args[3]), _ZERO])
    return f32v(ary, i, k, lo, hi), codegen


@intrinsic
def vstorer(typingctx, ary, i, k, v, lo, hi):
    """ary[i, k + l] = v[l] for lanes lo <= l < hi only: how a tile moved back over its neighbour stores
    just its own columns."""
    _check(ary)

    def codegen(context, builder, sig, args):
        p = _addr(context, builder, sig, args)
        _call(builder, f"llvm.masked.store.v{W}f32.p0", ir.VoidType(), [args[3], p, ir.Constant(_i32, 4),
                                                                     _lanes(builder, args[5], args[4])])
        return context.get_dummy_value()
    return types.none(ary, i, k, f32v, lo, hi), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c lane by lane, rounded once (one FMA instruction)."""
    return f32v(f32v, f32v, f32v), lambda context, builder, sig, args: _call(builder, f"llvm.fma.v{W}f32", _vec, args)


def _binary(op):
    @intrinsic
    def f(typingctx, a, b):
        return f32v(f32v, f32v), lambda context, builder, sig, args: getattr(builder, op)(*args)
    return f


vadd, vsub, vmul, vdiv = _binary("fadd"), _binary("fsub"), _binary("fmul"), _binary("fdiv")
vadd.__doc__, vsub.__doc__, vmul.__doc__, vdiv.__doc__ = "a + b", "a - b", "a * b", "a / b (lane by lane)"


@intrinsic
def vsqrt(typingctx, a):
    """The square root of each lane (correctly rounded, as np.sqrt)."""
    return f32v(f32v), lambda context, builder, sig, args: _call(builder, f"llvm.sqrt.v{W}f32", _vec, args)


@intrinsic
def vclamp(typingctx, v, lo, hi):
    """min(max(v, lo), hi) lane by lane, as Numba computes it on scalars (max(a, b) is b if b > a else a),
    so a lane equal to a bound keeps its own value, the sign of a zero included."""
    def codegen(context, builder, sig, args):
        v, lo, hi = args
        r = builder.select(builder.fcmp_ordered(">", lo, v), lo, v)
        return builder.select(builder.fcmp_ordered("<", hi, r), hi, r)
    return f32v(f32v, f32v, f32v), codegen


@intrinsic
def vtrunc(typingctx, v):
    """Each lane rounded toward zero (to a float: float(int(x)) for |x| < 2^31)."""
    return f32v(f32v), lambda context, builder, sig, args: _call(builder, f"llvm.trunc.v{W}f32", _vec, args)


@intrinsic
def vbits(typingctx, v, lo, hi, n):
    """The lanes l < n with lo < v[l] < hi, as the bits of an int64 (bit l for lane l)."""
    def codegen(context, builder, sig, args):
        v, lo, hi = args[0], _splat(builder, args[1]), _splat(builder, args[2])
        inside = builder.and_(builder.fcmp_ordered("<", lo, v), builder.fcmp_ordered("<", v, hi))
        inside = builder.and_(inside, _lanes(builder, args[3]))
        return builder.zext(builder.bitcast(inside, ir.IntType(W)), ir.IntType(64))
    return types.int64(f32v, types.float32, types.float32, n), codegen


@intrinsic
def vloadbytes(typingctx, ary, i, k, n):
    """ary[i, k : k + n] of a 2-D C-contiguous uint8 array, as floats in the first n lanes, zeros after;
    nothing past them is read (a masked load)."""
    if not (isinstance(ary, types.Array) and ary.dtype == types.uint8 and ary.ndim == 2 and ary.layout == "C"):
        raise TypingError(f"simd: need a 2-D C-contiguous uint8 array, got {ary}")

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        i = context.cast(builder, args[1], sig.args[1], types.intp)
        k = context.cast(builder, args[2], sig.args[2], types.intp)
        off = builder.add(builder.mul(i, cgutils.unpack_tuple(builder, arr.strides, 2)[0]), k)
        bvec = ir.VectorType(ir.IntType(8), W)
        p = builder.bitcast(builder.gep(builder.bitcast(arr.data, ir.IntType(8).as_pointer()), [off], inbounds=True),
                            bvec.as_pointer())
        b = _call(builder, f"llvm.masked.load.v{W}i8.p0", bvec, [p, ir.Constant(_i32, 1), _lanes(builder, args[3]),
                                                              ir.Constant(bvec, [0] * W)])
        return builder.uitofp(b, _vec)
    return f32v(ary, i, k, n), codegen


@intrinsic
def vgather2(typingctx, ary, i, q, off, n):
    """Two neighbouring floats per lane: lanes l < n of the first vector hold the float at flat position
    p = int(q[l]) + off from ary[i, 0], of the second the float at p + 1; zeros after (lanes past n read
    nothing). q holds integers as floats (exact below 2^24). Gathers of W / 2 eight-byte elements each
    (base + 32-bit index x 4; half the elements two float gathers would load), split into the two vectors
    by two shuffles. Unchecked: callers keep every p + 1 inside the array. ary 2-D float32 C-contiguous,
    whose rows the positions may run across."""
    if not (isinstance(ary, types.Array) and ary.dtype == types.float32 and ary.ndim == 2 and ary.layout == "C"):
        raise TypingError(f"simd: need a 2-D C-contiguous float32 array, got {ary}")

    def codegen(context, builder, sig, args):
        at, h = sig.args, W // 2
        base = _addr(context, builder, types.none(at[0], at[1], types.intp),
                     [args[0], args[1], ir.Constant(ir.IntType(64), 0)], vector=False)
        index = builder.add(builder.fptosi(args[2], _ivec),
                            _splat(builder, context.cast(builder, args[3], at[3], types.int32)))
        mask = _lanes(builder, args[4])
        i64, hvec = ir.IntType(64), ir.VectorType(_i32, h)
        halves = []
        for part in range(2):
            take = ir.Constant(hvec, list(range(part * h, part * h + h)))
            ptrs = ir.instructions.GEPInstr(builder.block, base, [builder.shuffle_vector(index, index, take)],
                                            inbounds=True, name="", source_etype=_f32)
            ptrs.type = ir.VectorType(_f32.as_pointer(), h)
            builder._insert(ptrs)
            m = builder.shuffle_vector(mask, mask, take)
            pairs = _call(builder, f"llvm.masked.gather.v{h}i64.v{h}p0", ir.VectorType(i64, h),
                          [ptrs, ir.Constant(_i32, 4), m, ir.Constant(ir.VectorType(i64, h), [0] * h)])
            halves.append(builder.bitcast(pairs, _vec))  # lanes 2l, 2l + 1: the pair of lane part h + l
        first = ir.Constant(_ivec, [2 * l for l in range(W)])
        second = ir.Constant(_ivec, [2 * l + 1 for l in range(W)])
        return context.make_tuple(builder, sig.return_type, [builder.shuffle_vector(halves[0], halves[1], first),
                                                             builder.shuffle_vector(halves[0], halves[1], second)])
    return types.UniTuple(f32v, 2)(ary, i, f32v, off, n), codegen


@intrinsic
def vlist(typingctx, cols, vals, q, c, a, b, k, n):  # noqa: PLR0913 -- where to list and what
    """Append the lanes l < n in which a or b is non-zero (NaN counts as non-zero, -0.0 does not: `x !=
    0`), in lane order: their indices k + l to row q of cols, a's values to row 2q of vals and b's to row
    2q + 1, from column c; return how many. A compressed-row listing of two samples' pixels at once, a
    vector at a time: three vector compresses and three masked stores of that many lanes (nothing past
    them is written), where a pixel at a time costs a store per pixel. cols 2-D int32, vals 2-D float32,
    both with contiguous rows."""
    if not (isinstance(cols, types.Array) and cols.dtype == types.int32 and cols.ndim == 2 and cols.layout != "F"):
        raise TypingError(f"simd: need a 2-D int32 array with contiguous rows, got {cols}")
    _check(vals)

    def codegen(context, builder, sig, args):
        tc, tv, tq, tp = sig.args[:4]
        colsa, valsa, q, c, a, b, k, n = args
        lit = builder.or_(builder.fcmp_unordered("!=", a, _ZERO), builder.fcmp_unordered("!=", b, _ZERO))
        lit = builder.and_(lit, _lanes(builder, n))
        m = builder.zext(builder.bitcast(lit, ir.IntType(W)), ir.IntType(64))
        count = _call(builder, "llvm.ctpop.i64", ir.IntType(64), [m])
        first = _lanes(builder, count)
        at = context.cast(builder, k, sig.args[6], types.int32)
        index = builder.add(_splat(builder, at), ir.Constant(_ivec, list(range(W))))
        packed = _call(builder, f"llvm.experimental.vector.compress.v{W}i32", _ivec,
                       [index, lit, ir.Constant(_ivec, [0] * W)])
        p = builder.bitcast(_addr(context, builder, types.none(tc, tq, tp), [colsa, q, c]), _ivec.as_pointer())
        _call(builder, f"llvm.masked.store.v{W}i32.p0", ir.VoidType(), [packed, p, ir.Constant(_i32, 4), first])
        row = builder.mul(context.cast(builder, q, tq, types.intp), ir.Constant(ir.IntType(64), 2))
        for v, r in ((a, row), (b, builder.add(row, ir.Constant(ir.IntType(64), 1)))):
            packed = _call(builder, f"llvm.experimental.vector.compress.v{W}f32", _vec, [v, lit, _ZERO])
            p = _addr(context, builder, types.none(tv, types.intp, tp), [valsa, r, c])
            _call(builder, f"llvm.masked.store.v{W}f32.p0", ir.VoidType(), [packed, p, ir.Constant(_i32, 4), first])
        return count
    return types.int64(cols, vals, q, c, f32v, f32v, k, n), codegen


@intrinsic
def bitspan(typingctx, m):
    """(lowest, highest) index of the set bits of an int64 m != 0 (two instructions: tzcnt and lzcnt)."""
    def codegen(context, builder, sig, args):
        i64, no = ir.IntType(64), ir.Constant(ir.IntType(1), 1)  # m != 0: zero is undefined
        lo = _call(builder, "llvm.cttz.i64", i64, [args[0], no])
        hi = builder.sub(ir.Constant(i64, 63), _call(builder, "llvm.ctlz.i64", i64, [args[0], no]))
        return context.make_tuple(builder, sig.return_type, [lo, hi])
    return types.UniTuple(types.int64, 2)(types.int64), codegen


@intrinsic
def vmask(typingctx, v, a):
    """v where a > 0, else 0: the ReLU mask of a backward product (a is the ReLU's output)."""
    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered(">", args[1], _ZERO), args[0], _ZERO)
    return f32v(f32v, f32v), codegen


@intrinsic
def vnonzero(typingctx, v):
    """The lanes that are non-zero (or NaN), as the bits of an int64 (bit l for lane l): one compare and a
    movemask, for the lit pixels of several blocks at once."""
    def codegen(context, builder, sig, args):
        bits = builder.bitcast(builder.fcmp_unordered("!=", args[0], _ZERO), ir.IntType(W))
        return builder.zext(bits, ir.IntType(64))
    return types.int64(f32v), codegen


@intrinsic
def vsum(typingctx, v):
    """The sum of the W lanes, always in the same order: the upper half added to the lower half until two
    lanes are left, then those two (for 8 lanes ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))); each step halves
    the width, the cheap instructions."""
    def codegen(context, builder, sig, args):
        v, u = args[0], ir.Constant(_vec, ir.Undefined)
        w = W // 2
        while w > 1:
            lo = builder.shuffle_vector(v, u, ir.Constant(ir.VectorType(_i32, w), list(range(w))))
            hi = builder.shuffle_vector(v, u, ir.Constant(ir.VectorType(_i32, w), list(range(w, 2 * w))))
            v, u = builder.fadd(lo, hi), ir.Constant(ir.VectorType(_f32, w), ir.Undefined)
            w //= 2
        return builder.fadd(builder.extract_element(v, ir.Constant(_i32, 0)),
                            builder.extract_element(v, ir.Constant(_i32, 1)))
    return types.float32(f32v), codegen


@intrinsic
def vsums(typingctx, t):
    """(vsum(t[0]), vsum(t[1]), ...) in lanes 0, 1, ... of one vector, zeros past len(t) <= W: the same
    sums in the same order as `vsum`, computed for all of them at once. Each step halves every sum's
    width for two vectors with two shuffles and one add (the lower halves of both, plus their upper
    halves): six 16-lane sums take 21 such operations, six `vsum`s 72."""
    if not (isinstance(t, types.UniTuple) and t.dtype == f32v and 1 <= t.count <= W):
        raise TypingError(f"simd: need a tuple of 1 to {W} vectors, got {t}")

    def codegen(context, builder, sig, args):
        vs = list(cgutils.unpack_tuple(builder, args[0], sig.args[0].count))
        w = W  # each vector holds W // w sums' partial sums, w lanes each, in order
        while w > 1:
            h = w // 2
            if len(vs) % 2:
                vs.append(_ZERO)
            lanes = [a * w + l for a in range(W // w) for l in range(h)]  # the lower halves of p's sums
            lanes += [W + x for x in lanes]  # then of q's
            lo, hi = ir.Constant(_ivec, lanes), ir.Constant(_ivec, [x + h for x in lanes])
            vs = [builder.fadd(builder.shuffle_vector(p, q, lo), builder.shuffle_vector(p, q, hi))
                  for p, q in zip(vs[::2], vs[1::2])]
            w = h
        return vs[0]
    return f32v(t), codegen


@intrinsic
def vtranspose(typingctx, src, i, k, nr, nc, dst, r, c, nw):  # noqa: PLR0913 -- a block's corners and sizes
    """dst[r + l, c : c + W] = src[i : i + W, k + l] for l < nw: a W x W block transposed in registers.

    Rows q >= nr (1 <= nr <= W) and columns >= nc of the block read as zeros, and nothing past them is
    read (masked loads); every stored row is a whole vector, so callers keep c + W <= dst's row length.
    log2(W) rounds of W two-vector shuffles: round s (W/2, ..., 2, 1) pairs rows q and q + s (q & s == 0)
    and swaps the s-lane blocks where their rows and columns cross, the recursive block transpose."""
    _check(src)
    _check(dst)

    def codegen(context, builder, sig, args):
        at = sig.args
        src_v, dst_v = args[0], args[5]
        i, k, nr, nc, r, c, nw = (context.cast(builder, args[a], at[a], types.intp) for a in (1, 2, 3, 4, 6, 7, 8))
        none = ir.Constant(i.type, 0)
        rows = []
        for q in range(W):
            inside = builder.icmp_signed("<", ir.Constant(i.type, q), nr)
            row = builder.select(inside, builder.add(i, ir.Constant(i.type, q)), i)  # past nr: no lane read
            p = _row_addr(context, builder, at[0], src_v, row, k)
            rows.append(_call(builder, f"llvm.masked.load.v{W}f32.p0", _vec,
                              [p, ir.Constant(_i32, 4), _lanes(builder, builder.select(inside, nc, none)), _ZERO]))
        s = W // 2
        while s >= 1:
            lo = ir.Constant(_ivec, [x if x % (2 * s) < s else W + x - s for x in range(W)])
            hi = ir.Constant(_ivec, [x + s if x % (2 * s) < s else W + x for x in range(W)])
            for q in (q for q in range(W) if q & s == 0):
                a, b = rows[q], rows[q + s]
                rows[q], rows[q + s] = builder.shuffle_vector(a, b, lo), builder.shuffle_vector(a, b, hi)
            s //= 2
        for q in range(W):
            with cgutils.if_likely(builder, builder.icmp_signed("<", ir.Constant(i.type, q), nw)):
                p = _row_addr(context, builder, at[5], dst_v, builder.add(r, ir.Constant(i.type, q)), c)
                builder.store(rows[q], p, align=4)
        return context.get_dummy_value()
    return types.none(src, i, k, nr, nc, dst, r, c, nw), codegen


@intrinsic
def prefetch(typingctx, ary, i, k):
    """Ask for the cache line of ary[i, k] ahead of use (a hint: never faults, even past the array's end).
    Any 2-D array with contiguous rows: random rows of a large array are what the hardware prefetchers
    cannot guess."""
    if not (isinstance(ary, types.Array) and ary.ndim == 2 and ary.layout == "C"):
        raise TypingError(f"simd: need a 2-D C-contiguous array, got {ary}")

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        i = context.cast(builder, args[1], sig.args[1], types.intp)
        k = context.cast(builder, args[2], sig.args[2], types.intp)
        row = cgutils.unpack_tuple(builder, arr.strides, 2)[0]
        off = builder.add(builder.mul(i, row), builder.mul(k, ir.Constant(i.type, ary.dtype.bitwidth // 8)))
        p = builder.gep(builder.bitcast(arr.data, ir.IntType(8).as_pointer()), [off])
        _call(builder, "llvm.prefetch.p0", ir.VoidType(), [p, ir.Constant(_i32, 0), ir.Constant(_i32, 3),
                                                          ir.Constant(_i32, 1)])
        return context.get_dummy_value()
    return types.none(ary, i, k), codegen


@intrinsic
def threads(typingctx):
    """The number of threads the next parallel loop of this thread runs on (`numba.get_num_threads()`).
    Numba's own version calls through a ctypes pointer, which makes a kernel uncacheable; this one calls
    the threading layer's `get_num_threads` by name, as Numba's parallel loops call the layer. The symbol
    exists once the layer is loaded: asking for the count here loads it before any code naming it is
    linked (a kernel loaded from the cache loads it as its parallel loop does)."""
    numba.get_num_threads()

    def codegen(context, builder, sig, args):
        return _call(builder, "get_num_threads", cgutils.intp_t, [])
    return types.intp(), codegen
