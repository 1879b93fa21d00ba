"""Augmentation kernels against simple float64 NumPy references, plus determinism and the config contract."""

import gzip

import numba
import numpy as np
import pytest
import reference as ref
from conftest import ROOT

from nn_numba.augment import (
    Augment,
    affine_gather,
    affine_mats,
    apply,
    augment_batch,
    augment_grid,
    augment_listed,
    draws,
    elastic_gather,
    grid_size,
    shift_gather,
)
from nn_numba.config import from_dict, load_config
from nn_numba.errors import NNError
from nn_numba.kernels import PIXEL, nonzeros, nonzeros_bufs

S = 28


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    """Random uint8 'images' with zero runs, so edges, zero fill and sharp steps all occur."""
    rng = np.random.default_rng(1)
    X = rng.integers(0, 256, size=(40, S * S), dtype=np.uint8)
    X[rng.random(X.shape) < 0.3] = 0
    return X


@pytest.fixture(scope="module")
def digits(mnist_path) -> np.ndarray:
    """The first 512 real test digits (uint8, (512, 784)), read straight from the IDX file."""
    with gzip.open(mnist_path / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read(16 + 512 * S * S)
    return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, S * S)


@pytest.fixture(scope="module")
def edges() -> np.ndarray:
    """Sparse images whose lit pixels sit at the edges of what a sampler reads: none at all,
    one in each corner, one in the middle, a full first row, a full last column, a 2 x 2 block."""
    imgs = np.zeros((9, S, S), np.uint8)
    imgs[1, 0, 0] = imgs[2, 0, S - 1] = imgs[3, S - 1, 0] = imgs[4, S - 1, S - 1] = 255
    imgs[5, 14, 13] = 1
    imgs[6, 0, :] = 200
    imgs[7, :, S - 1] = 90
    imgs[8, 20:22, 5:7] = 255
    return imgs.reshape(-1, S * S)


def plain(X, idx):
    return (X[idx] / 255).astype(np.float32)


def warp_ref(X, idx, mats, field=None):
    """float64 reference of affine_gather / elastic_gather."""
    return np.stack([ref.warp(X[i].reshape(S, S) / 255, mats[b], None if field is None else field[b]).ravel()
                     for b, i in enumerate(idx)])


# ------------------------------------------------------------------------------------------ kernels


def test_shift_matches_roll(X):
    rng = np.random.default_rng(2)
    edges = [(0, 0), (1, -1), (-27, 27), (27, 0), (0, -27), (28, 0), (-30, 5), (3, 40)]
    rand = [tuple(v) for v in rng.integers(-6, 7, size=(24, 2))]
    dx, dy = np.array(edges + rand, dtype=np.int64).T
    idx = rng.integers(0, len(X), size=len(dx))
    out = np.full((len(idx), S * S), np.nan, np.float32)
    shift_gather(X, idx, dx, dy, out)
    for b in range(len(idx)):
        want = ref.shifted(X[idx[b]].reshape(S, S), int(dx[b]), int(dy[b])).ravel()
        np.testing.assert_array_equal(out[b], (want / 255).astype(np.float32), err_msg=f"{dx[b]=} {dy[b]=}")


def test_affine_identity_is_exact_gather(X):
    idx = np.arange(len(X))[::-1].copy()
    mats = np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (len(idx), 1, 1))
    out = np.empty((len(idx), S * S), np.float32)
    affine_gather(X, idx, mats, out)
    np.testing.assert_array_equal(out, plain(X, idx))
    # and the helper gives the identity for angle 0, scale 1, no shift
    affine_gather(X, idx, affine_mats(np.zeros(len(idx)), np.ones(len(idx)), np.zeros(len(idx)),
                                      np.zeros(len(idx))), out)
    np.testing.assert_array_equal(out, plain(X, idx))


