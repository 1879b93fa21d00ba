"""Every FLOP of training and inference: explicit loops compiled by Numba, no BLAS.

Layout (the PyTorch one): a layer's weights W are (out, in) row-major and it computes Y = X Wᵀ + b.
With that layout no product needs a transpose:
  forward      Y  = X Wᵀ     dot form, contiguous rows of X and W            -> 2x6 register tiles
  backward dX  dX = dY W     axpy form over contiguous rows of W             -> 6x2L register tiles
  backward dW  dW = dYᵀ X    axpy form over contiguous rows of X, dYᵀ packed -> 6x2L register tiles
(6x4L with 16 lanes: AVX-512's 32 registers hold the 24 sums, `_tile4`).
Training's forward product of the hidden layers is in axpy form too, over a copy of Wᵀ it makes first
(`linear_forward_t`): with its operands coming from L2 and L3 mid-step, that beats the dot form by more
than the transpose costs.
The first layer is the exception in training: 81 % of MNIST's pixels are 0, and skipping them needs its
weights transposed, WT = W1ᵀ (see "The first layer" below):
  forward      Y  = X WT     the ~227 rows of WT lit in a pair of samples    -> 8L-column chunks x 2
  backward dW  gWT = Xᵀ dY   the samples that light a block of 3 pixels      -> 3x4L register tiles
The tiles' sums live in vector registers of L = LANES float32 lanes (`simd.f32v`: 16 with AVX-512, 8
without, chosen at import; `simd.lanes`) for a whole reduction. Every output element is written by
exactly one prange task with a summation order the code spells out, so for a given L (the two widths sum
in different orders) results are bit-identical run after run, for any thread count, and whether a
kernel was compiled now or loaded from the cache (that is why no kernel is compiled with `fastmath`: see
`_exact`). Float32 scalars are spelled np.float32(0): a bare 0.0 is float64 in Numba.
Callers hand in 64-byte aligned arrays (`aligned_zeros`; activation rows padded, `pad`): vector loads
that straddle cache lines slow the products down. No data-dependent branches in hot loops:
ReLU signs are random.
"""

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange
from numba.extending import register_jitable

from . import jitcache, parlink
from .optim import ADAM, MOMENTUM, NO_UPDATE, SGD
from .simd import W as LANES
from .simd import (
    prefetch,
    threads,
    vadd,
    vbcast,
    vbload,
    vclamp,
    vdiv,
    ventry,
    vfma,
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
    vzero,
)

jitcache.use()  # before the first cached kernel below: compiled kernels go to a folder keyed by their sources
parlink.install()  # a parallel loop's body and wrappers compiled once, inside their kernel

# u8 -> float32 pixel, exactly u8 / 255 as the C++ port computes it: one table load per pixel instead of a
# division.
PIXEL = (np.arange(256, dtype=np.float32) / np.float32(255)).astype(np.float32)
_R255 = np.float32(1) / np.float32(255)


@register_jitable
def vpixel(u):
    """PIXEL's bits for a vector u of bytes as floats: u / 255 correctly rounded, without a division (a
    vector division takes as long as a dozen multiplies). q = u r, with r the float nearest 1 / 255, is
    within an ulp of it; the residual u - 255 q is exact in a fused multiply-add, and q + r (u - 255 q)
    rounds correctly (Markstein's theorem). The tests read every byte through it."""
    r = vbcast(_R255)
    q = vmul(u, r)
    return vfma(vfma(q, vbcast(np.float32(-255)), u), r, q)

# Every kernel (here and in augment.py) is compiled *without* fastmath. Numba optimises a callee (a called
# @njit function, or the body of a prange loop) in a module of its own, then links that optimised code
# into its caller's module and optimises it again. Under fastmath's flags a second pass is free to
# contract and reassociate what the first one left, so the caller's copy can round differently from the
# callee's own, and which copy runs depends on whether they were compiled in this process or loaded from
# the cache. IEEE arithmetic is the same after any number of passes; where an FMA is wanted the code says
# so (`vfma`).
_exact = dict(cache=True)

# SERIAL: the small passes (softmax, the packing of dYᵀ, evaluation's gather) run on one
# thread. Numba compiles each parallel loop into a function of its own with two wrappers, 0.3-2 s of a first
# run's compile per loop (docs/performance.md, "Parallel loops only where they pay"), while two threads
# would save a few microseconds per step on so little work.


def aligned_zeros(shape: int | tuple[int, ...], dtype=np.float32, align: int = 64) -> np.ndarray:
    """Zeros whose first element sits on an `align`-byte boundary.

    NumPy only promises 16 bytes, and a large np.zeros usually lands 16 bytes past a page start, so every
    second 32-byte load of a row straddles two cache lines, which slows the products over long rows
    (X, W1, gW1) markedly. Used for the parameters, gradients and optimiser state, and for inference's
    buffers; train_step's buffers come from `huge_zeros`.
    """
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    buf = np.zeros(n * dtype.itemsize + align, np.uint8)
    off = (-buf.ctypes.data) % align
    return buf[off:off + n * dtype.itemsize].view(dtype).reshape(shape)


HUGE = 2 << 20  # bytes of an x86 huge page


