"""The counter-based random numbers of docs/training.md ("Random numbers"), shared with nn-cpp.

Every random choice of training except the initial weights is a pure function of (seed, stream, epoch,
i, k): the split, each epoch's shuffle and each sample's augmentation draws. Both trainers therefore see
the same batches, and a resume (in either language, mid-epoch or not) needs only (epoch, batch).

All integer arithmetic is on uint64 modulo 2^64. In Numba every operand must be np.uint64: an int64 mixed
with a uint64 silently becomes float64. No fastmath here: the float64 steps must round as the contract says.
"""

import math

import numpy as np
from numba import njit
from numba.extending import register_jitable

from . import jitcache

jitcache.use()  # before the first @njit(cache=True), as in kernels.py

SPLIT, SHUFFLE, AUGMENT = 1, 2, 3  # the streams

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_ONE = np.uint64(1)
_ULP = 2.0**-53


@njit(cache=True)
def mix(z):
    """The splitmix64 finaliser: a bijection of uint64 that scrambles every input bit into every output bit."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True)
def key(seed, stream, epoch):
    """The part of the hash shared by every draw of one (seed, stream, epoch): hoisted out of the loops."""
    a = mix(np.uint64(seed))
    a = mix(a ^ np.uint64(stream))
    return mix(a + np.uint64(epoch))


@njit(cache=True)
def sample_key(a, i):
    """key(...) extended by the counter i (a sample's position, or a permutation's index)."""
    return mix(a + np.uint64(i))


@register_jitable
def draw_bits(b, k):
    """The 64 random bits of draw k of sample_key b. For compiled code (from Python: `bits`); register_jitable,
    not njit, so that each constant k a caller passes (draw(b, 0), draw(b, 1), ...) is not a compile of
    its own."""
    return mix(b + _GOLDEN * (np.uint64(k) + _ONE))


@register_jitable
def draw(b, k):
    """Uniform float64 in [0, 1), exactly a multiple of 2^-53, for draw k of sample_key b. For compiled
    code, as draw_bits (from Python: `uniform`)."""
    return np.float64(draw_bits(b, k) >> _S11) * _ULP


@njit(cache=True)
def bits(seed, stream, epoch, i, k):
    """bits(seed, stream, epoch, i, k) of docs/training.md."""
    return draw_bits(sample_key(key(seed, stream, epoch), i), k)


@njit(cache=True)
def uniform(seed, stream, epoch, i, k):
    """uniform(seed, stream, epoch, i, k) of docs/training.md."""
    return draw(sample_key(key(seed, stream, epoch), i), k)


@njit(cache=True)
def perm(n, seed, stream, epoch):
    """A permutation of 0 .. n-1 (int64): Fisher-Yates from the top, j = floor(uniform(.., i, 0) * (i + 1))."""
    p = np.arange(n)
    a = key(seed, stream, epoch)
    for i in range(n - 1, 0, -1):
        j = np.int64(draw(sample_key(a, i), 0) * np.float64(i + 1))  # >= 0: truncation is floor
        p[i], p[j] = p[j], p[i]
    return p


def split(n: int, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices (sorted int64): the validation set is the tail of perm(n, seed, 1, 0),
    n_val = floor(n * val_split + 0.5)."""
    p = perm(n, seed, SPLIT, 0)
    k = n - n_val(n, val_split)
    return np.sort(p[:k]), np.sort(p[k:])


def n_val(n: int, val_split: float) -> int:
    """The size of the validation split of n samples: floor(n * val_split + 0.5)."""
    return math.floor(n * val_split + 0.5)


def order(train: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s (from 0) visiting order of the training indices: train[perm(len(train), seed, 2, epoch)]."""
    return train[perm(len(train), seed, SHUFFLE, epoch)]
