"""The vector functions of simd.py against NumPy, lane by lane, on the layouts the kernels use, at the width
this process compiles for (simd.W; tests/test_lanes.py runs them at the other width)."""

import numpy as np
import pytest
from numba import njit
from numba.core.errors import TypingError

from nn_numba.simd import (
    W,
    bitspan,
    prefetch,
    vadd,
    vbcast,
    vbits,
    vbload,
    vclamp,
    vdiv,
    ventry,
    vfma,
    vgather2,
    vlist,
    vload,
    vloadbytes,
    vloadn,
    vloadr,
    vmask,
    vmul,
    vnonzero,
    vsqrt,
    vstore,
    vstoren,
    vstorer,
    vsub,
    vsum,
    vsums,
    vtranspose,
    vtrunc,
    vzero,
)


@njit
def _copy_row(src, i, k, dst, r, c):
    vstore(dst, r, c, vload(src, i, k))


@njit
def _copy_n(src, i, k, dst, r, c, n):
    vstoren(dst, r, c, vloadn(src, i, k, n), n)


@njit
def _copy_range(src, i, k, dst, r, c, lo, hi):
    vstorer(dst, r, c, vloadr(src, i, k, lo, hi), lo, hi)


@njit
def _load_range(src, i, k, dst, lo, hi):
    vstore(dst, 0, 0, vloadr(src, i, k, lo, hi))


@njit
def _bcast(src, i, k, dst):
    vstore(dst, 0, 0, vbload(src, i, k))
    vstore(dst, 1, 0, vbcast(src[i, k] * 2))


@njit
def _arith(a, out):
    x, y, z = vload(a, 0, 0), vload(a, 1, 0), vload(a, 2, 0)
    vstore(out, 0, 0, vfma(x, y, z))
    vstore(out, 1, 0, vadd(x, y))
    vstore(out, 2, 0, vsub(x, y))
    vstore(out, 3, 0, vmul(x, y))
    vstore(out, 4, 0, vdiv(x, y))
    vstore(out, 5, 0, vsqrt(vmul(x, x)))
    vstore(out, 6, 0, vmask(x, y))
    vstore(out, 7, 0, vzero())


@njit
def _sum(a, i):
    return vsum(vload(a, i, 0))


@njit
def _nonzero(a, i):
    return vnonzero(vload(a, i, 0))


@njit
def _transpose(src, i, k, nr, nc, dst, r, c, nw):
    vtranspose(src, i, k, nr, nc, dst, r, c, nw)