def test_every_byte_reads_as_its_pixel_value():
    """Each of the 256 byte values becomes exactly kernels.PIXEL (the float32 quotient u8 / 255) in the warp."""
    X = np.zeros((2, S * S), np.uint8)
    X[0, :256], X[1, 300:556] = np.arange(256), np.arange(256)[::-1]
    idx = np.arange(2)
    out = np.empty((2, S * S), np.float32)
    affine_gather(X, idx, np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (2, 1, 1)), out)
    np.testing.assert_array_equal(out, PIXEL[X])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_affine_quarter_turns_equal_rot90(X, k):
    idx = np.arange(8)
    # exact inverse maps for k quarter turns counter-clockwise (np.rot90's direction)
    exact = {1: [[0, -1, 27], [1, 0, 0]], 2: [[-1, 0, 27], [0, -1, 27]], 3: [[0, 1, 0], [-1, 0, 27]]}[k]
    out = np.empty((len(idx), S * S), np.float32)
    affine_gather(X, idx, np.tile(np.array(exact, np.float32), (len(idx), 1, 1)), out)
    want = np.stack([np.rot90(X[i].reshape(S, S), k).ravel() for i in idx])
    np.testing.assert_array_equal(out, (want / 255).astype(np.float32))
    # the helper's float cos/sin are not exactly 0/1, so only nearly equal
    affine_gather(X, idx, affine_mats(np.full(8, 90.0 * k), np.ones(8), np.zeros(8), np.zeros(8)), out)
    np.testing.assert_allclose(out, want / 255, atol=1e-5)


def test_affine_matches_float64_reference(X):
    rng = np.random.default_rng(3)
    B = 16
    idx = rng.integers(0, len(X), B)
    angle = np.r_[10.0, -10.0, rng.uniform(-40, 40, B - 2)]
    scale = np.r_[1.0, 1.0, rng.uniform(0.7, 1.3, B - 2)]
    dx, dy = np.r_[0, 0, rng.integers(-3, 4, B - 2)], np.r_[0, 0, rng.integers(-3, 4, B - 2)]
    mats = affine_mats(angle, scale, dx, dy)
    out = np.empty((B, S * S), np.float32)
    affine_gather(X, idx, mats, out)
    np.testing.assert_allclose(out, warp_ref(X, idx, mats), rtol=0, atol=1e-5)


def test_affine_mats_forward_map():
    # the inverse map must send where a source point lands back to that point
    rng = np.random.default_rng(4)
    angle, scale = rng.uniform(-180, 180, 10), rng.uniform(0.5, 1.5, 10)
    dx, dy = rng.integers(-5, 6, 10), rng.integers(-5, 6, 10)
    mats = affine_mats(angle, scale, dx, dy).astype(np.float64)
    q = rng.uniform(0, 27, size=(10, 2))  # source points
    t = np.deg2rad(angle)
    # forward: counter-clockwise on screen (y down) about the centre, scaled, then shifted
    v = q - 13.5
    px = 13.5 + scale * (np.cos(t) * v[:, 0] + np.sin(t) * v[:, 1]) + dx
    py = 13.5 + scale * (-np.sin(t) * v[:, 0] + np.cos(t) * v[:, 1]) + dy
    back = np.einsum("bij,bj->bi", mats, np.stack([px, py, np.ones(10)], axis=1))
    np.testing.assert_allclose(back, q, atol=1e-4)


def test_elastic_zero_field_is_gather(X):
    idx = np.arange(len(X))
    mats = np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (len(idx), 1, 1))
    out = np.empty((len(idx), S * S), np.float32)
    elastic_gather(X, idx, mats, np.zeros((len(idx), 2, 10, 10), np.float32), out)
    np.testing.assert_array_equal(out, plain(X, idx))


