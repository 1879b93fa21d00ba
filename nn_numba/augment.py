"""Data augmentation fused into the mini-batch gather: one Numba pass reads uint8 pixels of the chosen
samples, distorts them and writes the float32 batch, so the data set is never copied and a step allocates
nothing big.

Per-sample random parameters (shifts, angles, scales, the coarse elastic field) are the counter-based
draws of nn_numba/rng.py, keyed by (seed, epoch, position in the epoch): draws() returns them as small
(B x k) arrays, and apply() warps a batch by them. Each sample's draws depend on its key alone and each
sample is written by exactly one thread, so a batch is bit-identical for the same seed whatever the
number of threads, and a resumed run sees the same batches; like every kernel the warp is compiled
without fastmath (kernels.py, `_exact`, says why), so also whether it was compiled now or loaded from the
cache.

Training calls augment_listed: one parallel pass (warp_listed) that draws each sample's distortion, makes
its map, warps it and lists the batch's non-zero pixels for the first layer, writing exactly what draws()
+ apply() write.

Geometry: pixel (x, y) has its centre at integer coordinates, x to the right, y down, the image centre is
(13.5, 13.5). Every kernel maps each *output* pixel back to a source position (inverse mapping) and reads
the source there; outside the image is zero.
"""

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from nn_numba import jitcache, rng
from nn_numba.config import Augment
from nn_numba.kernels import PIXEL as LUT  # u8 -> f32 table, exactly u8 / 255
from nn_numba.kernels import gather, list_pair, vpixel
from nn_numba.simd import W as LANES
from nn_numba.simd import (
    bitspan,
    prefetch,
    vadd,
    vbcast,
    vbits,
    vclamp,
    vgather2,
    vload,
    vloadbytes,
    vmul,
    vstore,
    vstoren,
    vsub,
    vtrunc,
    vzero,
)

__all__ = ["Augment", "augment_batch", "augment_grid", "augment_listed"]

jitcache.use()  # before the first @njit(cache=True), as in kernels.py

S = 28  # image side
P = S * S  # pixels per image
C = (S - 1) / 2  # image centre, 13.5


# ---------------------------------------------------------------------------------------------------------
# kernels


@njit(parallel=True, cache=True)
def shift_gather(X_u8, idx, dx, dy, out):
    # X_u8 (N, 784) u8, idx (B,) i64, dx dy (B,) i64 (positive = right / down), out (B, 784) f32.
    # prange over samples: each output row is written by one thread only.
    for b in prange(idx.shape[0]):
        src = X_u8[idx[b]]
        for y in range(S):
            sy = y - dy[b]
            for x in range(S):
                sx = x - dx[b]
                if 0 <= sx < S and 0 <= sy < S:
                    out[b, y * S + x] = LUT[src[sy * S + sx]]
                else:
                    out[b, y * S + x] = np.float32(0)


W = S + 3  # side of the zero-padded source: 1 zero row/column before the image, 2 after


@njit(cache=True)
def _pad(X_u8, i, padm):
    # X_u8[i] (784,) u8 -> padm (W, W) f32 pixel values u8 / 255 (as kernels.PIXEL), the image at rows and
    # columns 1..28 inside a zero border, which makes bilinear sampling branch-free: clamped positions
    # outside read only zeros. Returns the box (x0, x1, y0, y1) f32 of the lit pixels: a position (px, py)
    # of the padded image can read one only if x0 < px < x1 and y0 < py < y1 (one column and row past the
    # lit ones, as a bilinear sample reads its position's floor and floor + 1); no lit pixel: an empty box.
    zero, inf = np.float32(0), np.float32(np.inf)
    rows = cols = 0  # bit y: row y has a lit pixel; bit x: column x has
    for y in range(S):
        lit = 0
        for k in range(0, S, LANES):
            v = vpixel(vloadbytes(X_u8, i, y * S + k, S - k))  # PIXEL's bits
            vstoren(padm, y + 1, k + 1, v, S - k)
            lit |= vbits(v, zero, inf, S - k) << k
        cols |= lit
        rows |= np.int64(lit != 0) << y
    if rows == 0:
        return np.float32(1e9), np.float32(-1e9), np.float32(1e9), np.float32(-1e9)
    x0, x1 = bitspan(cols)
    y0, y1 = bitspan(rows)
    return np.float32(x0), np.float32(x1 + 2), np.float32(y0), np.float32(y1 + 2)