def _data(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_load_store_any_offset_and_view():
    a = _data((5, 250))
    view = np.zeros((5, 256), np.float32)[:, :250]  # a row stride that is not the row length
    for i, k in [(0, 0), (3, 1), (4, 250 - W)]:
        view[:] = 0
        _copy_row(a, i, k, view, 4 - i, 250 - W - k % 3)
        want = np.zeros_like(view)
        want[4 - i, 250 - W - k % 3:250 - k % 3] = a[i, k:k + W]
        np.testing.assert_array_equal(view, want)


@pytest.mark.parametrize("n", sorted({-1, 0, 1, 2, 7, 8, 9, W - 1, W, W + 1}))
def test_masked_load_store_touch_only_n_lanes(n):
    a = _data((2, 40))
    out = np.full((2, 40), 7.0, np.float32)
    _copy_n(a, 1, 9, out, 0, 10, n)
    want = np.full((2, 40), 7.0, np.float32)
    m = max(0, min(n, W))
    want[0, 10:10 + m] = a[1, 9:9 + m]
    np.testing.assert_array_equal(out, want)


def test_masked_load_reads_nothing_past_the_row():
    # The last element of an exactly sized buffer: an unmasked load of W lanes would read past its end.
    a = _data((1, 3))
    out = np.zeros((1, W), np.float32)
    _copy_n(a, 0, 2, out, 0, 0, 1)
    np.testing.assert_array_equal(out[0], [a[0, 2]] + [0] * (W - 1))


@pytest.mark.parametrize("lo,hi", [(0, 8), (6, 8), (3, 5), (2, 2), (5, 3), (-1, 9), (7, 12), (0, W), (W - 2, W),
                                   (W - 1, W + 4)])
def test_range_load_store_touch_only_lanes_lo_to_hi(lo, hi):
    a = _data((2, 40))
    out = np.full((2, 40), 7.0, np.float32)
    _copy_range(a, 1, 9, out, 0, 10, lo, hi)
    want = np.full((2, 40), 7.0, np.float32)
    a_, b_ = max(lo, 0), min(hi, W)
    want[0, 10 + a_:10 + max(a_, b_)] = a[1, 9 + a_:9 + max(a_, b_)]
    np.testing.assert_array_equal(out, want)
    vec = np.full((1, W), 7.0, np.float32)
    _load_range(a, 1, 9, vec, lo, hi)
    np.testing.assert_array_equal(vec[0], [a[1, 9 + l] if a_ <= l < b_ else 0 for l in range(W)])


def test_broadcast_load_any_layout():
    a = _data((6, 9))
    out = np.zeros((2, W), np.float32)
    _bcast(a.T, 7, 2, out)  # a transposed view: element [7, 2] of aᵀ is a[2, 7]
    np.testing.assert_array_equal(out[0], np.full(W, a[2, 7]))
    np.testing.assert_array_equal(out[1], np.full(W, a[2, 7] * 2))


def test_arithmetic_lane_by_lane():
    a = _data((3, W), seed=1)
    a[1] = np.where(np.abs(a[1]) < 0.1, 0.5, a[1])  # no division by ~0
    x, y, z = a.astype(np.float64)
    out = np.zeros((8, W), np.float32)
    _arith(a, out)
    np.testing.assert_allclose(out[0], x * y + z, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[1], a[0] + a[1])
    np.testing.assert_array_equal(out[2], a[0] - a[1])
    np.testing.assert_array_equal(out[3], a[0] * a[1])
    np.testing.assert_array_equal(out[4], a[0] / a[1])
    np.testing.assert_array_equal(out[5], np.sqrt(a[0] * a[0]))
    np.testing.assert_array_equal(out[6], np.where(a[1] > 0, a[0], 0))
    np.testing.assert_array_equal(out[7], np.zeros(W))


def halving_sum(l: np.ndarray) -> np.float32:
    """The upper half added to the lower half until two lanes are left, then those two; float32."""
    while len(l) > 2:
        l = l[:len(l) // 2] + l[len(l) // 2:]
    return l[0] + l[1]


def test_sum_fixed_order():
    a = _data((4, W), seed=2)
    for i in range(4):
        assert _sum(a, i) == halving_sum(a[i])
        assert abs(float(_sum(a, i)) - a[i].astype(np.float64).sum()) < 1e-5
    l = a[0, :8]  # the order written out for 8 lanes
    assert halving_sum(l) == ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))


def test_rejects_arrays_it_cannot_load_rows_from():
    with pytest.raises(TypingError):
        _copy_row(np.zeros((8, 8), np.float64), 0, 0, np.zeros((8, 8), np.float32), 0, 0)
    with pytest.raises(TypingError):
        _copy_row(np.zeros((8, 8), np.float32).T, 0, 0, np.zeros((8, 8), np.float32), 0, 0)


@njit
def _prefetch(a, i, k):
    prefetch(a, i, k)
    return a[0, 0]


def test_prefetch_is_only_a_hint():
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert _prefetch(a, 2, 1) == 0
    assert _prefetch(a, 10**9, 0) == 0  # far past the end: a prefetch never faults
    with pytest.raises(TypingError):
        _prefetch(np.zeros((4, 4), np.float32).T, 0, 0)  # columns are not contiguous


def test_nonzero_has_the_bit_of_each_non_zero_lane():
    a = np.zeros((W + 2, W), np.float32)
    for lane in range(W):
        a[lane, lane] = 1e-45 if lane % 2 else -3.0  # a denormal and a negative count too
    a[W, 3] = np.nan
    a[W, 5] = 2.0
    a[W + 1, 0] = -0.0  # equal to zero
    assert [_nonzero(a, i) for i in range(W + 2)] == [1 << lane for lane in range(W)] + [(1 << 3) | (1 << 5), 0]


@njit
def _clamp_trunc(a, lo, hi, out):
    v = vclamp(vload(a, 0, 0), vbcast(lo), vbcast(hi))
    vstore(out, 0, 0, v)
    vstore(out, 1, 0, vtrunc(v))


def test_clamp_is_numbas_scalar_min_max_and_trunc_rounds_toward_zero():
    a = np.zeros((1, W), np.float32)
    a[0] = np.r_[-0.0, 0.0, -1.5, 29.0, 29.5, 3.999, -0.25, 12.5, np.linspace(0.1, 28.9, W - 8)].astype(np.float32)
    lo, hi = np.float32(0), np.float32(29)
    out = np.zeros((2, W), np.float32)
    _clamp_trunc(a, lo, hi, out)

    @njit
    def scalar(x):
        return min(max(x, lo), hi)

    want = np.array([scalar(x) for x in a[0]], np.float32)
    assert out[0].tobytes() == want.tobytes()  # the sign of a zero too: -0.0 stays -0.0
    assert np.signbit(out[0, 0]) and not np.signbit(out[0, 1])
    np.testing.assert_array_equal(out[1], np.trunc(want))
    _clamp_trunc(np.full((1, W), -2.7, np.float32), np.float32(-5), hi, out)
    np.testing.assert_array_equal(out[1], np.full(W, -2.0))  # toward zero, not floor