def test_elastic_constant_field_is_a_shift(X):
    # a B-spline reproduces constants, so a constant displacement (-dx, -dy) is a plain shift by (dx, dy)
    idx = np.arange(len(X))
    mats = np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (len(idx), 1, 1))
    field = np.empty((len(idx), 2, 9, 9), np.float32)
    field[:, 0], field[:, 1] = 2.0, -3.0
    out = np.empty((len(idx), S * S), np.float32)
    elastic_gather(X, idx, mats, field, out)
    want = np.empty_like(out)
    shift_gather(X, idx, np.full(len(idx), -2), np.full(len(idx), 3), want)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sigma", [4.0, 9.0, 100.0, 0.5])
def test_elastic_matches_float64_reference(X, sigma):
    rng = np.random.default_rng(5)
    B = 8
    idx = rng.integers(0, len(X), B)
    aug = Augment(elastic_alpha=3.0, elastic_sigma=sigma)
    field = draws(aug, 5, 0, 0, B).field
    assert field.shape == (B, 2, grid_size(sigma) + 2, grid_size(sigma) + 2)
    assert np.abs(field).max() <= 3.0
    mats = affine_mats(rng.uniform(-20, 20, B), rng.uniform(0.8, 1.2, B), np.zeros(B), np.zeros(B))
    out = np.empty((B, S * S), np.float32)
    elastic_gather(X, idx, mats, field, out)
    np.testing.assert_allclose(out, warp_ref(X, idx, mats, field), rtol=0, atol=2e-5)


def test_elastic_changes_digits_but_keeps_their_mass(digits):
    idx = np.arange(256, dtype=np.int64)
    out = np.empty((len(idx), S * S), np.float32)
    augment_batch(digits, idx, out, Augment(elastic_alpha=2.0, elastic_sigma=4.0), 6, 0, 0)
    want = plain(digits, idx)
    changed = np.abs(out - want).sum(axis=1) / want.sum(axis=1)
    assert changed.min() > 0.05  # every digit visibly moved
    mass = out.sum(axis=1) / want.sum(axis=1)
    assert 0.98 < mass.mean() < 1.02  # on average the field neither shrinks nor grows the strokes
    assert 0.7 < mass.min() and mass.max() < 1.4  # one digit: squeezed or stretched in places


# ------------------------------------------------------------------------------------------ draws

DRAW_MODES = {"shift": Augment(shift=3), "rotate": Augment(rotate=20.0), "scale": Augment(scale=0.2),
              "elastic": Augment(elastic_alpha=2.5, elastic_sigma=6.0),
              "all": Augment(shift=2, rotate=10, scale=0.1, elastic_alpha=2.0, elastic_sigma=4)}


def _ref_draws(aug, seed, epoch, q):
    return ref.aug_draws(seed, epoch, q, shift=aug.shift, rotate=aug.rotate, scale=aug.scale,
                         alpha=aug.elastic_alpha, sigma=aug.elastic_sigma)


@pytest.mark.parametrize("mode", list(DRAW_MODES))
def test_draws_match_the_reference(mode):
    aug = DRAW_MODES[mode]
    d = draws(aug, 123, 4, 1000, 6)
    for r in range(6):
        want = _ref_draws(aug, 123, 4, 1000 + r)
        assert (d.dx[r], d.dy[r], d.angle[r], d.scale[r]) == (want["dx"], want["dy"], want["angle"], want["scale"])
        np.testing.assert_array_equal(d.field[r], want["field"])


def test_draws_depend_on_position_only_and_parts_keep_their_draws():
    aug = DRAW_MODES["all"]
    whole = draws(aug, 9, 2, 0, 10)
    tail = draws(aug, 9, 2, 4, 6)  # a resumed batch or a later one: the same sample, the same draws
    for a, b in zip(whole, tail):
        np.testing.assert_array_equal(a[4:], b)
    assert not np.array_equal(whole.field, draws(aug, 9, 3, 0, 10).field)  # each epoch its own
    alone = draws(Augment(shift=2), 9, 2, 0, 10)  # switching the other parts off moves no shift
    np.testing.assert_array_equal(alone.dx, whole.dx)
    np.testing.assert_array_equal(alone.dy, whole.dy)
    assert (alone.angle == 0).all() and (alone.scale == 1).all() and alone.field.size == 0


