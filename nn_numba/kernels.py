"""Every FLOP of training and inference: explicit loops compiled by Numba, no BLAS.

Layout (the PyTorch one): a layer's weights W are (out, in) row-major and it computes Y = X Wᵀ + b.
With that layout no product needs a transpose:
  forward      Y  = X Wᵀ     dot form, contiguous rows of X and W            -> 6x2 register tiles
  backward dX  dX = dY W     axpy form over contiguous rows of W             -> 4 rows x 4 outputs jammed
  backward dW  dW = dYᵀ X    axpy form over contiguous rows of X             -> 4 rows x 4 samples jammed
Every output element is written by exactly one prange task with a fixed summation order, so results
are bit-identical run after run *and* for any thread count. `fastmath` lets LLVM reassociate the
reductions into vector FMAs (256-bit on AVX2, 512-bit on AVX-512; without it the dot-form loops stay scalar
and run ~9x slower); float32 accumulators are spelled np.float32(0) because a bare 0.0 is float64 in Numba.
Callers should hand in 64-byte aligned arrays (`aligned_zeros`): 32-byte loads that straddle cache lines
cost 10-25 % on the 784-wide products. No data-dependent branches in hot loops: ReLU signs are random.
"""

import numpy as np
from numba import njit, prange

SGD, MOMENTUM, ADAM, NO_UPDATE = 0, 1, 2, 3  # optimiser codes, as in the checkpoint's OPTM section

# u8 -> float32 pixel, exactly u8 / 255 (a fastmath division could become a multiply by 1/255 and round
# differently from the C++ port).
PIXEL = (np.arange(256, dtype=np.float32) / np.float32(255)).astype(np.float32)

_opts = dict(parallel=True, cache=True, fastmath=True)


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
    for i in prange(idx.shape[0]):
        r = idx[i]
        for k in range(K):
            out[i, k] = lut[X_u8[r, k]]


# ---------------------------------------------------------------------------------------------------
# Linear layer: forward and the two backward products, side by side.