@njit
def _bits(a, lo, hi, n):
    return vbits(vload(a, 0, 0), lo, hi, n)


def test_bits_are_the_lanes_strictly_inside_and_below_n():
    a = np.arange(W, dtype=np.float32)[None] - 2  # -2, -1, 0, 1, ...
    lo, hi = np.float32(0), np.float32(W - 5)
    for n in (0, 3, W - 4, W, W + 3):
        want = sum(1 << lane for lane in range(min(n, W)) if lo < a[0, lane] < hi)
        assert _bits(a, lo, hi, n) == want
    a[0, 5] = np.nan
    assert not _bits(a, np.float32(-np.inf), np.float32(np.inf), W) >> 5 & 1


@njit
def _span(m):
    return bitspan(m)


def test_bitspan_is_the_lowest_and_highest_set_bit():
    rng = np.random.default_rng(3)
    for m in [1, 2, 6, 1 << 27, (1 << 28) - 1, -1, np.iinfo(np.int64).min, *rng.integers(1, 2**62, 20)]:
        u = int(m) % 2**64
        assert _span(np.int64(m)) == ((u & -u).bit_length() - 1, u.bit_length() - 1)


@njit
def _gather(a, i, q, off, n, dst):
    x, y = vgather2(a, i, vload(q, 0, 0), off, n)
    vstore(dst, 0, 0, x)
    vstore(dst, 1, 0, y)


@njit
def _load_bytes(src, i, k, n, dst):
    vstore(dst, 0, 0, vloadbytes(src, i, k, n))


def test_gathers_and_byte_loads_touch_only_n_lanes():
    a = np.arange(5 * 7, dtype=np.float32).reshape(5, 7) * 1.5
    q = ((np.arange(W) * 5) % 19).astype(np.float32)[None]  # positions run across rows, in any order
    for i, off, n in ((0, 0, W), (1, 3, W), (2, 1, 5), (0, 9, 0)):
        dst = np.full((2, W), np.nan, np.float32)
        _gather(a, i, q, off, n, dst)
        for h in (0, 1):  # the float at each position, and the one after it
            want = a.ravel()[i * 7 + q[0].astype(int) + off + h]
            np.testing.assert_array_equal(dst[h], np.r_[want[:n], np.zeros(W - n)].astype(np.float32))
    src = np.arange(3 * 40, dtype=np.uint8).reshape(3, 40) * 2
    for n in (0, 7, W):
        dst = np.full((1, W), np.nan, np.float32)
        _load_bytes(src, 2, 9, n, dst)
        np.testing.assert_array_equal(dst[0], np.r_[src[2, 9:9 + n], np.zeros(W - n)].astype(np.float32))
    with pytest.raises(TypingError):
        _load_bytes(src[:, ::2], 0, 0, 4, np.zeros((1, W), np.float32))  # rows are not contiguous
    with pytest.raises(TypingError):
        _gather(a[:, ::2], 0, q, 0, 1, np.zeros((2, W), np.float32))  # not C-contiguous


@njit
def _list(src, n, cols, vals, q, c, k):  # all W lanes of both rows: those past n must not be listed
    return vlist(cols, vals, q, c, vload(src, 0, 0), vload(src, 1, 0), k, n)