def test_draws_are_uniform_over_their_ranges():
    aug = Augment(shift=2, rotate=10.0, scale=0.1, elastic_alpha=2.0, elastic_sigma=9.0)
    d = draws(aug, 1, 0, 0, 5000)
    counts = np.bincount(d.dx + 2, minlength=5)
    assert len(counts) == 5 and counts.min() > 850 and counts.max() < 1150  # 1000 each expected
    assert set(np.unique(d.dy)) == {-2, -1, 0, 1, 2}
    for v, lo, hi in ((d.angle, -10, 10), (d.scale, 0.9, 1.1), (d.field, -2, 2)):
        assert lo <= v.min() and v.max() <= hi
        assert abs(v.mean() - (lo + hi) / 2) < 0.03 * (hi - lo)
        assert abs(v.std() - (hi - lo) / 12**0.5) < 0.03 * (hi - lo)


# ------------------------------------------------------------------------------------------ augment_batch

MODES = {
    "shift": Augment(shift=3),
    "affine": Augment(shift=2, rotate=15, scale=0.15),
    "elastic": Augment(elastic_alpha=2.5, elastic_sigma=5),
    "all": Augment(shift=2, rotate=10, scale=0.1, elastic_alpha=2.0, elastic_sigma=4),
}


def run(X, idx, aug, seed):
    out = np.empty((len(idx), S * S), np.float32)
    augment_batch(X, idx, out, aug, seed, 0, 0)
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_deterministic_for_seed_and_thread_count(X, mode):
    aug = MODES[mode]
    idx = np.random.default_rng(7).integers(0, len(X), 64)
    a = run(X, idx, aug, 11)
    np.testing.assert_array_equal(a, run(X, idx, aug, 11))
    assert not np.array_equal(a, run(X, idx, aug, 12))
    assert not np.array_equal(a, plain(X, idx))
    before = numba.get_num_threads()
    try:
        results = []
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            results.append(run(X, idx, aug, 11))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(results[0], a)
    np.testing.assert_array_equal(results[1], a)


LISTED = {**MODES, "default": load_config(ROOT / "configs" / "default.toml").augment}


@pytest.mark.parametrize("mode", list(LISTED))
def test_listed_pass_is_draws_apply_and_nonzeros(X, digits, edges, mode):
    """Training's one pass (augment_listed) writes draws() + apply()'s batch bit for bit, and its non-zero
    lists are kernels.nonzeros' of that batch: real digits, the random images and sparse edge cases, a
    chunk-and-a-bit and a full batch at odd positions, 1 and 2 threads."""
    aug = LISTED[mode]
    nz, want = nonzeros_bufs(128, S * S), nonzeros_bufs(128, S * S)
    before = numba.get_num_threads()
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            for data, B, q0 in ((digits, 128, 54_001), (X, 13, 7), (digits, 37, 3 * 128), (edges, 45, 11)):
                idx = np.random.default_rng(q0).integers(0, len(data), B)
                if data is edges:
                    idx = np.arange(B) % len(edges)  # each one 5 times, with 5 different distortions
                out, ref_out = np.full((B, S * S), np.nan, np.float32), np.empty((B, S * S), np.float32)
                augment_listed(data, idx, out, nz.count, nz.cols, nz.vals, aug, 21, 4, q0)
                apply(data, idx, ref_out, aug, draws(aug, 21, 4, q0, B))
                assert out.tobytes() == ref_out.tobytes(), f"{mode}, {n} threads, batch at {q0}"
                nonzeros(ref_out, want.count, want.cols, want.vals)
                nq = (B + 1) // 2  # pairs of samples (kernels.Nonzeros)
                np.testing.assert_array_equal(nz.count[:nq], want.count[:nq])
                for q in range(nq):
                    c = want.count[q]
                    np.testing.assert_array_equal(nz.cols[q, :c], want.cols[q, :c])
                    assert nz.vals[2 * q:2 * q + 2, :c].tobytes() == want.vals[2 * q:2 * q + 2, :c].tobytes()
    finally:
        numba.set_num_threads(before)