@njit(cache=True)
def _warp(padm, out, b, m, E, XY, box):
    # Sample b: out[b, p] = bilinear sample of padm at m @ (x, y, 1) + (E[0, p], E[1, p]) for every pixel
    # p = 28 y + x. padm (W, W) f32 from _pad, out (B, 784) f32, m (2, 3) f32, E (2, EP) f32
    # displacements, XY (2, 784) f32 each pixel's x and y, box (x0, x1, y0, y1) f32 from _pad. Positions
    # are clamped into [-1, 28] + 1: outside the image that lands on the zero border with weights 1 and 0,
    # so it reads 0 without a branch. A vector of pixels at a time over the flat image (784 is a multiple
    # of both widths: no tails and no masked stores; on Zen 4 a vector load of lines just written by
    # masked stores, as list_pair's right after, stalls), each lane the scalar expression's ops in its
    # order, the 4 taps by two pair gathers (`vgather2`: the floats at q and q + 1, at q + W and q + W +
    # 1), only for vectors with a position inside the box: outside it all 4 taps are zeros and the sample
    # is +0, which is stored. Every q is at most 29 W + 29, so q + W + 1 < W W. A function called once per
    # sample, not inlined, so that the parallel loops that call it stay small (Numba's parfor passes take
    # disproportionately longer on a large body).
    lo, hi, side = vbcast(np.float32(0)), vbcast(np.float32(S + 1)), vbcast(np.float32(W))
    a, c, e = vbcast(m[0, 0]), vbcast(m[0, 1]), vbcast(m[0, 2] + np.float32(1))  # + 1: padded coordinates
    d, g, k1 = vbcast(m[1, 0]), vbcast(m[1, 1]), vbcast(m[1, 2] + np.float32(1))
    for k in range(0, P, LANES):
        fx, fy = vload(XY, 0, k), vload(XY, 1, k)
        px = vclamp(vadd(vadd(vadd(vmul(a, fx), vmul(c, fy)), e), vload(E, 0, k)), lo, hi)
        py = vclamp(vadd(vadd(vadd(vmul(d, fx), vmul(g, fy)), k1), vload(E, 1, k)), lo, hi)
        if (vbits(px, box[0], box[1], LANES) & vbits(py, box[2], box[3], LANES)) == 0:
            vstore(out, b, k, vzero())
            continue
        x0, y0 = vtrunc(px), vtrunc(py)  # px >= 0: truncation is floor
        tx, ty, q = vsub(px, x0), vsub(py, y0), vadd(vmul(y0, side), x0)  # q: exact, a small integer
        p00, p01 = vgather2(padm, 0, q, 0, LANES)
        p10, p11 = vgather2(padm, 0, q, W, LANES)
        top = vadd(p00, vmul(tx, vsub(p01, p00)))
        bot = vadd(p10, vmul(tx, vsub(p11, p10)))
        vstore(out, b, k, vadd(top, vmul(ty, vsub(bot, top))))


EVERYWHERE = (np.float32(-2), np.float32(W + 1), np.float32(-2), np.float32(W + 1))  # a box that holds every position


@njit(inline="always")
def _pixels():
    # XY (2, 784) f32: each pixel's x and y, for _warp (made once per call of a kernel, read by all tasks).
    XY = np.empty((2, P), dtype=np.float32)
    for p in range(P):
        XY[0, p], XY[1, p] = p % S, p // S
    return XY


@njit(inline="always")
def _padded():
    # A task's padded image for _pad (W, W): the border stays zero, _pad rewrites the image.
    return np.zeros((W, W), dtype=np.float32)