def test_list_appends_the_lanes_either_vector_lights_below_n_in_order():
    """vlist against np.nonzero: a lane lit in either vector is listed with both values; NaN is listed, -0.0
    is not (as `x != 0`); lanes at or past n never are; nothing is written past the appended lanes."""
    rng = np.random.default_rng(11)
    for trial in range(60):
        src = rng.random((2, W), dtype=np.float32)
        src[rng.random((2, W)) < rng.random()] = 0
        src[trial % 2, rng.integers(W)] = [np.nan, -0.0, 0.0, 1e-45, -0.0, 3.0][trial % 6]
        if trial % 5 == 0:
            src[1] = 0  # the zeros an odd last sample is paired with
        n, c, k, q = int(rng.integers(0, W + 1)), int(rng.integers(0, 5)), int(rng.integers(0, 1000)), trial % 2
        cols = np.full((3, c + W + 2), -1, np.int32)
        vals = np.full((5, c + W + 2), 9.0, np.float32)
        got = _list(src, n, cols, vals, q, c, k)
        (want,) = np.nonzero((src[0, :n] != 0) | (src[1, :n] != 0))
        assert got == len(want)
        assert cols[q, c:c + got].tolist() == (want + k).tolist()
        np.testing.assert_array_equal(vals[2 * q:2 * q + 2, c:c + got], src[:, want])
        untouched = np.ones(cols.shape, bool)
        untouched[q, c:c + got] = False
        assert (cols[untouched] == -1).all()
        untouched = np.ones(vals.shape, bool)
        untouched[2 * q:2 * q + 2, c:c + got] = False
        assert (vals[untouched] == 9).all()
    with pytest.raises(TypingError):
        _list(src, 1, np.zeros((1, W), np.int64), np.zeros((2, W), np.float32), 0, 0, 0)


LAST = W - 3  # a global: a constant to Numba, where the expression W - 3 in a kernel is a computed int64


@njit
def _entries(src, out, r, k, tag):
    v = vload(src, 0, 0)
    ventry(out, r, k, v, 0, tag)
    ventry(out, r, k + 4, v, 3, tag + 1)
    ventry(out, r, k + 8, v, LAST, tag + 2)


def test_entry_stores_three_lanes_and_the_tags_bits_and_nothing_else():
    """ventry writes lanes lo .. lo + 2 of v and the int32 bits of the tag as the fourth float, at any
    offset, and no float outside those four; a first lane that is not a constant in range is refused."""
    src = _data((1, W))
    for r, k, tag in ((0, 0, 0), (1, 5, 255), (2, 17, 2**31 - 3)):
        out = np.full((3, 32), 7.0, np.float32)
        _entries(src, out, r, k, tag)
        want = np.full((3, 32), 7.0, np.float32)
        for e, lo in enumerate((0, 3, W - 3)):
            want[r, k + 4 * e:k + 4 * e + 3] = src[0, lo:lo + 3]
            want[r, k + 4 * e + 3] = np.array([tag + e], np.int32).view(np.float32)[0]
        assert out.view(np.int32).tolist() == want.view(np.int32).tolist()

    @njit
    def late_lane(src, out):
        ventry(out, 0, 0, vload(src, 0, 0), W - 2, 1)

    @njit
    def variable_lane(src, out, lo):
        ventry(out, 0, 0, vload(src, 0, 0), lo, 1)

    for bad in (lambda: late_lane(src, out), lambda: variable_lane(src, out, 0)):
        with pytest.raises(TypingError):
            bad()


@njit
def _sums6(a, out):
    vstore(out, 0, 0, vsums((vload(a, 0, 0), vload(a, 1, 0), vload(a, 2, 0), vload(a, 3, 0), vload(a, 4, 0),
                             vload(a, 5, 0))))


def test_sums_are_each_vectors_sum_in_vsums_order():
    """vsums gives, lane by lane, the bits `vsum` gives each vector (its order, not just its value), and
    zeros past the last."""
    a = _data((6, W), seed=5)
    a[2] *= 1e6  # large and small lanes: a different order would round differently
    out = np.full((1, W), np.nan, np.float32)
    _sums6(a, out)
    assert out[0, :6].tolist() == [halving_sum(a[i]) for i in range(6)]
    assert out[0, :6].tolist() == [_sum(a, i) for i in range(6)]
    assert not out[0, 6:].any()
    with pytest.raises(TypingError):
        _sums_bad(a)


@njit
def _sums_bad(a):
    return vsums((vload(a, 0, 0), np.float32(1)))


@pytest.mark.parametrize("nr,nc,nw", [(W, W, W), (1, W, W), (W, 1, W), (3, 5, 5), (W, W, 2), (W - 1, 2, 1)])
def test_transpose_block_rows_and_columns_past_the_edges_are_zeros(nr, nc, nw):
    a = _data((2 + nr, 3 + nc))[:, :3 + nc]  # the block is the array's last rows and columns: nothing past them exists
    out = np.full((W + 5, W + 7), 7.0, np.float32)
    _transpose(a, 2, 3, nr, nc, out, 4, 6, nw)
    block = np.zeros((W, W), np.float32)
    block[:nr, :nc] = a[2:2 + nr, 3:3 + nc]
    want = np.full_like(out, 7.0)
    want[4:4 + nw, 6:6 + W] = block.T[:nw]
    np.testing.assert_array_equal(out, want)
