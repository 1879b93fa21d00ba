"""Every FLOP of training and inference: explicit loops compiled by Numba, no BLAS.

Layout (the PyTorch one): a layer's weights W are (out, in) row-major and it computes Y = X Wᵀ + b.
With that layout no product needs a transpose:
  forward      Y  = X Wᵀ     dot form, contiguous rows of X and W            -> 6x2 register tiles
  backward dX  dX = dY W     axpy form over contiguous rows of W             -> 6x16 register tiles
  backward dW  dW = dYᵀ X    axpy form over contiguous rows of X, dYᵀ packed -> 6x16 register tiles
The first layer is the exception in training: 81 % of MNIST's pixels are 0, and skipping them needs its
weights transposed, WT = W1ᵀ (see "The first layer" below):
  forward      Y  = X WT     the ~150 lit rows of WT per sample              -> 64-column chunks
  backward dW  gWT = Xᵀ dY   the samples that light a block of 6 pixels      -> 6x16 register tiles
The tiles' sums live in 8-lane vector registers (`simd.f32x8`) for a whole reduction. Every output
element is written by exactly one prange task with a summation order the code spells out, so results
are bit-identical run after run, for any thread count, and whether a kernel was compiled now or loaded
from the cache (that is why no kernel is compiled with `fastmath`: see `_exact`). Float32 scalars are
spelled np.float32(0): a bare 0.0 is float64 in Numba.
Callers hand in 64-byte aligned arrays (`aligned_zeros`; activation rows padded to 16 floats): 32-byte
loads that straddle cache lines cost 10-25 % on the products. No data-dependent branches in hot loops:
ReLU signs are random.
"""

import numpy as np
from numba import njit, prange

from . import jitcache
from .simd import (
    prefetch,
    vadd,
    vany,
    vbcast,
    vbload,
    vdiv,
    vfma,
    vload,
    vloadn,
    vloadr,
    vmask,
    vmul,
    vsqrt,
    vstore,
    vstoren,
    vstorer,
    vsub,
    vsum,
    vzero,
)

jitcache.use()  # before the first @njit(cache=True): the compiled kernels go to a folder keyed by their sources

SGD, MOMENTUM, ADAM, NO_UPDATE = 0, 1, 2, 3  # optimiser codes, as in the checkpoint's OPTM section

# u8 -> float32 pixel, exactly u8 / 255 as the C++ port computes it: one table load per pixel instead of a
# division.
PIXEL = (np.arange(256, dtype=np.float32) / np.float32(255)).astype(np.float32)

# Every kernel (here and in augment.py) is compiled *without* fastmath. Numba optimises a callee (a called
# @njit function, or the body of a prange loop) in a module of its own, then links that optimised code
# into its caller's module and optimises it again. Under fastmath's flags a second pass is free to
# contract and reassociate what the first one left, so the caller's copy can round differently from the
# callee's own, and which copy runs depends on whether they were compiled in this process or loaded from
# the cache (augment.elastic_gather's prange body did: other last bits from a cold cache). IEEE arithmetic
# is the same after any number of passes; where an FMA is wanted the code says so (`vfma`).
_exact = dict(cache=True)


def aligned_zeros(shape: int | tuple[int, ...], dtype=np.float32, align: int = 64) -> np.ndarray:
    """Zeros whose first element sits on an `align`-byte boundary.

    NumPy only promises 16 bytes, and a large np.zeros usually lands 16 bytes past a page start, so every
    second 32-byte load of a row straddles two cache lines: on a Zen 3 core the products over 784-wide
    rows (X, W1, gW1) run 10-25 % slower that way. Used for the parameters, gradients, optimiser state,
    batch and activation buffers.
    """
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    buf = np.zeros(n * dtype.itemsize + align, np.uint8)
    off = (-buf.ctypes.data) % align
    return buf[off:off + n * dtype.itemsize].view(dtype).reshape(shape)


@njit(parallel=True, cache=True)
def gather(X_u8, idx, lut, out):
    """out[i] = lut[X_u8[idx[i]]]: a mini-batch as float32 pixels in [0, 1].

    X_u8 (N, K) uint8, idx (B,) int64, lut (256,) float32, out (>=B, K) float32.
    prange over samples: each writes its own row.
    """
    K = X_u8.shape[1]
    B = idx.shape[0]
    for i in prange(B):
        if i + 4 < B:  # the rows are random, so DRAM latency dominates unless the row 4 ahead is on its way
            for k in range(0, K, 64):
                prefetch(X_u8, idx[i + 4], k)
        r = idx[i]
        for k in range(K):
            out[i, k] = lut[X_u8[r, k]]


@njit(parallel=True, cache=True)
def gather_nonzeros(X_u8, X_u64, idx, lut, out, cnt, cols, vals):
    """`gather` and `nonzeros` in one pass: out[i] = lut[X_u8[idx[i]]], and its non-zero pixels in pixel
    order, cols[i, :cnt[i]] and vals[i, :cnt[i]], for the first layer's sparse forward product.

    X_u8 (N, K) uint8 with K % 8 == 0, X_u64 the same memory as (N, K/8) uint64 (X_u8.view(np.uint64)),
    idx (B,) int64, lut (256,) float32 with lut[0] == 0, out (>=B, K) float32, cnt/cols/vals as
    `nonzeros`. Eight pixels at a time: an all-zero block (60 % of MNIST's) is one 64-bit compare and one
    vector store of zeros, the others are looked up and appended branch-free. It spares the second pass
    over the batch that `nonzeros` makes (2-3 % of a step). prange over samples, each writes its own
    rows; the row four ahead is prefetched as in `gather`.
    """
    B = idx.shape[0]
    for i in prange(B):
        if i + 4 < B:
            for k in range(0, X_u8.shape[1], 64):
                prefetch(X_u8, idx[i + 4], k)
        r = idx[i]
        c = 0
        for kb in range(X_u64.shape[1]):
            k = kb * 8
            if X_u64[r, kb] == 0:
                vstore(out, i, k, vzero())
                continue
            for kk in range(k, k + 8):
                x = lut[X_u8[r, kk]]
                out[i, kk] = x
                cols[i, c] = kk
                vals[i, c] = x
                c += x != 0
        cnt[i] = c