SW = (S + LANES - 1) // LANES * LANES  # a row of the elastic field's scratch, whole vectors (_spline_x)
EP = P + SW - S  # a row of E, the per-pixel field: whole-vector stores of the last image row end here


@njit(parallel=True, cache=True)
def affine_gather(X_u8, idx, mats, out):
    # X_u8 (N, 784) u8, idx (B,) i64, out (B, 784) f32, mats (B, 2, 3) f32: inverse affine map from output
    # pixel (x, y) to source (sx, sy) = mats[b] @ (x, y, 1); bilinear, zero outside. Every pixel is sampled
    # (the box holds every position); warp_listed must write the same bits while it samples fewer.
    # prange over samples: each output row is written by one thread only; the rest is per-sample scratch.
    XY = _pixels()
    for b in prange(idx.shape[0]):
        padm = _padded()
        _pad(X_u8, idx[b], padm)
        _warp(padm, out, b, mats[b], np.zeros((2, EP), dtype=np.float32), XY, EVERYWHERE)


@njit(parallel=True, cache=True)
def elastic_gather(X_u8, idx, mats, field, out):
    # X_u8 (N, 784) u8, idx (B,) i64, mats (B, 2, 3) f32 as in affine_gather, out (B, 784) f32,
    # field (B, 2, G + 2, G + 2) f32: x and y displacement in pixels at the nodes of a control grid whose
    # G x G inner nodes span the image corner to corner, plus one ring outside. A cubic B-spline turns it
    # into a smooth (C2) per-pixel field that is added to the affine source position, so affine + elastic
    # cost one sampling pass. prange over samples: one writer per output row; the rest is per-sample scratch.
    G = field.shape[2] - 2
    gi, gw, gd = _spline(G)
    XY = _pixels()
    for b in prange(idx.shape[0]):
        padm = _padded()
        _pad(X_u8, idx[b], padm)
        T = np.empty((2 * (G + 2), SW), dtype=np.float32)
        E = np.empty((2, EP), dtype=np.float32)  # the x and y displacements of every pixel
        _field(field[b], gi, gw, gd, T, E)
        _warp(padm, out, b, mats[b], E, XY, EVERYWHERE)


@njit(inline="always")
def _spline(G):
    # The cubic B-spline over G inner nodes is separable and the same for both axes and all samples: pixel
    # x (or row y) uses nodes gi[x] .. gi[x] + 3 of the ringed grid with weights gw[x, 0..3]; gd (G + 2,
    # SW) holds the same weights by node, gd[gi[x] + t, x] = gw[x, t], zeros elsewhere (for _spline_x).
    gi = np.empty(S, dtype=np.int64)
    gw = np.empty((S, 4), dtype=np.float32)
    gd = np.zeros((G + 2, SW), dtype=np.float32)
    h = np.float32(G - 1) / np.float32(S - 1)  # grid cells per pixel
    sixth = np.float32(1) / np.float32(6)
    for x in range(S):
        g = np.float32(x) * h
        gi[x] = min(int(g), G - 2)
        t = g - np.float32(gi[x])
        u = np.float32(1) - t
        gw[x, 0] = u * u * u * sixth
        gw[x, 1] = (np.float32(3) * t * t * (t - np.float32(2)) + np.float32(4)) * sixth
        gw[x, 2] = (np.float32(3) * t * (np.float32(1) + t - t * t) + np.float32(1)) * sixth
        gw[x, 3] = t * t * t * sixth
        for k in range(4):
            gd[gi[x] + k, x] = gw[x, k]
    return gi, gw, gd