def huge_zeros(specs: list[tuple[tuple[int, ...], type]]) -> list[np.ndarray]:
    """Zeroed arrays, one per (shape, dtype) in `specs`, each 64-byte aligned, carved one after the other
    from one allocation that starts on a 2 MiB boundary and is at least 4 MiB long, so that NumPy asks Linux
    for transparent huge pages (with /sys/kernel/mm/transparent_hugepage/enabled at `madvise` or `always`).
    For train_step's buffers, whose rows every step reads and writes all over: on 4 KiB pages those
    accesses miss the TLB (docs/performance.md, "Huge pages")."""
    nbytes = [int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in specs]
    starts = np.cumsum([0] + [-(-n // 64) * 64 for n in nbytes])
    buf = np.zeros(max(int(starts[-1]), 4 << 20) + HUGE, np.uint8)
    base = (-buf.ctypes.data) % HUGE
    return [buf[base + o:base + o + n].view(dt).reshape(shape) for (shape, dt), o, n in zip(specs, starts, nbytes)]


class Param(NamedTuple):
    """A parameter array with its gradient and optimiser moments, all of one shape: a layer's W or b, the
    flat array of all parameters, or the transposed first layer."""

    value: np.ndarray
    grad: np.ndarray
    m: np.ndarray  # momentum's velocity, Adam's first moment
    v: np.ndarray  # Adam's second moment


class TrainState(NamedTuple):
    """What a training step changes. While batches are sparse, the first layer's weights, gradient and
    moments are trained in a transposed copy (see "The first layer" below); `first_is_t[0]` is 1 while that
    copy, not the flat one, is current."""

    flat: Param  # (n_params,) each, in checkpoint order (layer_views)
    first_t: Param  # (n_0, pad(n_1)) each
    first_is_t: np.ndarray  # int64 (1,)


class Nonzeros(NamedTuple):
    """The first layer's index buffers for up to B samples of K pixels: the pixels lit in either sample of
    each pair 2q, 2q + 1 (`nonzeros`; a last odd sample is paired with zeros) and each block of 3 pixels'
    lit samples with their pixels (`nonzero_blocks`), listed in bands of samples, one per thread (S bands
    at most)."""

    count: np.ndarray  # (ceil(B/2),) int32: pixels lit in pair q
    cols: np.ndarray  # (ceil(B/2), K) int32: their indices, in pixel order
    vals: np.ndarray  # (2 ceil(B/2), K) float32: row i holds sample i's values of its pair's pixels (0 if unlit)
    block_count: np.ndarray  # (S, 2 ceil(K/6)) int32: samples of band s that light block kb (pixels 3kb .. 3kb + 2)
    block_vals: np.ndarray  # (2 ceil(K/6), 4 B) float32: 4-float entries, band s's from entry s bs
    block_samples: np.ndarray  # block_vals viewed as int32: entry p's sample index is block_samples[kb, 4p + 3]
    block_bands: np.ndarray  # (2,) int64: the bands of the last listing and the samples per band, bs


class Buffers(NamedTuple):
    """train_step's work buffers for up to `cap` samples (`buffers` makes them), and the mini-batch."""

    x: np.ndarray  # (cap, n_0) float32: the mini-batch's pixels (Trainer.gather and Trainer.augment write it)
    acts: np.ndarray  # every layer's outputs (acts_size)
    grad_a: np.ndarray  # two gradient buffers (grad_size), used in turn layer by layer
    grad_b: np.ndarray
    work: np.ndarray  # linear_backward_weight's packing space (work_size)
    wt: np.ndarray  # the transposed weights of the hidden layer linear_forward_t reads (wt_size)
    nonzeros: Nonzeros
    loss: np.ndarray  # (cap,) float32 per-sample loss
    pred: np.ndarray  # (cap,) int64 predicted class
    cap: int
    views: dict  # train_step's StepViews by batch size and the types of X and y, made when first needed


@njit(cache=True)
def gather(X_u8, idx, lut, out):
    """out[i] = lut[X_u8[idx[i]]]: a mini-batch as float32 pixels in [0, 1].

    X_u8 (N, K) uint8, idx (B,) int64, lut (256,) float32, out (>=B, K) float32. One thread (see
    SERIAL): evaluation and inference gather with it, training gathers with gather_nonzeros or augments.
    """
    K = X_u8.shape[1]
    B = idx.shape[0]
    for i in range(B):
        if i + 4 < B:  # the rows are random, so DRAM latency dominates unless the row 4 ahead is on its way
            for k in range(0, K, 64):
                prefetch(X_u8, idx[i + 4], k)
        r = idx[i]
        for k in range(K):
            out[i, k] = lut[X_u8[r, k]]


@njit(parallel=True, cache=True)
def gather_nonzeros(X_u8, idx, out, cnt, cols, vals):
    """`gather` and `nonzeros` in one pass: out[i] = X_u8[idx[i]] / 255 (the bits of PIXEL), and each pair's
    lit pixels as `nonzeros` lists them, for the first layer's sparse forward product.

    X_u8 (N, K) uint8 C-contiguous, idx (B,) int64, out (>=B, K) float32, cnt/cols/vals as `nonzeros`. A
    vector of pixels of both samples at a time: bytes to floats, `vpixel` (PIXEL's bits), stored, then
    listed by `vlist`. It spares the second pass over the batch that `nonzeros` makes. prange over pairs,
    each writes its own rows; the rows four ahead are prefetched as in `gather`.
    """
    B = idx.shape[0]
    K = X_u8.shape[1]
    for q in prange((B + 1) // 2):
        i, j = 2 * q, min(2 * q + 1, B - 1)
        nj = K if 2 * q + 1 < B else 0  # a last odd sample is paired with zeros
        if j + 4 < B:
            for k in range(0, K, 64):
                prefetch(X_u8, idx[i + 4], k)
                prefetch(X_u8, idx[j + 4], k)
        c = 0
        for k in range(0, K, LANES):
            n = min(LANES, K - k)
            a = vpixel(vloadbytes(X_u8, idx[i], k, n))
            b = vpixel(vloadbytes(X_u8, idx[j], k, min(n, nj - k)))
            vstoren(out, i, k, a, n)
            vstoren(out, j, k, b, min(n, nj - k))
            c += vlist(cols, vals, q, c, a, b, k, n)
        cnt[q] = c


@register_jitable  # as _ld
def _st8(A, r, k, v):
    """A[r, k : k + 8] = the first 8 lanes of v: one vector store, masked when vectors are wider (AVX-512's
    masked stores are fast). For the packed 6-float slots of dYᵀ."""
    if LANES == 8:
        vstore(A, r, k, v)
    else:
        vstoren(A, r, k, v, 8)


# ---------------------------------------------------------------------------------------------------
# Linear layer: forward and the two backward products, side by side.


@njit(parallel=True, **_exact)
def linear_forward(X, W, b, Y, relu):
    """Y = X Wᵀ + b, then ReLU when `relu`.

    X (B, K), W (N, K), b (N,), Y (B, N), all float32.
    Dot form: each task owns a 2x6 tile of Y (two samples, six outputs) and keeps its 12 sums in 12 vector
    registers (LANES lanes of k each), so every vector loaded from W feeds two FMAs and every vector of X
    six; the K % LANES tail is one more masked step. Then each sample's six sums are reduced together
    (`vsums`, the order of `vsum`), and bias and ReLU applied to them as one vector (`vclamp`, no branch)
    stored to six neighbouring outputs. 12 sums + 3 operands fit AVX2's 16 vector registers.
    Every output is one sum in that order whatever the shapes, so a sample's outputs have the same bits
    in a batch of any size: the last tile of a ragged edge is moved back to overlap its neighbour and stores
    only its own outputs, a batch of one sample repeats its row (computed twice, stored once), and a
    layer of fewer than six outputs has each summed alone in the same order.
    prange over tiles in `_banded` order: a band of samples per thread, so that each thread reads the rows
    of X its own core wrote (the output layer's ten outputs are only two column blocks), and inside a band
    the column blocks slowest, so consecutive tiles of one thread share their six rows of W in L1 and only
    the two rows of X come from L2 or stream from L3 (in the other order six rows of W would, per tile).
    """
    B, K = X.shape
    N = W.shape[0]
    lo = np.float32(0) if relu else np.float32(-3.4028235e38)
    lov, top, br = vbcast(lo), vbcast(np.float32(np.inf)), b.reshape((1, N))  # outside the loop: a view made
    # in it costs reference counting per tile
    K8 = K - K % LANES
    nc, tb = (N + 5) // 6, (B + 1) // 2
    bs = _band(tb)
    for t in prange(nc * tb):
        ib, jb = _banded(t, tb, nc, bs)
        i, j = ib * 2, jb * 6
        if N < 6:  # fewer outputs than a tile: one at a time, each summed as in a tile (the same bits)
            for ii in range(i, min(i + 2, B)):
                for jj in range(N):
                    s = vzero()
                    for k in range(0, K8, LANES):
                        s = vfma(vload(X, ii, k), vload(W, jj, k), s)
                    if K8 < K:
                        s = vfma(vloadn(X, ii, K8, K - K8), vloadn(W, jj, K8, K - K8), s)
                    v = vsum(s) + b[jj]
                    Y[ii, jj] = lo if lo > v else v  # as vclamp
            continue
        i0, j0 = max(min(i, B - 2), 0), min(j, N - 6)
        i1 = min(i0 + 1, B - 1)
        s00 = s01 = s02 = s03 = s04 = s05 = s10 = s11 = s12 = s13 = s14 = s15 = vzero()
        for k in range(0, K8, LANES):
            x0, x1 = vload(X, i0, k), vload(X, i1, k)
            w = vload(W, j0, k)
            s00, s10 = vfma(x0, w, s00), vfma(x1, w, s10)
            w = vload(W, j0 + 1, k)
            s01, s11 = vfma(x0, w, s01), vfma(x1, w, s11)
            w = vload(W, j0 + 2, k)
            s02, s12 = vfma(x0, w, s02), vfma(x1, w, s12)
            w = vload(W, j0 + 3, k)
            s03, s13 = vfma(x0, w, s03), vfma(x1, w, s13)
            w = vload(W, j0 + 4, k)
            s04, s14 = vfma(x0, w, s04), vfma(x1, w, s14)
            w = vload(W, j0 + 5, k)
            s05, s15 = vfma(x0, w, s05), vfma(x1, w, s15)
        if K8 < K:  # the K % LANES tail: one more step with masked loads (zeros past the row)
            n = K - K8
            x0, x1 = vloadn(X, i0, K8, n), vloadn(X, i1, K8, n)
            w = vloadn(W, j0, K8, n)
            s00, s10 = vfma(x0, w, s00), vfma(x1, w, s10)
            w = vloadn(W, j0 + 1, K8, n)
            s01, s11 = vfma(x0, w, s01), vfma(x1, w, s11)
            w = vloadn(W, j0 + 2, K8, n)
            s02, s12 = vfma(x0, w, s02), vfma(x1, w, s12)
            w = vloadn(W, j0 + 3, K8, n)
            s03, s13 = vfma(x0, w, s03), vfma(x1, w, s13)
            w = vloadn(W, j0 + 4, K8, n)
            s04, s14 = vfma(x0, w, s04), vfma(x1, w, s14)
            w = vloadn(W, j0 + 5, K8, n)
            s05, s15 = vfma(x0, w, s05), vfma(x1, w, s15)
        bias = _ld(br, 0, j0, 6)
        y0 = vclamp(vadd(vsums((s00, s01, s02, s03, s04, s05)), bias), lov, top)
        y1 = vclamp(vadd(vsums((s10, s11, s12, s13, s14, s15)), bias), lov, top)
        if i0 == i:  # else the tile moved back over its neighbour's first sample: not its own
            vstorer(Y, i0, j0, y0, j - j0, 6)
        if i1 != i0:  # else a batch of one sample
            vstorer(Y, i1, j0, y1, j - j0, 6)


@register_jitable
def _band(nr):
    """Row blocks per band of `_banded` for nr row blocks: one band per thread of the next parallel loop when
    each thread gets two row blocks or more, else one band (the last layer's 10 outputs: split by panels,
    each thread reads only its panel of the other operand, which measures faster). Called before the loop
    (inside it, a worker thread would ask for its own count)."""
    n = threads()
    return (nr + n - 1) // n if nr >= 2 * n else nr


@register_jitable
def _banded(t, nr, nc, bs):
    """Task t of a parallel loop over nr x nc tiles of an output, as (row block, column panel), in bands of
    bs = _band(nr) row blocks, and inside a band the panels slowest, so a run of tasks reads one panel of
    the other operand (from L1). With the static schedule each thread then writes whole rows of the
    output, one contiguous part of it. Split by panels, both threads would write parts of every row, whose
    cache lines pass between the cores at every call: a kernel could take longer at 2 threads than at 1
    (docs/performance.md, "Threads write whole rows"). With one thread this is the order row blocks
    fastest. Each tile has one task whatever the thread count, so the bits do not depend on it."""
    band, u = t // (bs * nc), t % (bs * nc)
    nb = min(bs, nr - band * bs)  # row blocks in this band (the last one may have fewer)
    return band * bs + u % nb, u // nb


@njit(parallel=True, **_exact)
def linear_forward_t(X, W, WT, b, Y, relu):
    """Y = X Wᵀ + b, then ReLU when `relu`: `linear_forward` in axpy form, over Wᵀ made here in WT.

    X (B, K), W (N, K), b (N,), Y (B, N), WT (K, >= N rounded up to 4LANES) float32 scratch. A first parallel
    loop writes WT = Wᵀ a panel of 4LANES columns per task with 16 lanes, 2LANES with 8 (LANES x LANES
    blocks transposed in registers, `vtranspose`; zeros past N up to the next LANES). Then each task owns a
    6 x panel tile of Y (`_tile4` or `_tile`, `_tile4` needing AVX-512's 32 registers, with C = X, D = the
    panel, as `linear_backward_input`), adding b, clamping and storing its own rows and columns; the tasks
    run in `_banded` order over (batch block, panel), so each thread writes whole rows of Y. Training's
    hidden layers take it: in the step, where X and W come from L2 and L3, it takes less time than the dot
    form, its transposes included (docs/performance.md). Every output is one sum over k in order, then + b,
    whatever the shapes (a batch of fewer than 6 samples sums each row alone in that order), so a sample's
    outputs have the same bits in a batch of any size; they round differently from `linear_forward`'s,
    whose sums run across lanes.
    """
    B, K = X.shape
    N = W.shape[0]
    lo = np.float32(0) if relu else np.float32(-3.4028235e38)
    lov, top, br = vbcast(lo), vbcast(np.float32(np.inf)), b.reshape((1, N))  # views outside the loop
    tw = TW if LANES == 16 else 2 * LANES  # a panel: 4 vectors of outputs with 16 lanes (`_tile4`), else 2
    npan = (N + tw - 1) // tw
    for t in prange(npan):
        _panel(W, WT, t * tw, tw)
    nb = (B + 5) // 6
    bs = _band(nb)
    for t in prange(nb * npan):
        ib, jb = _banded(t, nb, npan, bs)
        i, j = ib * 6, jb * tw
        bias = (_ld(br, 0, j, N - j), _ld(br, 0, j + LANES, N - j - LANES),
              _ld(br, 0, j + 2 * LANES, N - j - 2 * LANES), _ld(br, 0, j + 3 * LANES, N - j - 3 * LANES))
        if B < 6:  # too few samples for a tile: one row of LANES lanes at a time, summed as in a tile
            for ii in range(B):
                for h in range(tw // LANES):
                    s = vzero()
                    for k in range(K):
                        s = vfma(vbload(X, ii, k), vload(WT, k, j + LANES * h), s)
                    _st(Y, ii, j + LANES * h, vclamp(vadd(s, bias[h]), lov, top), N - j - LANES * h)
            continue
        i0 = min(i, B - 6)  # the last tile of a ragged batch moves back and stores only its own rows
        if tw == TW:  # columns of the panel past N (never written: NaN or stale) sum into lanes not stored
            acc4 = _tile4(X, i0, WT, j)
            for q in range(i - i0, 6):
                for h in range(4):
                    _st(Y, i0 + q, j + LANES * h, vclamp(vadd(acc4[4 * q + h], bias[h]), lov, top), N - j - LANES * h)
            continue
        acc = _tile(X, i0, WT, j)
        for q in range(i - i0, 6):
            _st(Y, i0 + q, j, vclamp(vadd(acc[2 * q], bias[0]), lov, top), N - j)
            _st(Y, i0 + q, j + LANES, vclamp(vadd(acc[2 * q + 1], bias[1]), lov, top), N - j - LANES)


@njit(**_exact)
def _panel(W, WT, j, w):
    """WT[:, j : j + w] = W[j : j + w]ᵀ for W (N, K): LANES x LANES blocks transposed in registers
    (`vtranspose`), zeros past N up to the next LANES columns; blocks wholly past N are not written."""
    N, K = W.shape
    for jj in range(j, min(j + w, N), LANES):
        for k in range(0, K, LANES):
            vtranspose(W, jj, k, min(LANES, N - jj), min(LANES, K - k), WT, k, jj, min(LANES, K - k))


@njit(**_exact)
def _tile(C, r, D, k):
    """The axpy micro-kernel of both backward products with 8 lanes (and of their edges): a 6 x 2L block of
    C·D in 12 vector registers (L = LANES).

    Returns acc[2q + h] = Σ_p C[r + q, p] · D[p, k + Lh : k + Lh + L] for q < 6, h < 2 (rows r..r+5 of C
    and columns k..k+2L-1 of D must exist). Per p: two vectors of D, six broadcasts of C, 12 FMAs; the sums
    never leave registers until the whole reduction is done (what LLVM would not do for scalar code).
    """
    a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = a40 = a41 = a50 = a51 = vzero()
    for p in range(C.shape[1]):
        x0, x1 = vload(D, p, k), vload(D, p, k + LANES)
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


TW = 4 * LANES  # columns of the backward products' wide tile, with 16 lanes (`_tile4`)


@njit(**_exact)
def _tile4(C, r, D, k):
    """_tile four vectors wide, for AVX-512's 32 registers: a 6 x 4L block of C·D in 24 vector registers,
    acc[4q + h] = Σ_p C[r + q, p] · D[p, k + Lh : k + Lh + L] for q < 6, h < 4. Per p: four vectors of D,
    six broadcasts of C, 24 FMAs (the 6 x 2L tile: 12 FMAs for two vectors and six broadcasts). Each sum
    runs over p in order, as in `_tile`: the same bits."""
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = a20 = a21 = a22 = a23 = vzero()
    a30 = a31 = a32 = a33 = a40 = a41 = a42 = a43 = a50 = a51 = a52 = a53 = vzero()
    for p in range(C.shape[1]):
        x0, x1 = vload(D, p, k), vload(D, p, k + LANES)
        x2, x3 = vload(D, p, k + 2 * LANES), vload(D, p, k + 3 * LANES)
        c = vbload(C, r, p)
        a00, a01, a02, a03 = vfma(c, x0, a00), vfma(c, x1, a01), vfma(c, x2, a02), vfma(c, x3, a03)
        c = vbload(C, r + 1, p)
        a10, a11, a12, a13 = vfma(c, x0, a10), vfma(c, x1, a11), vfma(c, x2, a12), vfma(c, x3, a13)
        c = vbload(C, r + 2, p)
        a20, a21, a22, a23 = vfma(c, x0, a20), vfma(c, x1, a21), vfma(c, x2, a22), vfma(c, x3, a23)
        c = vbload(C, r + 3, p)
        a30, a31, a32, a33 = vfma(c, x0, a30), vfma(c, x1, a31), vfma(c, x2, a32), vfma(c, x3, a33)
        c = vbload(C, r + 4, p)
        a40, a41, a42, a43 = vfma(c, x0, a40), vfma(c, x1, a41), vfma(c, x2, a42), vfma(c, x3, a43)
        c = vbload(C, r + 5, p)
        a50, a51, a52, a53 = vfma(c, x0, a50), vfma(c, x1, a51), vfma(c, x2, a52), vfma(c, x3, a53)
    return (a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23,
            a30, a31, a32, a33, a40, a41, a42, a43, a50, a51, a52, a53)


@njit(**_exact)
def _tile_n(C, r, D, k, n):
    """_tile for the last n <= LANES columns of D: acc[q] = Σ_p C[r + q, p] · D[p, k : k + n], zeros past
    n. A separate 6 x LANES kernel because the masked loads need registers the 6 x 2LANES tile has no
    room for."""
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
def linear_backward_input(dY, W, A, dX):  # noqa: C901 -- each branch is one edge of the register tile
    """dX = (dY W) ⊙ [A > 0]: the gradient at the layer's input, through the previous layer's ReLU.

    dY (B, N), W (N, K), A (B, K) the layer's input (a ReLU output, so A > 0 exactly where its
    pre-activation was > 0), dX (B, K). Axpy form over contiguous rows of W: each task owns a 6 x 4LANES tile
    of dX with 16 lanes (`_tile4`), 6 x 2LANES with 8 (`_tile`), C = dY, D = W, summing over the N
    outputs, masks it and stores it once. prange over tiles in `_banded` order (batch blocks, column
    panels): each thread writes whole rows of dX, and a run of tasks reads one panel of W. The last tile
    of a ragged edge overlaps its neighbour and stores only its own rows, or its own columns (one full
    tile, cheaper than masked 6 x LANES passes).
    """
    B, N = dY.shape
    K = W.shape[1]
    nb = (B + 5) // 6
    wide = LANES == 16 and K >= TW
    tw = TW if wide else 2 * LANES
    nk, bs = (K + tw - 1) // tw, _band(nb)
    for t in prange(nb * nk):
        ib, kb = _banded(t, nb, nk, bs)
        i, k = ib * 6, kb * tw
        if B < 6:  # too few samples for a tile: one row of LANES lanes at a time
            for ii in range(i, min(i + 6, B)):
                for kk in range(k, min(k + tw, K), LANES):
                    s = vzero()
                    for j in range(N):
                        s = vfma(vbload(dY, ii, j), _ld(W, j, kk, K - kk), s)
                    _st(dX, ii, kk, vmask(s, _ld(A, ii, kk, K - kk)), K - kk)
            continue
        i0 = min(i, B - 6)
        if wide:  # the 6 x 4L tile; the ragged last one moved back to K - 4L stores its own lanes only
            k0 = min(k, K - TW)
            acc4 = _tile4(dY, i0, W, k0)
            for q in range(i - i0, 6):
                for c in range(4):
                    kk, lo = k0 + LANES * c, k - k0 - LANES * c  # lo: first lane that is not the neighbour's
                    if lo <= 0:
                        vstore(dX, i0 + q, kk, vmask(acc4[4 * q + c], vload(A, i0 + q, kk)))
                    elif lo < LANES:
                        vstorer(dX, i0 + q, kk, vmask(acc4[4 * q + c], vloadr(A, i0 + q, kk, lo, LANES)), lo, LANES)
        elif k + 2 * LANES <= K:
            acc = _tile(dY, i0, W, k)
            for q in range(i - i0, 6):
                vstore(dX, i0 + q, k, vmask(acc[2 * q], vload(A, i0 + q, k)))
                vstore(dX, i0 + q, k + LANES, vmask(acc[2 * q + 1], vload(A, i0 + q, k + LANES)))
        elif K >= 2 * LANES:  # the ragged last block: the full tile moved back to K - 2 LANES stores its own lanes only
            k0 = K - 2 * LANES
            acc = _tile(dY, i0, W, k0)
            for q in range(i - i0, 6):
                for h in range(2):
                    lo = k - k0 - LANES * h  # first lane of this half that is not the neighbour's
                    if lo < LANES:
                        kk = k0 + LANES * h
                        vstorer(dX, i0 + q, kk, vmask(acc[2 * q + h], vloadr(A, i0 + q, kk, lo, LANES)), lo, LANES)
        else:
            for kk in range(k, K, LANES):
                acc = _tile_n(dY, i0, W, kk, K - kk)
                for q in range(i - i0, 6):
                    vstoren(dX, i0 + q, kk, vmask(acc[q], vloadn(A, i0 + q, kk, K - kk)), K - kk)


def work_size(n_out: int, batch: int) -> int:
    """Floats of the workspace linear_backward_weight needs for n_out outputs and `batch` samples."""
    return ((n_out + 5) // 6) * batch * 8


@njit(parallel=True, **_exact)
def linear_backward_weight(dY, A, work, Wp, bp, h):  # noqa: C901 -- each branch is one edge of the register tile
    """gW = dYᵀ A, gb = Σ_batch dY, then the optimiser step `h` on W and b, fused.

    dY (B, N), A (B, K) the layer's input, Wp a Param of (N, K) arrays, bp a Param of (N,) arrays, work a
    float32 workspace of work_size(N, B). Axpy form over contiguous rows of A: each task owns a 6 x 4LANES tile
    of gW with 16 lanes when A's rows are padded to whole tiles (`_tile4`, reading the padding past K,
    whose sums are never stored), else 6 x 2LANES (`_tile`), C = dYᵀ, D = A, summing over the batch; it
    stores the tile once and takes the optimiser step on the same block of W with the gradient still in
    registers (`_step`); the tasks of the first column block also own gb and b. prange over tiles in
    `_banded` order (row blocks of W, column panels): each thread steps whole rows of W and its moments,
    and a run of tasks reads one panel of A. Tiles are disjoint, so no races, and one parallel region per
    call. Must run after linear_backward_input, which reads the old W. h.kind
    NO_UPDATE only computes the gradients, and only then is gW stored: a training step never reads it
    back, and writing gW1 costs a few per cent of the step (gb is always stored).

    dYᵀ is first packed, as OpenBLAS packs its operands: work[jb, p, :6] = dY[p, 6jb : 6jb + 6], zeros past
    N. The tile's six broadcasts per sample then come from one 32-byte slot instead of a fresh cache line
    of dY, so the two panels a tile streams fit L1 together at B = 256; and the last row block is
    zero-padded instead of overlapping its neighbour.
    """
    B, N = dY.shape
    K = A.shape[1]
    W, gW, mW, vW = Wp  # unpacked here: helpers in the loops take arrays (see _step)
    b, gb, mb, vb = bp
    kind = h.kind
    nj = (N + 5) // 6
    pk = work[:nj * B * 8].reshape((nj, B, 8))
    if N >= 6:  # one thread (see SERIAL)
        for t in range(nj):
            for p in range(B):
                _st8(pk[t], p, 0, _ld(dY, p, 6 * t, N - 6 * t))  # lanes 6, 7 are never read
    wide = LANES == 16 and A.strides[0] >= (K + TW - 1) // TW * TW * 4  # A's rows readable in whole 4L tiles
    tw = TW if wide else 2 * LANES
    nk, bs = (K + tw - 1) // tw, _band(nj)
    for t in prange(nj * nk):
        jb, kb = _banded(t, nj, nk, bs)
        j, k = jb * 6, kb * tw
        if N < 6:  # too few outputs for a tile: one row of LANES lanes at a time
            for jj in range(j, N):
                for kk in range(k, min(k + tw, K), LANES):
                    s = vzero()
                    for i in range(B):
                        s = vfma(vbload(dY, i, jj), _ld(A, i, kk, K - kk), s)
                    if kind == NO_UPDATE:
                        _st(gW, jj, kk, s, K - kk)
                    _step_call(W, mW, vW, jj, kk, s, K - kk, h, h.weight_decay)
        else:
            C = pk[j // 6].T  # (LANES, B): C[q, p] = dY[p, j + q]
            nq = min(6, N - j)  # rows of W this tile owns; the rest is padding
            if kind == MOMENTUM or kind == ADAM:  # 2-3 blocks from L3 after the reduction: ask for them now
                for q in range(nq):
                    for c in range(k, min(k + tw, K), 16):
                        prefetch(W, j + q, c)
                        prefetch(mW, j + q, c)
                        if kind == ADAM:
                            prefetch(vW, j + q, c)
            if wide:  # the 6 x 4L tile, reading A's zero padding past K; only the lanes < K are stepped
                acc4 = _tile4(C, 0, A, k)
                for q in range(nq):
                    for c in range(4):
                        n = K - k - LANES * c
                        if n > 0:
                            if kind == NO_UPDATE:
                                _st(gW, j + q, k + LANES * c, acc4[4 * q + c], n)
                            _step(W, mW, vW, j + q, k + LANES * c, acc4[4 * q + c], min(n, LANES), h, h.weight_decay)
            elif k + 2 * LANES <= K:
                acc = _tile(C, 0, A, k)
                for q in range(nq):
                    for half in range(2):
                        if kind == NO_UPDATE:
                            vstore(gW, j + q, k + LANES * half, acc[2 * q + half])
                        _step(W, mW, vW, j + q, k + LANES * half, acc[2 * q + half], LANES, h, h.weight_decay)
            else:
                for kk in range(k, K, LANES):
                    acc = _tile_n(C, 0, A, kk, K - kk)
                    for q in range(nq):
                        if kind == NO_UPDATE:
                            _st(gW, j + q, kk, acc[q], K - kk)
                        _step_call(W, mW, vW, j + q, kk, acc[q], K - kk, h, h.weight_decay)
        if k == 0:  # the first column of tiles also owns gb and b: column sums of dY
            _bias_step(dY, b, gb, mb, vb, j, min(j + 6, N), h)


# a call per vector would cost more than the step; the arrays come one by one, not as a Param: taking an
# array out of a tuple inside a loop makes Numba update its reference count, atomically, every time
@njit(**_exact, inline="always")
def _step(P, M, V, r, k, g, n, h, wd):  # noqa: PLR0913
    """The optimiser step `h`, the only one: P[r, k : k + n] (n <= LANES) with its moments M, V (2-D, P's
    shape), the gradient g (one vector) and weight decay wd (h.weight_decay on weights, 0 on biases),
    PyTorch semantics (docs/training.md). Explicit FMAs: one rounding each, the same in every compile.

    Weight tiles call it with g still in a register, in the task that computed g while the block of W is
    in L1 (no second pass over W and gW, no 1-D slice per row, whose reference count Numba would update
    atomically). Masked loads and stores only for n < 8: AMD's masked stores are slow."""
    kind = h.kind
    if kind == NO_UPDATE:
        return
    x = _ld(P, r, k, n)
    g = vfma(vbcast(wd), x, g)
    if kind == SGD:
        x = _sgd(x, g, h.lr)
    elif kind == MOMENTUM:
        m = vfma(vbcast(h.momentum), _ld(M, r, k, n), g)
        _st(M, r, k, m, n)
        x = _sgd(x, vfma(vbcast(h.momentum), m, g) if h.nesterov else m, h.lr)
    else:  # ADAM
        m = vfma(vbcast(h.beta1), _ld(M, r, k, n), vmul(vbcast(1 - h.beta1), g))
        v = vfma(vbcast(h.beta2), _ld(V, r, k, n), vmul(vmul(vbcast(1 - h.beta2), g), g))
        _st(M, r, k, m, n)
        _st(V, r, k, v, n)
        x = vsub(x, vdiv(vmul(vbcast(h.lr * h.inv_bias1), m), vadd(vsqrt(vmul(v, vbcast(h.inv_bias2))),
                                                                     vbcast(h.eps))))
    _st(P, r, k, x, n)


@njit(**_exact)
def _sgd(x, g, lr):
    """x - lr·g in one rounding: the update of SGD and momentum in `_step`, and of the sparse weight
    gradient's plain-SGD tiles (whose weight decay is 0, so `_step` would add nothing else)."""
    return vfma(vbcast(-lr), g, x)


# The rare paths (too few outputs for a tile, the ragged last columns, the biases) call the step instead of
# inlining it: one inlined copy fewer for LLVM to optimise, which shortens the first compile at the same speed.
_step_call = njit(**_exact)(_step.py_func)


# The one-line helpers below are functions of their own, not inlined by Numba: LLVM inlines them when it
# optimises the kernel (its machine code stays the same size, and as fast), while Numba's inlining copies
# and types their IR again at every call site, which lengthens the first compile. They are
# register_jitable, not njit: an njit function is compiled once more for every constant argument a caller
# passes (_ld(X, i, k, 8) and _ld(X, i, k, 16) are two compiles, Literal[int](8) and Literal[int](16)),
# a register_jitable one once per type (int64). A heavier njit function called with a constant gets
# np.int64(constant) for the same reason.
@register_jitable
def _ld(A, r, k, n):
    return vload(A, r, k) if n >= LANES else vloadn(A, r, k, n)


@register_jitable
def _st(A, r, k, x, n):
    if n >= LANES:
        vstore(A, r, k, x)
    else:
        vstoren(A, r, k, x, n)


@njit(parallel=True, **_exact)
def update(p, h):
    """One optimiser step `h` on a Param of 1-D float32 arrays (n,): `_step` along its only row, prange
    over blocks of 1024 floats. Outside a parallel loop's body, Numba would update the four arrays'
    reference counts at every inlined `_step`: atomic operations per vector that cost more than the step."""
    n = p.value.shape[0]
    P, G, M, V = p.value.reshape((1, n)), p.grad.reshape((1, n)), p.m.reshape((1, n)), p.v.reshape((1, n))
    for t in prange((n + 1023) // 1024):
        for k in range(1024 * t, min(n, 1024 * t + 1024), LANES):
            _step(P, M, V, 0, k, _ld(G, 0, k, n - k), min(n - k, LANES), h, h.weight_decay)


# ---------------------------------------------------------------------------------------------------
# The first layer, whose input is pixels. 81 % of MNIST's pixels are 0 (the background), so a product
# that skips them does a fifth of the FLOPs of a dense one. Skipping needs the weights the other way
# round, so during training the first layer keeps them transposed, WT (K, pad(N)) (train_step moves
# them between the layouts; checkpoints and inference keep (out, in)): row k of WT is what pixel k adds
# to every output. Forward: a sample's outputs are the sum of its ~150 lit rows, computed for two samples
# at once over the ~227 rows either lights, in chunks of 8 vectors with eight vector sums per sample in
# registers (a chunk of WT, 784 rows x 8 vectors, stays in L2). Weight gradient: a 3 x 4LANES register
# tile, summed only over the samples that light each block of 3 pixels.


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
    """The pixels lit in either sample of each pair 2q, 2q + 1, in pixel order: cols[q, :cnt[q]] their
    indices, vals[2q, :cnt[q]] and vals[2q + 1, :cnt[q]] the two samples' values there (one of them may be
    0); a last odd sample is paired with zeros. A compressed-row copy of X for two samples at once: the
    sparse forward product reads each listed row of Wᵀ once for both (two random MNIST digits light 227
    pixels together, against 150 each).

    X (B, K) float32, cnt (ceil(B/2),) int32, cols (ceil(B/2), K) int32, vals (2 ceil(B/2), K) float32.
    prange over pairs (`list_pair`): no branch per pixel, which would mispredict at every stroke edge.
    """
    for q in prange((X.shape[0] + 1) // 2):
        cnt[q] = list_pair(X, q, cols, vals)


@njit(**_exact)
def list_pair(X, q, cols, vals):
    """Pair q of X (B, K) float32 (rows 2q and 2q + 1, or zeros past B) listed as `nonzeros` lists it, into
    cols[q], vals[2q], vals[2q + 1]; the count. A vector of both rows at a time (`vlist`). For `nonzeros`
    and the augmentation's pass, which lists each pair as soon as it is written. Called, not inlined: one
    call per pair costs nothing measurable, and a larger parallel loop's body takes Numba's parfor passes
    disproportionately longer to compile."""
    B, K = X.shape
    i, j = 2 * q, min(2 * q + 1, B - 1)
    nj = K if 2 * q + 1 < B else 0
    c = 0
    for k in range(0, K, LANES):
        n = min(LANES, K - k)
        c += vlist(cols, vals, q, c, vloadn(X, i, k, n), vloadn(X, j, k, min(n, nj - k)), k, n)
    return c


@njit(parallel=True, **_exact)
def nonzero_blocks(X, count, entries, bands):
    """For each block of 3 neighbouring pixels, the samples in which any of them is lit, in sample order,
    with their 3 pixels: the sums of the weight gradient's tiles (`sparse_backward_weight`).

    X (B, K) float32; count, entries (block_vals) and bands as in `Nonzeros`. The samples come in bands of
    bs, one per thread: band s's samples that light block kb are its entries s bs .. s bs + count[s, kb] - 1
    (a band appends at most its bs samples; a block past K lights in none). An entry is 4 floats: the
    block's 3 pixels in that sample (zeros past K) and the sample's index as an int32 (`simd.ventry`), so
    the weight gradient reads its pixels one entry after the other instead of from X's rows, which it
    would find in L3 by then.

    Neighbouring pixels are lit together (strokes): a block of 3 is lit in 25 % of MNIST's samples against
    19 % for one pixel, and a tile summed over a block's samples multiplies 1.33 zeros per lit pixel's FMA
    with blocks of 3, 1.78 with blocks of 6. Two blocks per sample and masked load: one compare gives both
    their lit bits. Each sample is appended branch-free (its entry is written, and kept only if the block
    is lit), as a branch per sample would mispredict a third of the time. prange over (band, pair of
    blocks), bands slowest: each thread reads the rows of X that the batch's gather or warp wrote on its
    own core (the same bands of samples), where rows from the other core would cross between the cores.
    """
    B, K = X.shape
    nh = (K + 5) // 6
    S = min(threads(), count.shape[0], max(B, 1))
    bs = (B + S - 1) // S
    S = (B + bs - 1) // bs if B > 0 else 1
    bands[0], bands[1] = S, bs
    for t in prange(S * nh):
        s, kh = t // nh, t % nh
        k = kh * 6
        n = min(6, K - k)
        first = np.uint64(s * bs)  # unsigned: Numba tests a signed index for wraparound at every store
        ca = cb = first
        for i in range(s * bs, min(B, s * bs + bs)):
            v = vloadn(X, i, k, n)
            bits = vnonzero(v)
            ventry(entries, 2 * kh, np.uint64(4) * ca, v, 0, i)
            ventry(entries, 2 * kh + 1, np.uint64(4) * cb, v, 3, i)
            ca += np.uint64((bits & 7) != 0)
            cb += np.uint64(bits > 7)
        count[s, 2 * kh] = ca - first
        count[s, 2 * kh + 1] = cb - first


@njit(parallel=True, **_exact)
def sparse_forward(cnt, cols, vals, WT, b, Y, relu):
    """Y = X W + b (then ReLU when `relu`) from X's pair lists (`nonzeros`), W kept transposed.

    cnt/cols/vals as `nonzeros` makes them for the B samples of Y, WT (K, pad(N)) with zeros past column
    N, b (N,), Y (B, N). Each task owns 8 LANES outputs of one pair of samples: eight vector sums per
    sample, to which each listed pixel k adds vals · WT[k, chunk] (eight loads from L2 feed sixteen FMAs).
    Loading WT is the bottleneck (one vector per FMA for one sample): the pair shares its loads. A sample
    adds exact zeros for the pixels only the other one lights (0 · w is ±0, and a sum plus ±0 is the sum:
    sums start at +0, to which -0 adds +0), so its sums are those of its own pixels, in pixel order. prange
    over (pair, chunk) in `_banded` order: each thread writes whole rows of Y, and works through one chunk
    of WT (400 KB with 16 lanes) at a time.
    """
    B, N = Y.shape
    br = b.reshape((1, N))
    nq = (B + 1) // 2
    nc, bs = (N + 8 * LANES - 1) // (8 * LANES), _band(nq)
    for t in prange(nq * nc):
        q, cb = _banded(t, nq, nc, bs)
        c = cb * 8 * LANES
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
        e0 = e1 = e2 = e3 = e4 = e5 = e6 = e7 = vzero()
        for e in range(cnt[q]):
            k = cols[q, e]
            x, z = vbload(vals, 2 * q, e), vbload(vals, 2 * q + 1, e)
            w = vload(WT, k, c)
            a0, e0 = vfma(x, w, a0), vfma(z, w, e0)
            w = vload(WT, k, c + LANES)
            a1, e1 = vfma(x, w, a1), vfma(z, w, e1)
            w = vload(WT, k, c + 2 * LANES)
            a2, e2 = vfma(x, w, a2), vfma(z, w, e2)
            w = vload(WT, k, c + 3 * LANES)
            a3, e3 = vfma(x, w, a3), vfma(z, w, e3)
            w = vload(WT, k, c + 4 * LANES)
            a4, e4 = vfma(x, w, a4), vfma(z, w, e4)
            w = vload(WT, k, c + 5 * LANES)
            a5, e5 = vfma(x, w, a5), vfma(z, w, e5)
            w = vload(WT, k, c + 6 * LANES)
            a6, e6 = vfma(x, w, a6), vfma(z, w, e6)
            w = vload(WT, k, c + 7 * LANES)
            a7, e7 = vfma(x, w, a7), vfma(z, w, e7)
        acc, acc2 = (a0, a1, a2, a3, a4, a5, a6, a7), (e0, e1, e2, e3, e4, e5, e6, e7)
        for h in range(8):
            n = N - c - LANES * h
            if n > 0:
                bias = _ld(br, 0, c + LANES * h, n)
                v = vadd(acc[h], bias)
                _st(Y, 2 * q, c + LANES * h, vmask(v, v) if relu else v, n)
                if 2 * q + 1 < B:
                    v = vadd(acc2[h], bias)
                    _st(Y, 2 * q + 1, c + LANES * h, vmask(v, v) if relu else v, n)


@njit(**_exact)
def _tile_rows(E, I, kb, D, cnt, S, bs, j):
    """A 3 x 4 tile of Xᵀ D over block kb's list (`nonzero_blocks`): acc[4q + h] = Σ_p x_q(p) · D[r(p), j + h
    LANES : j + (h + 1) LANES] over the list's entries p, band after band, where x_q(p) = E[kb, 4p + q] is
    the block's pixel q in sample r(p) = I[kb, 4p + 3] (E and I: block_vals and block_samples). 12 FMAs per
    4 loads of D and 3 broadcasts."""
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = a20 = a21 = a22 = a23 = vzero()
    for s in range(S):
        for p in range(s * bs, s * bs + cnt[s, kb]):
            r = I[kb, 4 * p + 3]
            d0, d1 = vload(D, r, j), vload(D, r, j + LANES)
            d2, d3 = vload(D, r, j + 2 * LANES), vload(D, r, j + 3 * LANES)
            c = vbload(E, kb, 4 * p)
            a00, a01, a02, a03 = vfma(c, d0, a00), vfma(c, d1, a01), vfma(c, d2, a02), vfma(c, d3, a03)
            c = vbload(E, kb, 4 * p + 1)
            a10, a11, a12, a13 = vfma(c, d0, a10), vfma(c, d1, a11), vfma(c, d2, a12), vfma(c, d3, a13)
            c = vbload(E, kb, 4 * p + 2)
            a20, a21, a22, a23 = vfma(c, d0, a20), vfma(c, d1, a21), vfma(c, d2, a22), vfma(c, d3, a23)
    return (a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23)


@njit(parallel=True, **_exact)
def sparse_backward_weight(nz, dY, WTp, bp, h):
    """gWᵀ = Xᵀ dY over the samples that light each block of 3 pixels (`nonzero_blocks`), then the
    optimiser step `h` on WT, fused.

    nz the Nonzeros whose block lists `nonzero_blocks` made from the batch X (B, K), dY (B, N) with rows at least
    pad(N) floats apart (the last tile reads 4LANES columns; lanes past N are never stored), WTp a Param of
    (K, pad(N)) arrays, bp a Param of (N,) arrays. Each task owns a 3 x 4LANES tile of gWᵀ (3 pixels x
    4LANES outputs): `_tile_rows` over the block's samples, then `_step` with the gradient still in
    registers. The sums run over the samples that light the block instead of the whole batch; a sample
    with the block lit but this pixel 0 adds an exact 0. Tiles are disjoint and sum in sample order: no
    races, the same bits for any thread count and any block size. With plain SGD and no weight decay a
    block no sample lit has a zero gradient, and its step would change nothing: it is skipped. The tasks
    of block 0 (the image's corner, never lit) also own gb and b, 4LANES columns each (`_bias_step`; one
    parallel region fewer than a kernel of their own, which counts at two threads and small batches).
    prange over (block, column tile), blocks slowest: the two threads take the top and the bottom half of
    the image.
    """
    cnt, E, I = nz.block_count, nz.block_vals, nz.block_samples
    S, bs = nz.block_bands[0], nz.block_bands[1]
    WT, GT, MT, VT = WTp  # unpacked here: helpers in the loops take arrays (see _step)
    b, gb, mb, vb = bp
    K = WT.shape[0]
    N = dY.shape[1]
    nt = (N + 4 * LANES - 1) // (4 * LANES)
    skip_unlit = h.kind == SGD and h.weight_decay == 0
    for t in prange((K + 2) // 3 * nt):
        kb = t // nt
        j = (t % nt) * 4 * LANES
        if kb == 0:
            _bias_step(dY, b, gb, mb, vb, j, min(j + 4 * LANES, N), h)
        if skip_unlit and _unlit(cnt, S, kb):
            continue
        k = kb * 3
        acc = _tile_rows(E, I, kb, dY, cnt, S, bs, j)
        if h.kind != NO_UPDATE and k + 3 <= K:  # the step inlined, so the gradient stays in registers (passed to
            # _step_tile, the tile would go through memory); the last column tile stops at N
            for r in range(12):
                c = j + LANES * (r % 4)
                n = N - c
                if n > 0 and skip_unlit:  # the common case: `_step` for plain SGD
                    _st(WT, k + r // 4, c, _sgd(_ld(WT, k + r // 4, c, n), acc[r], h.lr), n)
                elif n > 0:
                    _step(WT, MT, VT, k + r // 4, c, acc[r], min(n, LANES), h, h.weight_decay)
            continue
        _step_tile(acc, WT, GT, MT, VT, k, j, min(3, K - k), N, h)


@register_jitable
def _unlit(cnt, S, kb):
    """No sample of the S bands lights block kb."""
    for s in range(S):
        if cnt[s, kb] != 0:
            return False
    return True


@njit(**_exact)
def _step_tile(acc, W, gW, mW, vW, k, j, nq, N, h):  # noqa: PLR0913 -- arrays one by one, as _step
    """The general epilogue of a 3 x 4LANES gradient tile at (k, j) of W: rows k..k+nq-1, columns below N (the
    gradient stored in gW when NO_UPDATE), then `_step`. A function of its own, so that its registers do
    not crowd the tile's."""
    for q in range(nq):
        for h4 in range(4):
            n = N - j - LANES * h4
            if n > 0:
                if h.kind == NO_UPDATE:
                    _st(gW, k + q, j + LANES * h4, acc[4 * q + h4], n)
                _step(W, mW, vW, k + q, j + LANES * h4, acc[4 * q + h4], min(n, LANES), h, h.weight_decay)


@njit(**_exact)
def _bias_step(dY, b, gb, mb, vb, j0, j1, h):
    """gb[j0:j1] = Σ_batch dY[:, j0:j1], one vector at a time in sample order, and the optimiser step on
    b[j0:j1] (no weight decay on biases): the bias part of both weight-gradient kernels, done by the tasks
    of their first block. dY (B, N), b/gb/mb/vb (N,), viewed as rows for `_step`."""
    B, N = dY.shape
    br, gbr, mbr, vbr = b.reshape((1, N)), gb.reshape((1, N)), mb.reshape((1, N)), vb.reshape((1, N))
    for j in range(j0, j1, LANES):
        s = vzero()
        for i in range(B):
            s = vadd(s, vloadn(dY, i, j, j1 - j))
        vstoren(gbr, 0, j, s, j1 - j)
        _step_call(br, mbr, vbr, np.int64(0), j, s, min(j1 - j, LANES), h, 0.0)  # int64: see _ld


# ---------------------------------------------------------------------------------------------------
# Softmax + cross-entropy + its gradient, fused.


@njit(**_exact)
def softmax_xent(Z, y, dZ, loss, pred, scale):
    """Per-sample loss −log softmax(Z)[y], the predicted class, and dZ = scale · (softmax(Z) − onehot(y)).

    Z, dZ (B, C) float32 logits and their gradient (may be the same array), y (B,) labels, loss (B,)
    float32, pred (B,) int64. scale is 1 for a summed loss, 1/B for a mean. Rows are independent; the
    batch loss is summed afterwards in a fixed order by the caller. One thread (see SERIAL).
    """
    B, C = Z.shape
    sc = np.float32(scale)
    for i in range(B):
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
# order of the checkpoint file, docs/checkpoint-format.md), so the optimiser state, gradients and
# checkpoints are flat copies too. `layer_views` is the one place that knows where a layer sits in it.


@register_jitable
def layer_views(P, sizes, l):
    """W_l (n_l, n_{l-1}) and b_l (n_l,) as views into the flat array P (l counts from 0)."""
    off = 0
    for m in range(l):
        off += sizes[m + 1] * sizes[m] + sizes[m + 1]
    n_in, n_out = sizes[l], sizes[l + 1]
    W = P[off:off + n_out * n_in].reshape((n_out, n_in))
    b = P[off + n_out * n_in:off + n_out * n_in + n_out]
    return W, b


@register_jitable
def _layer(flat, sizes, l):
    """Layer l's weights and biases, each as a Param of views into the flat Param."""
    W, b = layer_views(flat.value, sizes, l)
    gW, gb = layer_views(flat.grad, sizes, l)
    mW, mb = layer_views(flat.m, sizes, l)
    vW, vb = layer_views(flat.v, sizes, l)
    return Param(W, gW, mW, vW), Param(b, gb, mb, vb)


@register_jitable
def pad(n):
    """Row length, in floats, of the activation and gradient buffers and of the transposed first layer:
    n rounded up to 8 vectors (64 floats with 8 lanes), so that every row starts 64-byte aligned
    (otherwise most vector loads of the products straddle two cache lines), and the first layer's sparse
    products may read whole chunks of 8 vectors."""
    return (n + 8 * LANES - 1) // (8 * LANES) * (8 * LANES)


def acts_size(sizes, cap: int) -> int:
    """Floats of the activation buffer of `forward` and `train_step` for up to `cap` samples: every layer's
    outputs, then room for `forward`'s copy of its input."""
    return cap * sum(pad(n) for n in sizes)


def transposed(sizes, l: int) -> bool:
    """Whether train_step's forward product of layer l (0-based) runs over transposed weights
    (`linear_forward_t`): every layer after the first that is at least one tile (2LANES outputs) wide. The
    first has its own transposed copy while batches are sparse, and the output layer's ten classes would
    fill a third of the tile."""
    return l >= 1 and sizes[l + 1] >= 2 * LANES


def wt_size(sizes) -> int:
    """Floats of the buffer of the transposed weights (the largest of the layers `transposed` names)."""
    return max([sizes[l] * pad(sizes[l + 1]) for l in range(len(sizes) - 1) if transposed(sizes, l)], default=0)


def grad_size(sizes, cap: int) -> int:
    """Floats of each of train_step's two gradient buffers."""
    return cap * max(pad(n) for n in sizes[1:])


@register_jitable
def _rows(buf, off, B, n):
    """A (B, n) view into the flat buffer from `off`, each row pad(n) floats long."""
    return buf[off:off + B * pad(n)].reshape((B, pad(n)))[:, :n]


@register_jitable
def _act(acts, sizes, cap, l, B):
    """The (B, n_l) output buffer of layer l (0-based) inside the flat activation array."""
    off = 0
    for m in range(l):
        off += cap * pad(sizes[m + 1])
    return _rows(acts, off, B, sizes[l + 1])


class ForwardViews(NamedTuple):
    """`forward`'s views for batches of B samples: the input area x (B, n_0) of the activation buffer (a
    strided view like the activations, so that one compiled linear_forward serves every layer) and each
    layer's (W, b, Y), Y (B, n_l) its output in the buffer."""

    x: np.ndarray
    layers: list


def forward_views(P, sizes, acts, cap: int, B: int) -> ForwardViews:
    """The views of `forward` into the flat parameters P and the activations `acts` (acts_size(sizes, cap)
    floats) for B <= cap samples."""
    x = _rows(acts, cap * sum(pad(n) for n in sizes[1:]), B, sizes[0])
    return ForwardViews(x, [(*layer_views(P, sizes, l), _act(acts, sizes, cap, l, B)) for l in range(len(sizes) - 1)])


def forward(v: ForwardViews, calls: "Calls", X) -> np.ndarray:
    """Logits (B, n_L) of the batch X (B, n_0) through the views v (forward_views), each layer's product
    through its compiled entry point in `calls` (a Calls made for these views only: a view's layout is part
    of an entry point). Python over `linear_forward`, as train_step is: a compiled function that calls a
    parallel kernel loaded from the cache is itself broken when loaded from the cache next time."""
    v.x[:] = X
    A = v.x
    last = len(v.layers) - 1
    for l, (W, b, Y) in enumerate(v.layers):
        calls(f"forward {l}", linear_forward, A, W, b, Y, l < last)
        A = Y
    return A


class Calls:
    """Kernel calls through the compiled entry point each call site found on its first call: the types of
    a site's arguments are the same at every step with the same views, and the entry point skips Numba's
    type dispatch, which costs microseconds for every named tuple argument, more than the rest of the
    step's Python."""

    def __init__(self):
        self.entries: dict[str, object] = {}

    def __call__(self, site: str, f, *args):
        e = self.entries.get(site)
        if e is None:
            if not hasattr(f, "typeof_pyval"):  # not a compiled kernel (precompile.record's stand-in)
                return f(*args)
            e = self.entries[site] = f.compile(tuple(f.typeof_pyval(a) for a in args))
        return e(*args)


class StepViews(NamedTuple):
    """train_step's views into the parameters and buffers for one batch size (`step_views`), and its calls'
    compiled entry points (`Calls`)."""

    weights: list  # layer l's (W, b), each a Param of views into the flat Param
    acts: list  # layer l's (B, n_l) outputs
    dZ: np.ndarray  # the logits' gradient
    dA: list  # layer l's input gradient (l >= 1; None at 0), in grad_a/grad_b by turns
    wt: list  # layer l's transposed weights (n_{l-1}, pad(n_l)) in buf.wt when `transposed`, else None
    loss: np.ndarray
    pred: np.ndarray
    call: Calls


def step_views(state, sizes, buf, B: int) -> StepViews:
    """The views train_step passes to the kernels for a batch of B samples, made once (kept in buf.views):
    slicing them anew each step would cost more Python time than the calls."""
    L = len(sizes) - 1
    cap = buf.cap
    dA = [None] + [_rows(buf.grad_b if (L - 1 - l) % 2 == 0 else buf.grad_a, 0, B, sizes[l]) for l in range(1, L)]
    return StepViews([_layer(state.flat, sizes, l) for l in range(L)],
                     [_act(buf.acts, sizes, cap, l, B) for l in range(L)],
                     _rows(buf.grad_a, 0, B, sizes[L]), dA,
                     [buf.wt[:sizes[l] * pad(sizes[l + 1])].reshape((sizes[l], pad(sizes[l + 1])))
                      if transposed(sizes, l) else None for l in range(L)],
                     buf.loss[:B], buf.pred[:B], Calls())


def train_step(state, sizes, X, y, buf, listed, h, scale) -> float:
    """Forward, loss, backward and optimiser step `h` on one mini-batch; returns the summed loss.

    state: the TrainState (flat params, gradients and moments; the first layer's transposed copy and
    which copy is current), X (B, n_0) float32 with B <= buf.cap, y (B,) int64 labels, buf: the Buffers
    (per-sample loss and prediction land in buf.loss[:B], buf.pred[:B]; a Buffers serves one TrainState),
    listed: X is the batch `gather_nonzeros` just wrote and its non-zeros are in buf.nonzeros already,
    scale: 1 for a summed loss, 1/B for a mean. h.kind NO_UPDATE computes loss and gradients only (the
    weights' part into state.flat.grad).

    Python over the kernels: each is compiled (and cached) on its own, so a first run compiles no
    function that links them all again, and they can be compiled in parallel processes (precompile.py).

    The first layer skips X's zeros (`sparse_forward`, `sparse_backward_weight`) unless X is dense: when
    more than 40 % of the first 8 samples' pixels are non-zero, the dense tiles on (out, in) weights are
    faster. A batch that takes the other path than the last one first moves the first layer over
    (`move_first`); real data stays on one path, so that happens once, at the first step.
    """
    L = len(sizes) - 1
    B = X.shape[0]
    # what fixes the types of every call's arguments, with the state's and the buffers' (always the same)
    at = (B, X.dtype.str, X.strides, X.flags.writeable, y.dtype.str, y.strides, y.flags.writeable)
    v = buf.views.get(at)
    if v is None:
        v = buf.views[at] = step_views(state, sizes, buf, B)
    call, nz = v.call, buf.nonzeros
    sparse = B < 6 or call("density", density, X, 8) <= 0.4
    if sparse != (state.first_is_t[0] == 1):
        call("move", move_first, state, sizes, sparse)
        state.first_is_t[0] = 1 if sparse else 0
    (W, b), A = v.weights[0], v.acts[0]
    if sparse:
        if not listed:
            call("nonzeros", nonzeros, X, nz.count, nz.cols, nz.vals)
        # now, while the gather's X is still in L2: at the end of the step, after the forward and backward
        # products have passed through, X would come back from L3
        call("blocks", nonzero_blocks, X, nz.block_count, nz.block_vals, nz.block_bands)
        call("sparse_forward", sparse_forward, nz.count, nz.cols, nz.vals, state.first_t.value, b.value, A, L > 1)
    else:
        call("forward0", linear_forward, X, W.value, b.value, A, L > 1)
    for l in range(1, L):
        W, b = v.weights[l]
        if v.wt[l] is not None:
            call(f"forward{l}", linear_forward_t, A, W.value, v.wt[l], b.value, v.acts[l], l < L - 1)
        else:
            call(f"forward{l}", linear_forward, A, W.value, b.value, v.acts[l], l < L - 1)
        A = v.acts[l]
    dZ = v.dZ
    call("loss", softmax_xent, A, y, dZ, v.loss, v.pred, scale)
    for l in range(L - 1, -1, -1):
        A = X if l == 0 else v.acts[l - 1]
        Wp, bp = v.weights[l]
        if l > 0:  # the input gradient needs the old W, so before the update
            call(f"input{l}", linear_backward_input, dZ, Wp.value, A, v.dA[l])
        if l > 0 or not sparse:
            call(f"weight{l}", linear_backward_weight, dZ, A, buf.work, Wp, bp, h)
        else:
            call("sparse_weight", sparse_backward_weight, nz, dZ, state.first_t, bp, h)
        if l > 0:
            dZ = v.dA[l]
    return call("sum", total, v.loss)


@njit(cache=True)
def total(loss):
    """The sum of the per-sample losses in sample order, in float64."""
    s = 0.0
    for i in range(loss.shape[0]):
        s += loss[i]
    return s


def move_first(state, sizes, to_t: bool) -> None:
    """Copy the first layer's weights, gradient and moments into the transposed arrays (to_t) or back.
    NumPy's copies: it runs when the path changes (once per run on real data) and before each
    evaluation, and compiled code here would only lengthen the first compile."""
    for a, at in zip(state.flat, state.first_t):  # value, grad, m, v
        W = layer_views(a, sizes, 0)[0]
        if to_t:
            at[:, :W.shape[0]] = W.T
        else:
            W[:] = at[:, :W.shape[0]].T


def _nonzeros_specs(cap: int, n_in: int) -> list:
    # the arrays of Nonzeros but the view, for up to `cap` samples of n_in pixels, with a band of block lists
    # for each thread Numba can run (NUMBA_NUM_THREADS)
    nb, nq, S = 2 * ((n_in + 5) // 6), (cap + 1) // 2, max(1, numba.config.NUMBA_NUM_THREADS)
    return [((nq,), np.int32), ((nq, n_in), np.int32), ((2 * nq, n_in), np.float32), ((S, nb), np.int32),
            ((nb, 4 * cap), np.float32), ((2,), np.int64)]


def _nonzeros(arrays: list) -> Nonzeros:
    count, cols, vals, block_count, block_vals, bands = arrays
    return Nonzeros(count, cols, vals, block_count, block_vals, block_vals.view(np.int32), bands)


def nonzeros_bufs(cap: int, n_in: int) -> Nonzeros:
    """The index buffers train_step's first layer fills per batch for up to `cap` samples of n_in pixels."""
    return _nonzeros(huge_zeros(_nonzeros_specs(cap, n_in)))


def buffers(sizes, cap: int) -> Buffers:
    """The work buffers of train_step for up to `cap` samples and the mini-batch, 64-byte aligned, on huge
    pages where Linux gives them (`huge_zeros`)."""
    f32 = np.float32
    own = [((cap, sizes[0]), f32), ((acts_size(sizes, cap),), f32), ((grad_size(sizes, cap),), f32),
           ((grad_size(sizes, cap),), f32), ((work_size(max(sizes[1:]), cap),), f32), ((wt_size(sizes),), f32),
           ((cap,), f32), ((cap,), np.int64)]
    a = huge_zeros(own + _nonzeros_specs(cap, sizes[0]))
    x, acts, grad_a, grad_b, work, wt, loss, pred = a[:len(own)]
    return Buffers(x, acts, grad_a, grad_b, work, wt, _nonzeros(a[len(own):]), loss, pred, cap, {})


def train_state(sizes, params: np.ndarray) -> TrainState:
    """Training state around the flat parameter array `params`: zero gradients and moments, the first layer
    current in the flat arrays."""
    n = params.size
    shape_t = (sizes[0], pad(sizes[1]))
    flat = Param(params, aligned_zeros(n), aligned_zeros(n), aligned_zeros(n))
    first_t = Param(*(aligned_zeros(shape_t) for _ in range(4)))
    return TrainState(flat, first_t, np.zeros(1, np.int64))