@njit(**_opts)
def linear_forward(X, W, b, Y, relu):
    """Y = X Wᵀ + b, then ReLU when `relu`.

    X (B, K), W (N, K), b (N,), Y (B, N), all float32.
    Each task owns a 6x2 tile of Y and keeps its 12 sums in vector registers (vectorised along k), so every
    vector loaded from W feeds six FMAs and every vector of X two. 6x2 and not 4x4: with AVX2's 16 vector
    registers the 16 sums of a 4x4 tile plus its 8 operands spill (measured 1.5x slower on a Zen 3 host);
    12 sums + 2 W vectors + 1 X vector fit, and on AVX-512 (32 registers) it fits too. prange over tiles
    (row-major, so consecutive tiles of one thread share their X rows in L1); bias and ReLU are applied
    while the tile is still in registers, without a branch (`_clip`). Ragged rows (B not a multiple of 6)
    go one row at a time.
    """
    B, K = X.shape
    N = W.shape[0]
    lo = np.float32(0) if relu else np.float32(-3.4028235e38)
    tn = (N + 1) // 2
    for t in prange(((B + 5) // 6) * tn):
        i = (t // tn) * 6
        j = (t % tn) * 2
        if i + 6 <= B and j + 2 <= N:
            s00 = s01 = s10 = s11 = s20 = s21 = np.float32(0)
            s30 = s31 = s40 = s41 = s50 = s51 = np.float32(0)
            for k in range(K):
                w0, w1 = W[j, k], W[j + 1, k]
                x = X[i, k]
                s00 += x * w0
                s01 += x * w1
                x = X[i + 1, k]
                s10 += x * w0
                s11 += x * w1
                x = X[i + 2, k]
                s20 += x * w0
                s21 += x * w1
                x = X[i + 3, k]
                s30 += x * w0
                s31 += x * w1
                x = X[i + 4, k]
                s40 += x * w0
                s41 += x * w1
                x = X[i + 5, k]
                s50 += x * w0
                s51 += x * w1
            b0, b1 = b[j], b[j + 1]
            Y[i, j], Y[i, j + 1] = _clip(s00 + b0, lo), _clip(s01 + b1, lo)
            Y[i + 1, j], Y[i + 1, j + 1] = _clip(s10 + b0, lo), _clip(s11 + b1, lo)
            Y[i + 2, j], Y[i + 2, j + 1] = _clip(s20 + b0, lo), _clip(s21 + b1, lo)
            Y[i + 3, j], Y[i + 3, j + 1] = _clip(s30 + b0, lo), _clip(s31 + b1, lo)
            Y[i + 4, j], Y[i + 4, j + 1] = _clip(s40 + b0, lo), _clip(s41 + b1, lo)
            Y[i + 5, j], Y[i + 5, j + 1] = _clip(s50 + b0, lo), _clip(s51 + b1, lo)
        else:  # ragged edge of the batch (a 1x2 tile per row) or of the outputs (N odd: one column)
            for ii in range(i, min(i + 6, B)):
                if j + 2 <= N:
                    s0 = s1 = np.float32(0)
                    for k in range(K):
                        x = X[ii, k]
                        s0 += x * W[j, k]
                        s1 += x * W[j + 1, k]
                    Y[ii, j], Y[ii, j + 1] = _clip(s0 + b[j], lo), _clip(s1 + b[j + 1], lo)
                else:
                    s0 = np.float32(0)
                    for k in range(K):
                        s0 += X[ii, k] * W[j, k]
                    Y[ii, j] = _clip(s0 + b[j], lo)


@njit(fastmath=True, cache=True)
def _clip(v, lo):
    """max(v, lo) as a select: lo = 0 is the ReLU, lo = the lowest float32 leaves v alone. A branch per
    output (`if Y < 0`, as before) mispredicts on about half of them: the 250-wide forward product ran at
    35 instead of 61 GFLOP/s on real (mixed-sign) data."""
    return lo if v < lo else v


@njit(**_opts)
def linear_backward_input(dY, W, A, dX):
    """dX = (dY W) ⊙ [A > 0]: the gradient at the layer's input, through the previous layer's ReLU.

    dY (B, N), W (N, K), A (B, K) the layer's input (a ReLU output, so A > 0 exactly where its
    pre-activation was > 0), dX (B, K). Each task owns 4 rows of dX and adds 4 rows of W at a time
    (16 coefficients in registers, vectorised along k). prange over 4-row blocks of the batch.
    """
    B, N = dY.shape
    K = W.shape[1]
    for t in prange((B + 3) // 4):
        i = t * 4
        ie = min(i + 4, B)
        for ii in range(i, ie):
            for k in range(K):
                dX[ii, k] = 0
        if ie - i == 4:
            for jb in range(N // 4):
                j = jb * 4
                d00, d01, d02, d03 = dY[i, j], dY[i, j + 1], dY[i, j + 2], dY[i, j + 3]
                d10, d11, d12, d13 = dY[i + 1, j], dY[i + 1, j + 1], dY[i + 1, j + 2], dY[i + 1, j + 3]
                d20, d21, d22, d23 = dY[i + 2, j], dY[i + 2, j + 1], dY[i + 2, j + 2], dY[i + 2, j + 3]
                d30, d31, d32, d33 = dY[i + 3, j], dY[i + 3, j + 1], dY[i + 3, j + 2], dY[i + 3, j + 3]
                for k in range(K):
                    w0, w1, w2, w3 = W[j, k], W[j + 1, k], W[j + 2, k], W[j + 3, k]
                    dX[i, k] += d00 * w0 + d01 * w1 + d02 * w2 + d03 * w3
                    dX[i + 1, k] += d10 * w0 + d11 * w1 + d12 * w2 + d13 * w3
                    dX[i + 2, k] += d20 * w0 + d21 * w1 + d22 * w2 + d23 * w3
                    dX[i + 3, k] += d30 * w0 + d31 * w1 + d32 * w2 + d33 * w3
            j0 = (N // 4) * 4
        else:
            j0 = 0
        for j in range(j0, N):
            for ii in range(i, ie):
                d = dY[ii, j]
                for k in range(K):
                    dX[ii, k] += d * W[j, k]
        for ii in range(i, ie):  # a select and a plain store, not a branch (LLVM made it a masked store)
            for k in range(K):
                dX[ii, k] = np.float32(0) if A[ii, k] <= 0 else dX[ii, k]


@njit(**_opts)
def linear_backward_weight(dY, A, gW, gb, W, b, mW, mb, vW, vb, kind, lr, mom, nesterov, wd, b1, b2, eps, c1, c2):
    """gW = dYᵀ A, gb = Σ_batch dY, then the optimiser step on W and b, fused.

    dY (B, N), A (B, K) the layer's input, gW/W/mW/vW (N, K), gb/b/mb/vb (N,). Each task owns 4 rows of
    gW and walks the batch 4 samples at a time (16 coefficients in registers, vectorised along k); once
    its rows are complete it updates the same rows of W while they are in L1. prange over 4-row blocks
    of W: disjoint rows, so no races. Must run after linear_backward_input, which reads the old W.
    `kind`, the hyper-parameters and the Adam bias corrections c1 = 1/(1-β1ᵗ), c2 = 1/(1-β2ᵗ) are
    those of `update`; kind NO_UPDATE only computes the gradients.
    """
    B, N = dY.shape
    K = A.shape[1]
    for t in prange((N + 3) // 4):
        j = t * 4
        je = min(j + 4, N)
        for jj in range(j, je):
            for k in range(K):
                gW[jj, k] = 0
        i0 = 0
        if je - j == 4:
            for ib in range(B // 4):
                i = ib * 4
                c00, c01, c02, c03 = dY[i, j], dY[i + 1, j], dY[i + 2, j], dY[i + 3, j]
                c10, c11, c12, c13 = dY[i, j + 1], dY[i + 1, j + 1], dY[i + 2, j + 1], dY[i + 3, j + 1]
                c20, c21, c22, c23 = dY[i, j + 2], dY[i + 1, j + 2], dY[i + 2, j + 2], dY[i + 3, j + 2]
                c30, c31, c32, c33 = dY[i, j + 3], dY[i + 1, j + 3], dY[i + 2, j + 3], dY[i + 3, j + 3]
                for k in range(K):
                    a0, a1, a2, a3 = A[i, k], A[i + 1, k], A[i + 2, k], A[i + 3, k]
                    gW[j, k] += c00 * a0 + c01 * a1 + c02 * a2 + c03 * a3
                    gW[j + 1, k] += c10 * a0 + c11 * a1 + c12 * a2 + c13 * a3
                    gW[j + 2, k] += c20 * a0 + c21 * a1 + c22 * a2 + c23 * a3
                    gW[j + 3, k] += c30 * a0 + c31 * a1 + c32 * a2 + c33 * a3
            i0 = (B // 4) * 4
        for i in range(i0, B):
            for jj in range(j, je):
                c = dY[i, jj]
                for k in range(K):
                    gW[jj, k] += c * A[i, k]
        for jj in range(j, je):
            s = np.float32(0)
            for i in range(B):
                s += dY[i, jj]
            gb[jj] = s
            update(W[jj], gW[jj], mW[jj], vW[jj], kind, lr, mom, nesterov, wd, b1, b2, eps, c1, c2)
        update(b[j:je], gb[j:je], mb[j:je], vb[j:je], kind, lr, mom, nesterov, 0.0, b1, b2, eps, c1, c2)


@njit(fastmath=True, cache=True)
def update(p, g, m, v, kind, lr, mom, nesterov, wd, b1, b2, eps, c1, c2):
    """One optimiser step on a 1-D slice, PyTorch semantics (docs/training.md).

    p params, g gradient, m momentum / Adam first moment, v Adam second moment: all (n,) float32.
    Serial: it is called on a row by the task that owns that row.
    """
    lr, mom, wd = np.float32(lr), np.float32(mom), np.float32(wd)
    b1, b2, eps, c1, c2 = np.float32(b1), np.float32(b2), np.float32(eps), np.float32(c1), np.float32(c2)
    one = np.float32(1)
    if kind == SGD:
        for k in range(p.shape[0]):
            p[k] -= lr * (g[k] + wd * p[k])
    elif kind == MOMENTUM:
        for k in range(p.shape[0]):
            gk = g[k] + wd * p[k]
            m[k] = mom * m[k] + gk
            p[k] -= lr * (gk + mom * m[k]) if nesterov else lr * m[k]
    elif kind == ADAM:
        for k in range(p.shape[0]):
            gk = g[k] + wd * p[k]
            m[k] = b1 * m[k] + (one - b1) * gk
            v[k] = b2 * v[k] + (one - b2) * gk * gk
            p[k] -= lr * (m[k] * c1) / (np.sqrt(v[k] * c2) + eps)


# ---------------------------------------------------------------------------------------------------
# Softmax + cross-entropy + its gradient, fused.


@njit(**_opts)
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
def _act(acts, sizes, cap, l, B):
    """The (B, n_l) output buffer of layer l (0-based) inside the flat activation array."""
    off = 0
    for m in range(l):
        off += cap * sizes[m + 1]
    return acts[off:off + B * sizes[l + 1]].reshape((B, sizes[l + 1]))


@njit(cache=True)
def forward(P, sizes, X, acts, cap):
    """Logits (B, n_L) of the batch X (B, n_0); acts holds every layer's output for `cap` samples."""
    L = sizes.shape[0] - 1
    B = X.shape[0]
    A = X
    for l in range(L):
        W, b = _views(P, sizes, l)
        Y = _act(acts, sizes, cap, l, B)
        linear_forward(A, W, b, Y, l < L - 1)
        A = Y
    return A


@njit(cache=True)
def train_step(P, G, M, V, sizes, X, y, acts, cap, d0, d1, loss, pred,
               kind, lr, mom, nesterov, wd, b1, b2, eps, c1, c2, scale):
    """Forward, loss, backward and optimiser step on one mini-batch; returns the summed loss.

    P, G, M, V: flat params, gradients, first and second moments. X (B, n_0) float32, y (B,) labels,
    acts: layer outputs for up to `cap` samples, d0/d1: two gradient buffers of cap·max(n) floats,
    loss (B,) float32 and pred (B,) int64 per sample.
    """
    L = sizes.shape[0] - 1
    B = X.shape[0]
    Z = forward(P, sizes, X, acts, cap)
    dZ = d0[:B * sizes[L]].reshape((B, sizes[L]))
    softmax_xent(Z, y, dZ, loss, pred, scale)
    for l in range(L - 1, -1, -1):
        A = X if l == 0 else _act(acts, sizes, cap, l - 1, B)
        W, b = _views(P, sizes, l)
        if l > 0:  # the input gradient needs the old W, so before the update
            dA = (d1 if (L - 1 - l) % 2 == 0 else d0)[:B * sizes[l]].reshape((B, sizes[l]))
            linear_backward_input(dZ, W, A, dA)
        gW, gb = _views(G, sizes, l)
        mW, mb = _views(M, sizes, l)
        vW, vb = _views(V, sizes, l)
        linear_backward_weight(dZ, A, gW, gb, W, b, mW, mb, vW, vb, kind, lr, mom, nesterov, wd, b1, b2, eps,
                               c1, c2)
        if l > 0:
            dZ = dA
    total = 0.0
    for i in range(B):
        total += loss[i]
    return total