@njit(inline="always")
def _spline_x(f, gi, gd, T):
    # f (2, G + 2, G + 2) one sample's nodes -> T (2 (G + 2), SW): every node row interpolated along x to
    # all 28 columns, T[c (G + 2) + j, x] (columns past 28 hold zeros). By node, in vectors of columns (a
    # pixel's 4 taps are indexed loads otherwise): T[., x] sums gd[i, x] f[c, j, i] over the nodes i in
    # order, which are x's 4 taps gw[x, 0..3] in order between exact zeros: the same sum, perhaps but for
    # the sign of a zero. The sum skips the nodes no column of the vector uses (an exact zero added to a
    # sum that starts at +0 never changes it), and runs four node rows at once (four chains of adds
    # in flight, not one).
    n = 2 * f.shape[1]
    g = f.reshape((n, f.shape[2]))  # node row c (G + 2) + j is T's row
    for k in range(0, S, LANES):
        i0, i1 = gi[k], gi[min(k + LANES, S) - 1] + 4  # the nodes the columns k .. k + LANES - 1 use
        for r0 in range(0, n, 4):
            # a last group of fewer rows repeats the last one
            r1, r2, r3 = min(r0 + 1, n - 1), min(r0 + 2, n - 1), min(r0 + 3, n - 1)
            a0 = a1 = a2 = a3 = vzero()
            for i in range(i0, i1):
                w = vload(gd, i, k)
                a0, a1 = vadd(a0, vmul(w, vbcast(g[r0, i]))), vadd(a1, vmul(w, vbcast(g[r1, i])))
                a2, a3 = vadd(a2, vmul(w, vbcast(g[r2, i]))), vadd(a3, vmul(w, vbcast(g[r3, i])))
            vstore(T, r0, k, a0)
            vstore(T, r1, k, a1)
            vstore(T, r2, k, a2)
            vstore(T, r3, k, a3)


@njit(inline="always")
def _spline_y(T, gi, gw, y, E):
    # ... and along y for image row y: E[:, 28 y : 28 y + 28] its x and y displacements, from 4 rows of T
    # each, in vectors of columns (the sums in tap order, as a pixel's scalar sum). Whole vectors: the
    # last one of a row runs into the next row, which is written after it (E's rows end EP - P floats
    # past the image).
    n = T.shape[0] // 2
    j = gi[y]
    w0, w1, w2, w3 = vbcast(gw[y, 0]), vbcast(gw[y, 1]), vbcast(gw[y, 2]), vbcast(gw[y, 3])
    for c in range(2):
        r = c * n + j
        for k in range(0, S, LANES):
            s = vadd(vadd(vadd(vmul(w0, vload(T, r, k)), vmul(w1, vload(T, r + 1, k))),
                          vmul(w2, vload(T, r + 2, k))), vmul(w3, vload(T, r + 3, k)))
            vstore(E, c, y * S + k, s)


@njit(cache=True)
def _field(f, gi, gw, gd, T, E):
    # f (2, G + 2, G + 2) one sample's nodes -> E (2, EP) the x and y displacement of every pixel; T
    # (2 (G + 2), SW) scratch. Called once per sample, not inlined (see _warp).
    _spline_x(f, gi, gd, T)
    for y in range(S):
        _spline_y(T, gi, gw, y, E)


CHUNK = 8  # samples per prange task of warp_listed (even: whole pairs): its scratch is allocated once per task