# ---------------------------------------------------------------------------------------------------
# Linear layer: forward and the two backward products, side by side.


@njit(parallel=True, **_exact)
def linear_forward(X, W, b, Y, relu):
    """Y = X Wᵀ + b, then ReLU when `relu`.

    X (B, K), W (N, K), b (N,), Y (B, N), all float32.
    Dot form: each task owns a 6x2 tile of Y and keeps its 12 sums in 12 vector registers (8 lanes of k
    each), so every vector loaded from W feeds six FMAs and every vector of X two; the K % 8 tail is one
    more masked step; then one horizontal sum per output, bias and ReLU while the tile is in registers,
    no branch (`_clip`). 6x2 and not 4x4: 16 sums + 8 operands spill AVX2's 16 vector registers; 12 + 3
    fit.
    prange over tiles, row-major, so consecutive tiles of one thread share their X rows in L1. The last
    tile of a ragged edge is moved back to overlap its neighbour and stores only its own outputs.
    """
    B, K = X.shape
    N = W.shape[0]
    lo = np.float32(0) if relu else np.float32(-3.4028235e38)
    K8 = K - K % 8
    tn = (N + 1) // 2
    for t in prange(((B + 5) // 6) * tn):
        i = (t // tn) * 6
        j = (t % tn) * 2
        if B < 6 or N < 2:  # too small for a tile (e.g. one sample): one output at a time, 4 x 8 lanes
            for ii in range(i, min(i + 6, B)):
                for jj in range(j, min(j + 2, N)):
                    s0 = s1 = s2 = s3 = vzero()
                    for k in range(0, K - K % 32, 32):
                        s0 = vfma(vload(X, ii, k), vload(W, jj, k), s0)
                        s1 = vfma(vload(X, ii, k + 8), vload(W, jj, k + 8), s1)
                        s2 = vfma(vload(X, ii, k + 16), vload(W, jj, k + 16), s2)
                        s3 = vfma(vload(X, ii, k + 24), vload(W, jj, k + 24), s3)
                    for k in range(K - K % 32, K, 8):
                        s0 = vfma(_ld(X, ii, k, K - k), _ld(W, jj, k, K - k), s0)
                    Y[ii, jj] = _clip(vsum(vadd(vadd(s0, s1), vadd(s2, s3))) + b[jj], lo)
            continue
        i0, j0 = min(i, B - 6), min(j, N - 2)
        s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = s40 = s41 = s50 = s51 = vzero()
        for k in range(0, K8, 8):
            w0, w1 = vload(W, j0, k), vload(W, j0 + 1, k)
            x = vload(X, i0, k)
            s00, s01 = vfma(x, w0, s00), vfma(x, w1, s01)
            x = vload(X, i0 + 1, k)
            s10, s11 = vfma(x, w0, s10), vfma(x, w1, s11)
            x = vload(X, i0 + 2, k)
            s20, s21 = vfma(x, w0, s20), vfma(x, w1, s21)
            x = vload(X, i0 + 3, k)
            s30, s31 = vfma(x, w0, s30), vfma(x, w1, s31)
            x = vload(X, i0 + 4, k)
            s40, s41 = vfma(x, w0, s40), vfma(x, w1, s41)
            x = vload(X, i0 + 5, k)
            s50, s51 = vfma(x, w0, s50), vfma(x, w1, s51)
        if K8 < K:  # the K % 8 tail: one more step with masked loads (zeros past the row)
            n = K - K8
            w0, w1 = vloadn(W, j0, K8, n), vloadn(W, j0 + 1, K8, n)
            x = vloadn(X, i0, K8, n)
            s00, s01 = vfma(x, w0, s00), vfma(x, w1, s01)
            x = vloadn(X, i0 + 1, K8, n)
            s10, s11 = vfma(x, w0, s10), vfma(x, w1, s11)
            x = vloadn(X, i0 + 2, K8, n)
            s20, s21 = vfma(x, w0, s20), vfma(x, w1, s21)
            x = vloadn(X, i0 + 3, K8, n)
            s30, s31 = vfma(x, w0, s30), vfma(x, w1, s31)
            x = vloadn(X, i0 + 4, K8, n)
            s40, s41 = vfma(x, w0, s40), vfma(x, w1, s41)
            x = vloadn(X, i0 + 5, K8, n)
            s50, s51 = vfma(x, w0, s50), vfma(x, w1, s51)
        if i0 == i and j0 == j:  # an inner tile: straight-line epilogue
            b0, b1 = b[j], b[j + 1]
            Y[i, j], Y[i, j + 1] = _clip(vsum(s00) + b0, lo), _clip(vsum(s01) + b1, lo)
            Y[i + 1, j], Y[i + 1, j + 1] = _clip(vsum(s10) + b0, lo), _clip(vsum(s11) + b1, lo)
            Y[i + 2, j], Y[i + 2, j + 1] = _clip(vsum(s20) + b0, lo), _clip(vsum(s21) + b1, lo)
            Y[i + 3, j], Y[i + 3, j + 1] = _clip(vsum(s30) + b0, lo), _clip(vsum(s31) + b1, lo)
            Y[i + 4, j], Y[i + 4, j + 1] = _clip(vsum(s40) + b0, lo), _clip(vsum(s41) + b1, lo)
            Y[i + 5, j], Y[i + 5, j + 1] = _clip(vsum(s50) + b0, lo), _clip(vsum(s51) + b1, lo)
        else:  # a tile moved back over its neighbour: store only its own outputs
            y = (vsum(s00), vsum(s01), vsum(s10), vsum(s11), vsum(s20), vsum(s21),
                 vsum(s30), vsum(s31), vsum(s40), vsum(s41), vsum(s50), vsum(s51))
            for q in range(i - i0, 6):
                for c in range(j - j0, 2):
                    Y[i0 + q, j0 + c] = _clip(y[2 * q + c] + b[j0 + c], lo)


@njit(**_exact)
def _clip(v, lo):
    """max(v, lo) as a select: lo = 0 is the ReLU, lo = the lowest float32 leaves v alone. A branch per
    output (`if Y < 0`, as before) mispredicts on about half of them: the 250-wide forward product ran at
    35 instead of 61 GFLOP/s on real (mixed-sign) data."""
    return lo if v < lo else v


@njit(**_exact)
def _tile(C, r, D, k):
    """The axpy micro-kernel of both backward products: a 6x16 block of C·D in 12 vector registers.

    Returns acc[2q + h] = Σ_p C[r + q, p] · D[p, k + 8h : k + 8h + 8] for q < 6, h < 2 (rows r..r+5 of C
    and columns k..k+15 of D must exist). Per p: two vectors of D, six broadcasts of C, 12 FMAs; the sums
    never leave registers until the whole reduction is done (what LLVM would not do for scalar code).
    """
    a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = a40 = a41 = a50 = a51 = vzero()
    for p in range(C.shape[1]):
        x0, x1 = vload(D, p, k), vload(D, p, k + 8)
        c = vbload(C, r, p)
        a00, a01 = vfma(c, x0, a00), vfma(c, x1, a01)
        c = vbload(C, r + 1, p)
        a10, a11 = vfma(c, x0, a10), vfma(c, x1, a11)
        c = vbload(C, r + 2, p)
        a20, a21 = vfma(c, x0, a20), vfma(c, x1, a21)
        c = vbload(C, r + 3, p)
        a30, a31 = vfma(c, x0, a30), vfma(c, x1, a31)
        c = vbload(C, r + 4, p)
        a40, a41 = vfma(c, x0, a40), vfma(c, x1, a41)
        c = vbload(C, r + 5, p)
        a50, a51 = vfma(c, x0, a50), vfma(c, x1, a51)
    return (a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51)


@njit(**_exact)
def _tile_n(C, r, D, k, n):
    """_tile for the last n < 8 + 1 columns of D: acc[q] = Σ_p C[r + q, p] · D[p, k : k + n], zeros past n.
    A separate 6x8 kernel because the masked loads need registers the 6x16 tile has no room for."""
    a0 = a1 = a2 = a3 = a4 = a5 = vzero()
    for p in range(C.shape[1]):
        x = vloadn(D, p, k, n)
        a0 = vfma(vbload(C, r, p), x, a0)
        a1 = vfma(vbload(C, r + 1, p), x, a1)
        a2 = vfma(vbload(C, r + 2, p), x, a2)
        a3 = vfma(vbload(C, r + 3, p), x, a3)
        a4 = vfma(vbload(C, r + 4, p), x, a4)
        a5 = vfma(vbload(C, r + 5, p), x, a5)
    return (a0, a1, a2, a3, a4, a5)


@njit(parallel=True, **_exact)
def linear_backward_input(dY, W, A, dX):
    """dX = (dY W) ⊙ [A > 0]: the gradient at the layer's input, through the previous layer's ReLU.

    dY (B, N), W (N, K), A (B, K) the layer's input (a ReLU output, so A > 0 exactly where its
    pre-activation was > 0), dX (B, K). Axpy form over contiguous rows of W: each task owns a 6x16 tile
    of dX (`_tile` with C = dY, D = W, summing over the N outputs), masks it and stores it once. prange
    over tiles, batch blocks fastest, so the 16 columns of W a run of tasks reads stay in L1. The last
    tile of a ragged edge overlaps its neighbour and stores only its own rows, or its own columns (the
    K % 16 last ones: one full tile, 4 % faster at K = 250 than two masked 6x8 passes).
    """
    B, N = dY.shape
    K = W.shape[1]
    nb = (B + 5) // 6
    for t in prange(nb * ((K + 15) // 16)):
        i = (t % nb) * 6
        k = (t // nb) * 16
        if B < 6:  # too few samples for a tile: one row of 8 lanes at a time
            for ii in range(i, min(i + 6, B)):
                for kk in range(k, min(k + 16, K), 8):
                    s = vzero()
                    for j in range(N):
                        s = vfma(vbload(dY, ii, j), _ld(W, j, kk, K - kk), s)
                    _st(dX, ii, kk, vmask(s, _ld(A, ii, kk, K - kk)), K - kk)
            continue
        i0 = min(i, B - 6)
        if k + 16 <= K:
            acc = _tile(dY, i0, W, k)
            for q in range(i - i0, 6):
                vstore(dX, i0 + q, k, vmask(acc[2 * q], vload(A, i0 + q, k)))
                vstore(dX, i0 + q, k + 8, vmask(acc[2 * q + 1], vload(A, i0 + q, k + 8)))
        elif K >= 16:  # the ragged last block: the full tile moved back to K - 16 stores its own lanes only
            k0 = K - 16
            acc = _tile(dY, i0, W, k0)
            for q in range(i - i0, 6):
                for h in range(2):
                    lo = k - k0 - 8 * h  # first lane of this half that is not the neighbour's
                    if lo < 8:
                        kk = k0 + 8 * h
                        vstorer(dX, i0 + q, kk, vmask(acc[2 * q + h], vloadr(A, i0 + q, kk, lo, 8)), lo, 8)
        else:
            for kk in range(k, K, 8):
                acc = _tile_n(dY, i0, W, kk, K - kk)
                for q in range(i - i0, 6):
                    vstoren(dX, i0 + q, kk, vmask(acc[q], vloadn(A, i0 + q, kk, K - kk)), K - kk)


def ws_size(n_out: int, batch: int) -> int:
    """Floats of the workspace linear_backward_weight needs for n_out outputs and `batch` samples."""
    return ((n_out + 5) // 6) * batch * 8


@njit(parallel=True, **_exact)
def linear_backward_weight(dY, A, ws, gW, gb, W, b, mW, mb, vW, vb, kind, lr, mom, nesterov, wd, b1, b2, eps, c1,
                           c2):
    """gW = dYᵀ A, gb = Σ_batch dY, then the optimiser step on W and b, fused.

    dY (B, N), A (B, K) the layer's input, gW/W/mW/vW (N, K), gb/b/mb/vb (N,), ws a float32 workspace of
    ws_size(N, B). Axpy form over contiguous rows of A: each task owns a 6x16 tile of gW (`_tile` with
    C = dYᵀ, D = A, summing over the batch), stores it once and takes the optimiser step on the same block
    of W with the gradient still in registers (`_step`); the tasks of the first column block also own gb
    and b. prange over tiles, row blocks fastest, so the 16 columns of A a run of tasks reads stay in L1.
    Tiles are disjoint, so no races, and one parallel region per call (two with the packing). Must run
    after linear_backward_input, which reads the old W. `kind`, the hyper-parameters and the Adam bias
    corrections c1 = 1/(1-β1ᵗ), c2 = 1/(1-β2ᵗ) are those of `update`; kind NO_UPDATE only computes the
    gradients. gW is stored only then: a training step never reads it back, and writing 0.8 MB of gW1
    per step cost 2-6 % of the step (gb is always stored).

    dYᵀ is first packed, as OpenBLAS packs its operands: ws[jb, p, :6] = dY[p, 6jb : 6jb + 6], zeros past
    N. The tile's six broadcasts per sample then come from one 32-byte slot instead of a fresh cache line
    of dY, so the two panels a tile streams fit L1 together at B = 256 (dW1 +5-7 %, dW2 +9 %); and the
    last row block is zero-padded instead of overlapping its neighbour.
    """
    B, N = dY.shape
    K = A.shape[1]
    nj = (N + 5) // 6
    pk = ws[:nj * B * 8].reshape((nj, B, 8))
    if N >= 6:
        for t in prange(nj):
            for p in range(B):
                vstore(pk[t], p, 0, _ld(dY, p, 6 * t, N - 6 * t))  # lanes 6, 7 are never read
    for t in prange(nj * ((K + 15) // 16)):
        j = (t % nj) * 6
        k = (t // nj) * 16
        if N < 6:  # too few outputs for a tile: one row of 8 lanes at a time
            for jj in range(j, N):
                for kk in range(k, min(k + 16, K), 8):
                    s = vzero()
                    for i in range(B):
                        s = vfma(vbload(dY, i, jj), _ld(A, i, kk, K - kk), s)
                    if kind == NO_UPDATE:
                        _st(gW, jj, kk, s, K - kk)
                    _step_call(W, mW, vW, jj, kk, s, K - kk, kind, lr, mom, nesterov, wd, b1, b2, eps, c1, c2)
        else:
            C = pk[j // 6].T  # (8, B): C[q, p] = dY[p, j + q]
            nq = min(6, N - j)  # rows of W this tile owns; the rest is padding
            if kind == MOMENTUM or kind == ADAM:  # 2-3 blocks from L3 after the reduction: ask for them now
                for q in range(nq):
                    prefetch(W, j + q, k)
                    prefetch(W, j + q, min(k + 15, K - 1))
                    prefetch(mW, j + q, k)
                    prefetch(mW, j + q, min(k + 15, K - 1))
                    if kind == ADAM:
                        prefetch(vW, j + q, k)
                        prefetch(vW, j + q, min(k + 15, K - 1))
            if k + 16 <= K:
                acc = _tile(C, 0, A, k)
                for q in range(nq):
                    for h in range(2):
                        if kind == NO_UPDATE:
                            vstore(gW, j + q, k + 8 * h, acc[2 * q + h])
                        _step(W, mW, vW, j + q, k + 8 * h, acc[2 * q + h], 8, kind, lr, mom, nesterov, wd, b1, b2,
                              eps, c1, c2)
            else:
                for kk in range(k, K, 8):
                    acc = _tile_n(C, 0, A, kk, K - kk)
                    for q in range(nq):
                        if kind == NO_UPDATE:
                            _st(gW, j + q, kk, acc[q], K - kk)
                        _step_call(W, mW, vW, j + q, kk, acc[q], K - kk, kind, lr, mom, nesterov, wd, b1, b2, eps,
                                   c1, c2)
        if k == 0:  # the first column of tiles also owns gb and b: column sums of dY
            _bias_step(dY, gb, b, mb, vb, j, min(j + 6, N), kind, lr, mom, nesterov, b1, b2, eps, c1, c2)


@njit(**_exact, inline="always")  # a call per 8 lanes would cost more than the step
def _step(P, M, V, r, k, g, n, kind, lr, mom, nesterov, wd, b1, b2, eps, c1, c2):
    """`update` on P[r, k : k + n] (n <= 8) with the gradient g still in a register: the optimiser step of
    a gW tile, done by the task that computed it while the block of W is in L1 (no second pass over W
    and gW, no 1-D slice per row, whose reference count Numba would update atomically). Masked loads and
    stores only for n < 8: AMD's masked stores are slow."""
    if kind == NO_UPDATE:
        return
    p = _ld(P, r, k, n)
    g = vfma(vbcast(wd), p, g)  # explicit FMAs: one rounding each, the same in every compile
    if kind == SGD:
        p = vfma(vbcast(-lr), g, p)
    elif kind == MOMENTUM:
        m = vfma(vbcast(mom), _ld(M, r, k, n), g)
        _st(M, r, k, m, n)
        p = vfma(vbcast(-lr), vfma(vbcast(mom), m, g) if nesterov else m, p)
    else:  # ADAM
        m = vfma(vbcast(b1), _ld(M, r, k, n), vmul(vbcast(1 - b1), g))
        v = vfma(vbcast(b2), _ld(V, r, k, n), vmul(vmul(vbcast(1 - b2), g), g))
        _st(M, r, k, m, n)
        _st(V, r, k, v, n)
        p = vsub(p, vdiv(vmul(vbcast(lr * c1), m), vadd(vsqrt(vmul(v, vbcast(c2))), vbcast(eps))))
    _st(P, r, k, p, n)


# The rare paths (too few outputs for a tile, the ragged last columns) call the step instead of inlining it:
# one inlined copy fewer for LLVM to optimise: linear_backward_weight compiles in 7 s instead of 11, at the same
# speed (the ragged tiles are 1 in 16 at K = 250).
_step_call = njit(**_exact)(_step.py_func)


@njit(**_exact, inline="always")
def _ld(A, r, k, n):
    return vload(A, r, k) if n >= 8 else vloadn(A, r, k, n)


@njit(**_exact, inline="always")
def _st(A, r, k, x, n):
    if n >= 8:
        vstore(A, r, k, x)
    else:
        vstoren(A, r, k, x, n)


@njit(**_exact)
def update(p, g, m, v, kind, lr, mom, nesterov, wd, b1, b2, eps, c1, c2):
    """One optimiser step on 1-D arrays (all (n,) float32): `update_row` on their only row."""
    n = p.shape[0]
    update_row(p.reshape((1, n)), g.reshape((1, n)), m.reshape((1, n)), v.reshape((1, n)), 0, 0, n, kind, lr, mom,
               nesterov, wd, b1, b2, eps, c1, c2)


@njit(**_exact)
def update_row(P, G, M, V, r, k0, k1, kind, lr, mom, nesterov, wd, b1, b2, eps, c1, c2):
    """One optimiser step on P[r, k0:k1], PyTorch semantics (docs/training.md).

    P params, G gradient, M momentum / Adam first moment, V Adam second moment: 2-D float32 arrays of one
    shape. Serial: called by the task that owns those elements (the biases, as a row); indexing a 2-D
    array instead of taking 1-D slices spares Numba four reference counts per call.
    """
    lr, mom, wd = np.float32(lr), np.float32(mom), np.float32(wd)
    b1, b2, eps, c1, c2 = np.float32(b1), np.float32(b2), np.float32(eps), np.float32(c1), np.float32(c2)
    one = np.float32(1)
    if kind == SGD:
        for k in range(k0, k1):
            P[r, k] -= lr * (G[r, k] + wd * P[r, k])
    elif kind == MOMENTUM:
        for k in range(k0, k1):
            gk = G[r, k] + wd * P[r, k]
            M[r, k] = mom * M[r, k] + gk
            P[r, k] -= lr * (gk + mom * M[r, k]) if nesterov else lr * M[r, k]
    elif kind == ADAM:
        for k in range(k0, k1):
            gk = G[r, k] + wd * P[r, k]
            M[r, k] = b1 * M[r, k] + (one - b1) * gk
            V[r, k] = b2 * V[r, k] + (one - b2) * gk * gk
            P[r, k] -= lr * (M[r, k] * c1) / (np.sqrt(V[r, k] * c2) + eps)


# ---------------------------------------------------------------------------------------------------
# The first layer, whose input is pixels. 81 % of MNIST's pixels are 0 (the background), so a product
# that skips them does a fifth of the FLOPs of a dense one. Skipping needs the weights the other way
# round, so during training the first layer keeps them transposed, WT (K, pad_t(N)) (train_step moves
# them between the layouts; checkpoints and inference keep (out, in)): row k of WT is what pixel k adds
# to every output. Forward: a sample's outputs are the sum of its ~150 lit rows, in 64-column chunks
# with eight vector sums in registers (a chunk of WT, 784 rows x 256 bytes, stays in L2). Weight
# gradient: the dense 6x16 tile, summed only over the samples that light each block of 6 pixels.


def pad_t(n: int) -> int:
    """Row length of the transposed first-layer weights (and their gradient and moments) for n outputs."""
    return (n + 63) // 64 * 64


@njit(cache=True)
def density(X, rows):
    """The share of non-zero values in the first `rows` rows of X (B, K): picks the first layer's path."""
    r = min(rows, X.shape[0])
    n = 0
    for i in range(r):
        for k in range(X.shape[1]):
            n += X[i, k] != 0
    return n / max(r * X.shape[1], 1)


@njit(parallel=True, **_exact)
def nonzeros(X, cnt, cols, vals):
    """Each sample's non-zero pixels in pixel order: cols[i, :cnt[i]] their indices, vals[i, :cnt[i]] their
    values (a compressed-row copy of X).

    X (B, K) float32, cnt (B,) int32, cols (B, K) int32, vals (B, K) float32. prange over samples. An
    all-zero block of 8 pixels (60 % of MNIST's) costs one vector compare; the pixels of the others are
    appended branch-free (a zero is written, then overwritten), because a branch per pixel mispredicts at
    every stroke edge.
    """
    B, K = X.shape
    K8 = K - K % 8
    for i in prange(B):
        c = 0
        for k in range(0, K8, 8):
            if vany(vload(X, i, k)):
                for kk in range(k, k + 8):
                    x = X[i, kk]
                    cols[i, c] = kk
                    vals[i, c] = x
                    c += x != 0
        for kk in range(K8, K):
            x = X[i, kk]
            cols[i, c] = kk
            vals[i, c] = x
            c += x != 0
        cnt[i] = c


@njit(parallel=True, **_exact)
def nonzero_blocks(X, cnt, idx, pk):
    """For each block of 6 neighbouring pixels, the samples in which any of them is lit (in sample order),
    and those samples' 6 pixels packed for the weight gradient's tiles.

    X (B, K) float32, cnt (ceil(K/6),) int32, idx (ceil(K/6), >= B) int32, pk (ceil(K/6), >= B, 8)
    float32: idx[kb, :cnt[kb]] are the samples, pk[kb, p, :6] = X[idx[kb, p], 6kb : 6kb + 6] (zeros past
    K). Neighbouring pixels are lit together (strokes), so a block is lit in 33 % of MNIST's samples
    against 19 % for one pixel. prange over blocks; each sample is appended branch-free (its slot is
    written, and kept only if the block is lit), as a branch per sample would mispredict a third of the
    time.
    """
    B, K = X.shape
    for kb in prange((K + 5) // 6):
        k = kb * 6
        n = min(6, K - k)
        c = 0
        for i in range(B):
            v = vloadn(X, i, k, n)
            vstore(pk[kb], c, 0, v)
            idx[kb, c] = i
            c += vany(v)
        cnt[kb] = c


@njit(parallel=True, **_exact)
def sparse_forward(cnt, cols, vals, WT, b, Y, relu):
    """Y = X W + b (then ReLU when `relu`) from X's non-zeros (`nonzeros`), W kept transposed.

    cnt/cols/vals as `nonzeros` makes them for B samples, WT (K, Np) with Np = pad_t(N) and zeros past
    column N, b (N,), Y (B, N). Each task owns 64 outputs of one sample: eight vector sums, to which each
    lit pixel k adds vals · WT[k, chunk] (eight FMAs, their operands straight from L1/L2). prange over
    (chunk, sample), chunk slowest, so a thread works through one 200 KB chunk of WT at a time.
    """
    B = cnt.shape[0]
    N = Y.shape[1]
    br = b.reshape((1, N))
    for t in prange(((N + 63) // 64) * B):
        c = (t // B) * 64
        i = t % B
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
        for e in range(cnt[i]):
            k = cols[i, e]
            x = vbload(vals, i, e)
            a0 = vfma(x, vload(WT, k, c), a0)
            a1 = vfma(x, vload(WT, k, c + 8), a1)
            a2 = vfma(x, vload(WT, k, c + 16), a2)
            a3 = vfma(x, vload(WT, k, c + 24), a3)
            a4 = vfma(x, vload(WT, k, c + 32), a4)
            a5 = vfma(x, vload(WT, k, c + 40), a5)
            a6 = vfma(x, vload(WT, k, c + 48), a6)
            a7 = vfma(x, vload(WT, k, c + 56), a7)
        acc = (a0, a1, a2, a3, a4, a5, a6, a7)
        for h in range(8):
            n = N - c - 8 * h
            if n > 0:
                v = vadd(acc[h], _ld(br, 0, c + 8 * h, n))
                _st(Y, i, c + 8 * h, vmask(v, v) if relu else v, n)


@njit(**_exact)
def _tile_rows(C, D, rows, k):
    """`_tile` over a list of D's rows: acc[2q + h] = Σ_p C[q, p] · D[rows[p], k + 8h : k + 8h + 8]."""
    a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = a40 = a41 = a50 = a51 = vzero()
    for p in range(C.shape[1]):
        r = rows[p]
        x0, x1 = vload(D, r, k), vload(D, r, k + 8)
        c = vbload(C, 0, p)
        a00, a01 = vfma(c, x0, a00), vfma(c, x1, a01)
        c = vbload(C, 1, p)
        a10, a11 = vfma(c, x0, a10), vfma(c, x1, a11)
        c = vbload(C, 2, p)
        a20, a21 = vfma(c, x0, a20), vfma(c, x1, a21)
        c = vbload(C, 3, p)
        a30, a31 = vfma(c, x0, a30), vfma(c, x1, a31)
        c = vbload(C, 4, p)
        a40, a41 = vfma(c, x0, a40), vfma(c, x1, a41)
        c = vbload(C, 5, p)
        a50, a51 = vfma(c, x0, a50), vfma(c, x1, a51)
    return (a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51)


@njit(parallel=True, **_exact)
def sparse_backward_weight(cnt, idx, pk, dY, gWT, WT, mWT, vWT, gb, b, mb, vb, kind, lr, mom, nesterov, wd, b1, b2,
                           eps, c1, c2):
    """gWᵀ = Xᵀ dY over the samples that light each block of pixels (`nonzero_blocks`), then the
    optimiser step on WT, fused.

    cnt/idx/pk as `nonzero_blocks` makes them for K pixels, dY (B, N) with rows at least pad_t(N) floats
    apart (the last tile reads 16 columns; lanes past N are never stored), gWT/WT/mWT/vWT (K, pad_t(N)),
    gb/b/mb/vb (N,). Each task owns a 6x16 tile of gWᵀ (6 pixels x 16 outputs): `_tile_rows` with C =
    the block's packed pixels and D = the rows of dY of its samples, then `_step` with the gradient
    still in registers. The
    sums run over 33 % of the batch instead of 100 %, with the register blocking of the dense product
    (12 FMAs per 2 loads and 6 broadcasts); a sample with the block lit but this pixel 0 adds an exact 0.
    Tiles are disjoint and sum in sample order: no races, the same bits for any thread count. With
    plain SGD and no weight decay a block no sample lit has a zero gradient and is skipped (what the step
    would leave). The tasks of block 0 (the image's corner, never lit) also own gb and b, 16 columns each
    (`_bias_step`; one parallel region fewer than a kernel of their own, which counts at two threads and
    small batches). prange over (block, column tile), blocks slowest: the two threads take the top and
    the bottom half of the image.
    """
    nb = cnt.shape[0]
    K = WT.shape[0]
    N = dY.shape[1]
    nt = (N + 15) // 16
    idle = kind == SGD and wd == 0
    for t in prange(nb * nt):
        kb = t // nt
        j = (t % nt) * 16
        if kb == 0:
            _bias_step(dY, gb, b, mb, vb, j, min(j + 16, N), kind, lr, mom, nesterov, b1, b2, eps, c1, c2)
        m = cnt[kb]
        if m == 0 and idle:
            continue
        acc = _tile_rows(pk[kb, :m].T, dY, idx[kb], j)
        k = kb * 6
        if idle and j + 16 <= N and k + 6 <= K:  # the common case: plain SGD on a whole tile, one FMA per vector
            for r in range(12):
                c = j + 8 * (r % 2)
                vstore(WT, k + r // 2, c, vfma(vbcast(-lr), acc[r], vload(WT, k + r // 2, c)))
            continue
        _step_tile(acc, gWT, WT, mWT, vWT, k, j, min(6, K - k), N, kind, lr, mom, nesterov, wd, b1, b2, eps, c1, c2)


@njit(**_exact)
def _step_tile(acc, gW, W, mW, vW, k, j, nq, N, kind, lr, mom, nesterov, wd, b1, b2, eps, c1, c2):
    """The general epilogue of a 6x16 gradient tile at (k, j): rows k..k+nq-1, columns below N (stored
    when NO_UPDATE), then `_step`. A function of its own, so that its registers do not crowd the tile's."""
    for q in range(nq):
        for h in range(2):
            n = N - j - 8 * h
            if n > 0:
                if kind == NO_UPDATE:
                    _st(gW, k + q, j + 8 * h, acc[2 * q + h], n)
                _step(W, mW, vW, k + q, j + 8 * h, acc[2 * q + h], min(n, 8), kind, lr, mom, nesterov, wd, b1, b2,
                      eps, c1, c2)


@njit(**_exact)
def _bias_step(dY, gb, b, mb, vb, j0, j1, kind, lr, mom, nesterov, b1, b2, eps, c1, c2):
    """gb[j0:j1] = Σ_batch dY[:, j0:j1], 8 columns at a time in sample order, and the optimiser step on
    b[j0:j1] (no weight decay on biases): the bias part of both weight-gradient kernels, done by the tasks
    of their first block. dY (B, N), gb/b/mb/vb (N,); b as a row, so update_row indexes instead of
    slicing."""
    B, N = dY.shape
    br, gbr, mbr, vbr = b.reshape((1, N)), gb.reshape((1, N)), mb.reshape((1, N)), vb.reshape((1, N))
    for j in range(j0, j1, 8):
        s = vzero()
        for i in range(B):
            s = vadd(s, vloadn(dY, i, j, j1 - j))
        vstoren(gbr, 0, j, s, j1 - j)
    if kind != NO_UPDATE:
        update_row(br, gbr, mbr, vbr, 0, j0, j1, kind, lr, mom, nesterov, 0.0, b1, b2, eps, c1, c2)


# ---------------------------------------------------------------------------------------------------
# Softmax + cross-entropy + its gradient, fused.


@njit(parallel=True, **_exact)
def softmax_xent(Z, y, dZ, loss, pred, scale):
    """Per-sample loss −log softmax(Z)[y], the predicted class, and dZ = scale · (softmax(Z) − onehot(y)).

    Z, dZ (B, C) float32 logits and their gradient (may be the same array), y (B,) labels, loss (B,)
    float32, pred (B,) int64. scale is 1 for a summed loss, 1/B for a mean. prange over samples: rows are
    independent; the batch loss is summed afterwards in a fixed order by the caller.
    """
    B, C = Z.shape
    sc = np.float32(scale)
    for i in prange(B):
        zmax = Z[i, 0]
        arg = 0
        for c in range(1, C):
            if Z[i, c] > zmax:
                zmax = Z[i, c]
                arg = c
        s = np.float32(0)
        for c in range(C):
            s += np.exp(Z[i, c] - zmax)
        logs = np.log(s)
        loss[i] = logs - (Z[i, y[i]] - zmax)
        pred[i] = arg
        for c in range(C):
            dZ[i, c] = sc * np.exp(Z[i, c] - zmax - logs)
        dZ[i, y[i]] -= sc


# ---------------------------------------------------------------------------------------------------
# Whole steps. The parameters live in one flat float32 array, layer after layer W1 b1 W2 b2 ... (the
# order of the checkpoint file), so the optimiser state, gradients and checkpoints are flat copies too.


@njit(cache=True)
def _views(P, sizes, l):
    """W_l (n_l, n_{l-1}) and b_l (n_l,) as views into the flat array P (l counts from 0)."""
    off = 0
    for m in range(l):
        off += sizes[m + 1] * sizes[m] + sizes[m + 1]
    n_in, n_out = sizes[l], sizes[l + 1]
    W = P[off:off + n_out * n_in].reshape((n_out, n_in))
    b = P[off + n_out * n_in:off + n_out * n_in + n_out]
    return W, b


@njit(cache=True)
def _pad(n):
    """Row length in the activation and gradient buffers: n rounded up to 64 floats (pad_t). Every row
    starts 64-byte aligned (rows of 250 floats 1000 bytes apart made most 32-byte loads of fwd2, dA1 and
    dW2 straddle two cache lines: the whole step was 3 % slower at B = 256), and the first layer's sparse
    backward product may read whole 64-column chunks of its dY."""
    return (n + 63) // 64 * 64


def acts_size(sizes, cap: int) -> int:
    """Floats of the activation buffer of `forward` and `train_step` for up to `cap` samples."""
    return cap * sum(_pad(n) for n in sizes[1:])


def grad_size(sizes, cap: int) -> int:
    """Floats of each of train_step's two gradient buffers d0 and d1."""
    return cap * max(_pad(n) for n in sizes[1:])


@njit(cache=True)
def _rows(buf, off, B, n):
    """A (B, n) view into the flat buffer from `off`, each row _pad(n) floats long."""
    return buf[off:off + B * _pad(n)].reshape((B, _pad(n)))[:, :n]


@njit(cache=True)
def _act(acts, sizes, cap, l, B):
    """The (B, n_l) output buffer of layer l (0-based) inside the flat activation array."""
    off = 0
    for m in range(l):
        off += cap * _pad(sizes[m + 1])
    return _rows(acts, off, B, sizes[l + 1])


@njit(cache=True)
def forward(P, sizes, X, acts, cap):
    """Logits (B, n_L) of the batch X (B, n_0); acts holds every layer's output for `cap` samples
    (acts_size(sizes, cap) floats)."""
    L = sizes.shape[0] - 1
    B = X.shape[0]
    A = X[:, :X.shape[1]]  # typed as a strided view like the activations: one compiled linear_forward, not two
    for l in range(L):
        W, b = _views(P, sizes, l)
        Y = _act(acts, sizes, cap, l, B)
        linear_forward(A, W, b, Y, l < L - 1)
        A = Y
    return A


@njit(cache=True)
def train_step(P, G, M, V, WT, GT, MT, VT, where, sizes, X, y, acts, cap, d0, d1, ws, nz, rows, loss, pred,
               kind, lr, mom, nesterov, wd, b1, b2, eps, c1, c2, scale):
    """Forward, loss, backward and optimiser step on one mini-batch; returns the summed loss.

    P, G, M, V: flat params, gradients (the weights' part is written only by a gradient-only step, kind
    NO_UPDATE), first and second moments, in checkpoint order. WT, GT, MT, VT (n_0, pad_t(n_1)): the
    first layer's weights, gradient and moments transposed, which the sparse path trains; where[0] says
    which copy is current (0: P, G, M, V; 1: the transposed one), and a batch that takes the other path
    first moves them over (`move_first`). X (B, n_0) float32, y (B,) labels, acts: layer outputs for up
    to `cap` samples (acts_size), d0/d1: two gradient buffers of grad_size floats, ws: ws_size(max(sizes[1:]),
    cap) floats of workspace, nz: the index buffers of `nonzeros_bufs` (rows: X's compressed rows are in
    them already, from `gather_nonzeros`), loss (B,) float32 and pred (B,) int64 per sample.

    The first layer skips X's zeros (`sparse_forward`, `sparse_backward_weight`) unless X is dense: when
    more than 40 % of the first 8 samples' pixels are non-zero, the dense tiles on (out, in) weights are
    faster. Real data stays on one path, so the move happens once, at the first step.
    """
    L = sizes.shape[0] - 1
    B = X.shape[0]
    cnt, cols, vals, bcnt, bidx, pk = nz
    sparse = B < 6 or density(X, 8) <= 0.4
    if sparse != (where[0] == 1):
        move_first(P, G, M, V, WT, GT, MT, VT, sizes, sparse)
        where[0] = 1 if sparse else 0
    W, b = _views(P, sizes, 0)
    A = _act(acts, sizes, cap, 0, B)
    X = X[:, :X.shape[1]]  # typed as a strided view like the activations: each product compiles once
    if sparse:
        if not rows:
            nonzeros(X, cnt, cols, vals)
        # now, while the gather's X is still in L2: at the end of the step, after the forward and backward
        # products have passed through, reading X back from L3 made this 2-3 times slower (B = 256)
        nonzero_blocks(X, bcnt, bidx, pk)
        sparse_forward(cnt, cols, vals, WT, b, A, L > 1)
    else:
        linear_forward(X, W, b, A, L > 1)
    for l in range(1, L):
        W, b = _views(P, sizes, l)
        Y = _act(acts, sizes, cap, l, B)
        linear_forward(A, W, b, Y, l < L - 1)
        A = Y
    dZ = _rows(d0, 0, B, sizes[L])
    softmax_xent(A, y, dZ, loss, pred, scale)
    for l in range(L - 1, -1, -1):
        A = X if l == 0 else _act(acts, sizes, cap, l - 1, B)
        W, b = _views(P, sizes, l)
        if l > 0:  # the input gradient needs the old W, so before the update
            dA = _rows(d1 if (L - 1 - l) % 2 == 0 else d0, 0, B, sizes[l])
            linear_backward_input(dZ, W, A, dA)
        gW, gb = _views(G, sizes, l)
        mW, mb = _views(M, sizes, l)
        vW, vb = _views(V, sizes, l)
        if l > 0 or not sparse:
            linear_backward_weight(dZ, A, ws, gW, gb, W, b, mW, mb, vW, vb, kind, lr, mom, nesterov, wd, b1, b2,
                                   eps, c1, c2)
        else:
            sparse_backward_weight(bcnt, bidx, pk, dZ, GT, WT, MT, VT, gb, b, mb, vb, kind, lr, mom, nesterov, wd,
                                   b1, b2, eps, c1, c2)
        if l > 0:
            dZ = dA
    total = 0.0
    for i in range(B):
        total += loss[i]
    return total


@njit(cache=True)
def move_first(P, G, M, V, WT, GT, MT, VT, sizes, to_t):
    """Copy the first layer's weights, gradient and moments into the transposed arrays (to_t) or back."""
    _move(_views(P, sizes, 0)[0], WT, to_t)
    _move(_views(G, sizes, 0)[0], GT, to_t)
    _move(_views(M, sizes, 0)[0], MT, to_t)
    _move(_views(V, sizes, 0)[0], VT, to_t)


@njit(cache=True)
def _move(W, WT, to_t):
    """WT[:, :N] = Wᵀ (to_t) or W = WT[:, :N]ᵀ, W (N, K). Serial: it runs when the path changes (once per
    run on real data) and before each evaluation, about 0.5 ms, and a parallel loop here cost 1 s of
    the first run's compile."""
    N, K = W.shape
    for k in range(K):
        if to_t:
            for n in range(N):
                WT[k, n] = W[n, k]
        else:
            for n in range(N):
                W[n, k] = WT[k, n]


def nonzeros_bufs(cap: int, n_in: int) -> tuple[np.ndarray, ...]:
    """The index buffers train_step's first layer fills per batch for up to `cap` samples of n_in pixels:
    `nonzeros`' (cnt, cols, vals) and `nonzero_blocks`' (cnt, idx, pk)."""
    nb = (n_in + 5) // 6
    return (np.zeros(cap, np.int32), np.zeros((cap, n_in), np.int32), aligned_zeros((cap, n_in)),
            np.zeros(nb, np.int32), np.zeros((nb, cap), np.int32), aligned_zeros((nb, cap, 8)))