def test_all_zero_config_is_plain_gather(X):
    aug = Augment()
    assert not aug.enabled
    idx = np.random.default_rng(8).integers(0, len(X), 100)
    out = run(X, idx, aug, 0)
    np.testing.assert_array_equal(out, plain(X, idx))


def test_shift_mode_draws_shifts_within_range(X):
    idx = np.random.default_rng(9).integers(0, len(X), 50)
    out = run(X, idx, Augment(shift=2), 13)
    seen = set()
    for b, i in enumerate(idx):
        img = X[i].reshape(S, S)
        hits = [(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)
                if np.array_equal(out[b], (ref.shifted(img, dx, dy).ravel() / 255).astype(np.float32))]
        assert hits, f"sample {b} is not a shift of its source by at most 2 pixels"
        seen.update(hits)
    assert len(seen) > 10  # and the shifts do vary


def test_last_smaller_batch_writes_only_its_rows(X):
    buf = np.full((32, S * S), -1.0, np.float32)
    idx = np.arange(5, dtype=np.int64)
    augment_batch(X, idx, buf[:5], MODES["all"], 0, 0, 0)
    assert (buf[:5] >= 0).all() and (buf[5:] == -1).all()


def test_bad_arguments_are_refused(X):
    out = np.empty((4, S * S), np.float32)
    aug = MODES["all"]
    with pytest.raises(ValueError, match="idx out of range"):
        augment_batch(X, np.array([0, 1, 2, len(X)]), out, aug, 0, 0, 0)
    with pytest.raises(ValueError, match="idx must be int64"):
        augment_batch(X, np.arange(4, dtype=np.int32), out, aug, 0, 0, 0)
    with pytest.raises(ValueError, match="out must be"):
        augment_batch(X, np.arange(3), out, aug, 0, 0, 0)
    with pytest.raises(ValueError, match="X_u8 must be uint8"):
        augment_batch(X.astype(np.float32), np.arange(4), out, aug, 0, 0, 0)


@pytest.mark.parametrize("kw, key", [
    (dict(shift=-1), r"\[augment\] shift"), (dict(shift=1.5), r"\[augment\] shift"),
    (dict(rotate=float("nan")), r"\[augment\] rotate"),
    (dict(scale=1.0), r"\[augment\] scale"), (dict(elastic_alpha=-2.0), r"\[augment\] elastic_alpha"),
    (dict(elastic_sigma=0.0), r"\[augment\] elastic_sigma"),
])
def test_bad_config_values_raise_nnerror(kw, key):
    """The one validator of [augment] is the config's."""
    with pytest.raises(NNError, match=key):
        from_dict({"augment": kw})


def test_augment_grid(X):
    img = augment_grid(X, Augment(), np.random.default_rng(0))
    assert img.shape == (8 * S, 8 * S) and img.dtype == np.uint8
    # without augmentation every cell of a row is the same digit, exactly
    cells = img.reshape(8, S, 8, S).transpose(0, 2, 1, 3)
    for r in range(8):
        assert any(np.array_equal(cells[r, 0].ravel(), x) for x in X)
        for c in range(1, 8):
            np.testing.assert_array_equal(cells[r, c], cells[r, 0])
    img = augment_grid(X, MODES["all"], np.random.default_rng(0), n=20)
    assert img.shape == (5 * S, 5 * S)
    cells = img.reshape(5, S, 5, S).transpose(0, 2, 1, 3).reshape(25, S, S)
    assert not np.array_equal(cells[1], cells[0])  # augmented next to its original
    assert (cells[20:] == 0).all()  # cells beyond n stay black
