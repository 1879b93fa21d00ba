"""nn_numba/rng.py against the plain-Python uint64 reference in tests/reference.py, key by key."""

import numpy as np
import reference as ref

from nn_numba import rng


def test_uniform_and_bits_match_the_reference_at_random_keys():
    g = np.random.default_rng(0)
    for _ in range(300):
        seed, epoch, i, k = (int(v) for v in g.integers(0, [2**63, 2**31, 2**40, 300]))
        stream = int(g.integers(1, 4))
        assert int(rng.bits(seed, stream, epoch, i, k)) == ref.bits(seed, stream, epoch, i, k)
        u = rng.uniform(seed, stream, epoch, i, k)
        assert u == ref.uniform(seed, stream, epoch, i, k) and 0.0 <= u < 1.0


def test_perm_matches_the_reference_and_is_a_permutation():
    for n, seed, epoch in ((1, 0, 0), (2, 5, 1), (1000, 7, 3), (54000, 0, 12)):
        p = rng.perm(n, seed, rng.SHUFFLE, epoch)
        assert p.dtype == np.int64 and np.array_equal(np.sort(p), np.arange(n))
        assert p.tolist() == ref.perm(n, seed, ref.SHUFFLE, epoch)
    assert not np.array_equal(rng.perm(1000, 7, 2, 3), rng.perm(1000, 7, 2, 4))  # each epoch its own order


def test_split_matches_the_reference():
    for n, val_split, seed in ((60000, 0.1, 0), (1000, 0.25, 3), (100, 0.0, 1), (7, 0.5, 2)):
        tr, va = rng.split(n, val_split, seed)
        want_tr, want_va = ref.split(n, val_split, seed)
        assert tr.tolist() == want_tr and va.tolist() == want_va
    assert len(rng.split(1000, 0.0025, 0)[1]) == 3  # 2.5 rounds half up


def test_order_is_the_training_indices_permuted():
    train = np.array([3, 8, 9, 20, 21, 40], np.int64)
    o = rng.order(train, 11, 2)
    assert o.tolist() == [train[j] for j in ref.perm(len(train), 11, ref.SHUFFLE, 2)]