@njit(parallel=True, cache=True)
def warp_listed(X_u8, idx, seed, epoch, q0, shift, rotate, scale, alpha, G, out, cnt, cols, vals):
    # draws(), apply() and kernels.nonzeros in one pass: out (B, 784) f32 as apply writes it, and its
    # pairs' lit pixels cnt, cols, vals as kernels.nonzeros lists them (kernels.Nonzeros). X_u8
    # C-contiguous; shift rotate scale alpha as in Augment, G the ringed elastic grid's side (grid_size + 2,
    # 0 without elastic). The sample at position q0 + b draws its distortion from rng.sample_key(key(seed,
    # AUGMENT, epoch), q0 + b) as draws() does (_draw_affine, _draw_field) and its map as affine_mats makes
    # it (_affine; an integer shift is an exact affine map), and the float ops are elastic_gather's (or
    # affine_gather's), so a batch equals draws() + apply() bit for bit; Python does nothing per sample.
    # prange over chunks of samples: one writer per output row, scratch per chunk; the next sample's
    # pixels are prefetched (random rows: DRAM latency otherwise); each pair of samples is listed
    # (kernels.list_pair) as soon as it is written, while it is in L1 (CHUNK is even).
    gi, gw, gd = _spline(max(G - 2, 2))
    akey = rng.key(seed, rng.AUGMENT, epoch)
    XY = _pixels()
    B = idx.shape[0]
    for t in prange((B + CHUNK - 1) // CHUNK):
        padm = _padded()
        m = np.empty((2, 3), dtype=np.float32)
        f = np.empty((2, G, G), dtype=np.float32)
        T = np.empty((2 * G, SW), dtype=np.float32)
        E = np.zeros((2, EP), dtype=np.float32)  # stays zero without elastic, as affine_gather's
        for b in range(t * CHUNK, min(B, t * CHUNK + CHUNK)):
            if b + 1 < B:
                for k in range(0, P, 64):
                    prefetch(X_u8, idx[b + 1], k)
            box = _pad(X_u8, idx[b], padm)
            key = rng.sample_key(akey, q0 + b)
            dx, dy, angle, factor = _draw_affine(key, shift, rotate, scale)
            _affine(angle, factor, np.float64(dx), np.float64(dy), m)
            if G > 0:
                _draw_field(key, alpha, f)
                _field(f, gi, gw, gd, T, E)
            _warp(padm, out, b, m, E, XY, box)
            if b % 2 == 1 or b == B - 1:
                cnt[b // 2] = list_pair(out, b // 2, cols, vals)


# ---------------------------------------------------------------------------------------------------------
# per-sample parameters (Python, small arrays)


def affine_mats(angle: np.ndarray, scale: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Inverse affine maps (B, 2, 3) float32 for affine_gather.

    The forward map rotates by angle degrees (counter-clockwise on screen) and scales by `scale` about the
    image centre, then translates by (dx, dy) pixels (right, down); we need its inverse, output -> source.
    """
    v = [np.asarray(a, dtype=np.float64).reshape(-1) for a in (angle, scale, dx, dy)]
    m = np.empty((len(v[0]), 2, 3), np.float32)
    _affine_all(*v, m)
    return m


@njit(cache=True)
def _affine_all(angle, scale, dx, dy, m):
    for r in range(m.shape[0]):
        _affine(angle[r], scale[r], dx[r], dy[r], m[r])


@njit(cache=True)
def _affine(angle, scale, dx, dy, m):
    # One sample's inverse map into m (2, 3) f32, from float64 angle (degrees), scale and shift (dx, dy),
    # computed in float64 and rounded once: rotation by -angle and scaling by 1 / scale about the centre
    # where the forward map sends it, (C + dx, C + dy).
    t = angle * (math.pi / 180.0)  # np.deg2rad's product
    a, b = math.cos(t) / scale, math.sin(t) / scale
    ux, uy = C + dx, C + dy
    m[0, 0], m[0, 1], m[0, 2] = a, -b, C - a * ux + b * uy
    m[1, 0], m[1, 1], m[1, 2] = b, a, C - b * ux - a * uy


def grid_size(sigma: float) -> int:
    """Inner nodes per axis of the elastic control grid: spacing about sigma pixels, at least 2.

    Simard et al. smooth a per-pixel uniform random field with a Gaussian of width sigma; random nodes
    every sigma pixels under a cubic B-spline give the same kind of smooth field from far fewer random
    numbers (10 x 10 instead of 28 x 28 per axis for sigma 4). The spline averages neighbouring nodes, so
    no displacement exceeds alpha and the RMS one is about alpha / 3.5.
    """
    return max(2, math.floor((S - 1) / sigma + 0.5) + 1)  # round half up, as nn-cpp does


class Draws(NamedTuple):
    """The random parameters of nb consecutive samples (docs/training.md, "Random numbers")."""

    dx: np.ndarray  # (nb,) int64 shift right, pixels
    dy: np.ndarray  # (nb,) int64 shift down
    angle: np.ndarray  # (nb,) float64 degrees, counter-clockwise on screen
    scale: np.ndarray  # (nb,) float64 factor
    field: np.ndarray  # (nb, 2, G, G) float32 elastic control grid (G = grid_size(sigma) + 2), or (nb, 2, 0, 0)


@njit(cache=True)
def _draw_into(seed, epoch, q0, shift, rotate, scale, alpha, dx, dy, angle, factor, field):
    # Sample r (position q0 + r of the epoch) reads uniform(seed, 3, epoch, q0 + r, k) for k = 0 dx, 1 dy,
    # 2 angle, 3 scale, 4 + (c * G + y) * G + x the elastic node; a part that is off keeps its k unread.
    a = rng.key(seed, rng.AUGMENT, epoch)
    for r in range(dx.shape[0]):
        b = rng.sample_key(a, q0 + r)
        dx[r], dy[r], angle[r], factor[r] = _draw_affine(b, shift, rotate, scale)
        _draw_field(b, alpha, field[r])


@njit(cache=True)
def _draw_affine(b, shift, rotate, scale):
    # Sample key b's shift (dx, dy) int64, angle and scale factor float64: draws k = 0 dx, 1 dy, 2 angle,
    # 3 scale; a part that is off keeps its k unread and is 0 (1 for the factor). float64 throughout, no
    # fastmath: 1 + scale * (2u - 1) must not become a fused multiply-add.
    dx, dy, angle, factor = np.int64(0), np.int64(0), 0.0, 1.0
    if shift > 0:
        width = np.float64(2 * shift + 1)
        dx = np.int64(rng.draw(b, 0) * width) - shift
        dy = np.int64(rng.draw(b, 1) * width) - shift
    if rotate > 0:
        angle = rotate * (2.0 * rng.draw(b, 2) - 1.0)
    if scale > 0:
        factor = 1.0 + scale * (2.0 * rng.draw(b, 3) - 1.0)
    return dx, dy, angle, factor


@njit(inline="always")
def _draw_field(b, alpha, f):
    # f (2, G, G) f32: one sample's elastic nodes, draws k = 4 .. 4 + 2 G G - 1 of its sample key b.
    # One flat loop over the nodes in (c, y, x) order, so that it vectorises.
    g = f.reshape(f.size)
    for j in range(g.size):
        g[j] = np.float32(alpha * (2.0 * rng.draw(b, 4 + j) - 1.0))


def draws(aug: Augment, seed: int, epoch: int, q0: int, nb: int) -> Draws:
    """The distortions of the samples at positions q0 .. q0 + nb - 1 of epoch `epoch` (from 0).

    Each is uniform: dx, dy integers in [-shift, shift], angle in [-rotate, rotate], scale in
    [1 - scale, 1 + scale], the elastic nodes float32 in [-alpha, alpha]; a part that is off is 0 (1 for
    the scale). Only the enabled parts are drawn; which k each part reads never depends on the others.
    """
    G = _ringed(aug)
    d = Draws(np.zeros(nb, np.int64), np.zeros(nb, np.int64), np.zeros(nb), np.ones(nb),
              np.zeros((nb, 2, G, G), np.float32))
    _draw_into(seed, epoch, q0, int(aug.shift), float(aug.rotate), float(aug.scale), float(aug.elastic_alpha),
               *d)
    return d


def _ringed(aug: Augment) -> int:
    # the side of the elastic control grid with its ring, 0 without elastic
    return grid_size(aug.elastic_sigma) + 2 if aug.elastic_alpha > 0 else 0


def _check(X_u8: np.ndarray, idx: np.ndarray, out: np.ndarray) -> None:
    # Programming errors, not user errors: wrong dtypes would silently compile a new specialisation and an
    # out-of-range index would read random memory (Numba does no bounds checks).
    if X_u8.dtype != np.uint8 or X_u8.ndim != 2 or X_u8.shape[1] != P:
        raise ValueError(f"X_u8 must be uint8 (N, {P}), got {X_u8.dtype} {X_u8.shape}")
    if idx.dtype != np.int64 or idx.ndim != 1:
        raise ValueError(f"idx must be int64 (B,), got {idx.dtype} {idx.shape}")
    if out.dtype != np.float32 or out.shape != (len(idx), P) or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 ({len(idx)}, {P}), got {out.dtype} {out.shape}")
    if len(idx) and (idx.min() < 0 or idx.max() >= len(X_u8)):
        raise ValueError(f"idx out of range [0, {len(X_u8)})")


def augment_batch(X_u8: np.ndarray, idx: np.ndarray, out: np.ndarray, aug: Augment, seed: int, epoch: int,
                  q0: int) -> None:
    """out (B, 784) float32 = the samples X_u8[idx] / 255, randomly distorted as aug says.

    idx are the samples at positions q0 .. q0 + B - 1 of epoch `epoch`'s order: their distortions are
    draws(aug, seed, epoch, q0, B), so a batch depends only on where it is, never on what came before.
    For the last, smaller batch pass a view out[:len(idx)] of the preallocated buffer.
    """
    _check(X_u8, idx, out)
    if not aug.enabled:
        gather(X_u8, idx, LUT, out)
        return
    apply(X_u8, idx, out, aug, draws(aug, seed, epoch, q0, len(idx)))


def apply(X_u8: np.ndarray, idx: np.ndarray, out: np.ndarray, aug: Augment, d: Draws) -> None:
    """out = the samples X_u8[idx] / 255 distorted by the given draws (the parts aug enables)."""
    _check(X_u8, idx, out)
    if aug.rotate == 0 and aug.scale == 0 and aug.elastic_alpha == 0:
        shift_gather(X_u8, idx, d.dx, d.dy, out)  # integer shift only: no interpolation, no blur
        return
    mats = affine_mats(d.angle, d.scale, d.dx, d.dy)
    X_u8 = np.ascontiguousarray(X_u8)  # the warp loads rows as vectors; a copy only of a strided view
    if aug.elastic_alpha == 0:
        affine_gather(X_u8, idx, mats, out)
    else:
        elastic_gather(X_u8, idx, mats, d.field, out)


def augment_listed(X_u8: np.ndarray, idx: np.ndarray, out: np.ndarray, cnt: np.ndarray, cols: np.ndarray,
                   vals: np.ndarray, aug: Augment, seed: int, epoch: int, q0: int) -> None:
    """augment_batch for an enabled `aug`, and the batch's lit pixels listed pair by pair as kernels.nonzeros
    lists them (cnt, cols, vals: train_step's buf.nonzeros, kernels.nonzeros_bufs), in one parallel pass
    that also draws the elastic fields. X_u8 must be C-contiguous."""
    _check(X_u8, idx, out)
    if not aug.enabled or not X_u8.flags.c_contiguous:
        raise ValueError("augment_listed needs augmentation enabled and C-contiguous X_u8")
    warp_listed(X_u8, idx, seed, epoch, q0, int(aug.shift), float(aug.rotate), float(aug.scale),
                float(aug.elastic_alpha), _ringed(aug), out, cnt, cols, vals)


def augment_grid(X_u8: np.ndarray, aug: Augment, gen: np.random.Generator, n: int = 64) -> np.ndarray:
    """A uint8 picture of n cells on a k x k grid (k = ceil(sqrt(n)), 8 x 8 for n = 64): each row is one
    random training digit, its first column the original and the other columns independent augmentations."""
    if n < 1:
        raise ValueError(f"augment_grid needs n >= 1 cells, got {n}")
    k = math.isqrt(n - 1) + 1
    rows = gen.integers(0, len(X_u8), size=k)
    idx = np.repeat(rows, k)[:n].astype(np.int64)
    out = np.empty((n, P), dtype=np.float32)
    augment_batch(X_u8, idx, out, aug, int(gen.integers(2**63)), 0, 0)  # gen picks the rows and the seed
    out[::k] = LUT[X_u8[idx[::k]]]  # column 0: the original
    img = np.zeros((k * S, k * S), dtype=np.uint8)
    cells = np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8).reshape(n, S, S)
    for c in range(n):
        r, q = divmod(c, k)
        img[r * S:(r + 1) * S, q * S:(q + 1) * S] = cells[c]
    return img
