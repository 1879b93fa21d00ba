"""Every kernel against the float64 NumPy reference, a finite-difference check, and one whole step."""

import contextlib

import numba
import numpy as np
import pytest
import reference as ref

from nn_numba import kernels as K
from nn_numba.model import MLP, n_params
from nn_numba.optim import plain


def rel(a, b):
    """Largest error relative to the largest reference value."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


# (B, K, N): below one 6x16 tile, exactly one, ragged edges that overlap the previous tile in rows and
# leave 1-15 masked columns, and the real layer shapes.
@pytest.fixture(params=[(1, 7, 5), (4, 8, 4), (6, 16, 6), (7, 25, 13), (12, 40, 11), (5, 33, 7), (11, 9, 2),
                        (37, 784, 250), (64, 250, 250), (13, 250, 10)],
                ids=lambda s: "x".join(map(str, s)))
def shapes(request):
    return request.param


def _forward(transposed, X, W, WT, b, Y, relu=True):
    """linear_forward, or linear_forward_t with WT its scratch for Wᵀ."""
    if transposed:
        K.linear_forward_t(X, W, WT, b, Y, relu)
    else:
        K.linear_forward(X, W, b, Y, relu)


@pytest.mark.parametrize("transposed", [False, True], ids=["dot", "over_WT"])
def test_linear_forward(shapes, transposed):
    """Both forward products; linear_forward_t also leaves Wᵀ in WT, zeros up to the next LANES columns (the
    NaN in the rest of WT is never used)."""
    B, Kin, N = shapes
    rng = np.random.default_rng(1)
    X = rng.standard_normal((B, Kin), dtype=np.float32)
    W = rng.standard_normal((N, Kin), dtype=np.float32)
    b = rng.standard_normal(N, dtype=np.float32)
    want = X.astype(np.float64) @ W.T.astype(np.float64) + b
    for relu in (False, True):
        Y = np.full((B, N), np.nan, np.float32)
        WT = np.full((Kin, K.pad(N)), np.nan, np.float32)
        _forward(transposed, X, W, WT, b, Y, relu)
        assert rel(Y, np.maximum(want, 0) if relu else want) < 1e-5
        if transposed:
            n = -(-N // K.LANES) * K.LANES
            assert np.array_equal(WT[:, :N], W.T) and not WT[:, N:n].any()


def test_linear_backward_input(shapes):
    B, Kin, N = shapes
    rng = np.random.default_rng(2)
    dY = rng.standard_normal((B, N), dtype=np.float32)
    W = rng.standard_normal((N, Kin), dtype=np.float32)
    A = np.maximum(rng.standard_normal((B, Kin), dtype=np.float32), 0)
    dX = np.full((B, Kin), np.nan, np.float32)
    K.linear_backward_input(dY, W, A, dX)
    assert rel(dX, (dY.astype(np.float64) @ W) * (A > 0)) < 1e-5


@pytest.mark.parametrize("padded", [False, True], ids=["rows", "padded_rows"])
def test_linear_backward_weight_and_sgd(shapes, padded):
    """Also with A's rows padded, as the trainer's activations are (with 16 lanes the wide tile then reads
    the padding, here NaN, and must step only the columns that exist)."""
    B, Kin, N = shapes
    rng = np.random.default_rng(3)
    dY = rng.standard_normal((B, N), dtype=np.float32)
    A = rng.standard_normal((B, Kin), dtype=np.float32)
    if padded:
        A = np.pad(A, ((0, 0), (0, K.pad(Kin) - Kin)), constant_values=np.nan)[:, :Kin]
    W = rng.standard_normal((N, Kin), dtype=np.float32)
    b = rng.standard_normal(N, dtype=np.float32)
    W0, b0 = W.astype(np.float64), b.astype(np.float64)
    gW = np.full((N, Kin), np.nan, np.float32)
    gb = np.full(N, np.nan, np.float32)
    z2, z1 = np.zeros_like(W), np.zeros_like(b)
    ws = np.full(K.work_size(N, B), np.nan, np.float32)  # padding lanes must not leak into the result
    want_gW = dY.T.astype(np.float64) @ A
    want_gb = dY.sum(axis=0, dtype=np.float64)
    # NO_UPDATE: the gradients only, weights untouched
    K.linear_backward_weight(dY, A, ws, K.Param(W, gW, z2, z2.copy()), K.Param(b, gb, z1, z1.copy()),
                             plain(K.NO_UPDATE, 0.01, weight_decay=0.1))
    assert rel(gW, want_gW) < 1e-5
    assert rel(gb, want_gb) < 1e-5
    assert np.array_equal(W, W0.astype(np.float32)) and np.array_equal(b, b0.astype(np.float32))
    # SGD: the same gradient applied in the fused step; gW itself is not written
    gW[:] = np.nan
    gb[:] = np.nan
    K.linear_backward_weight(dY, A, ws, K.Param(W, gW, z2, z2.copy()), K.Param(b, gb, z1, z1.copy()),
                             plain(K.SGD, 0.01, weight_decay=0.1))
    assert np.isnan(gW).all()
    assert rel(gb, want_gb) < 1e-5
    ref.Optimizer("sgd", 0.01, wd=0.1).step([W0, b0], [want_gW, want_gb], [True, False])  # decay on W only
    assert rel(W, W0) < 1e-5
    assert rel(b, b0) < 1e-5


@pytest.mark.parametrize("n", [37, 2 * 1024 + 37])  # one ragged block; whole blocks of `update` and a ragged one
@pytest.mark.parametrize("kind,nesterov", [("momentum", False), ("momentum", True), ("adam", False)])
def test_update_matches_reference_over_steps(kind, nesterov, n):
    rng = np.random.default_rng(4)
    p = rng.standard_normal(n, dtype=np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    opt = ref.Optimizer(kind, 0.05, momentum=0.9, nesterov=nesterov, wd=0.01)
    p64 = p.astype(np.float64)
    code = {"momentum": K.MOMENTUM, "adam": K.ADAM}[kind]
    for t in range(1, 6):
        g = rng.standard_normal(n, dtype=np.float32)
        K.update(K.Param(p, g, m, v), plain(code, 0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.01,
                                            inv_bias1=1 / (1 - 0.9**t), inv_bias2=1 / (1 - 0.999**t)))
        opt.step([p64], [g.astype(np.float64)], [True])
    assert rel(p, p64) < 1e-5


@pytest.mark.parametrize("scale", [1.0, 1 / 13])
def test_softmax_xent(scale):
    rng = np.random.default_rng(5)
    Z = rng.standard_normal((13, 10), dtype=np.float32) * 5
    Z[0, 3] = 80.0  # large logits must not overflow
    y = rng.integers(0, 10, 13)
    dZ = np.empty_like(Z)
    loss = np.empty(13, np.float32)
    pred = np.empty(13, np.int64)
    K.softmax_xent(Z, y, dZ, loss, pred, scale)
    mean, want = ref.loss_and_grad(Z.astype(np.float64), y, "sum")
    assert abs(loss.astype(np.float64).mean() - mean) < 1e-5 * max(1, abs(mean))
    assert rel(dZ, want * scale) < 1e-5
    assert (pred == Z.argmax(axis=1)).all()


def test_gather_is_exact_division():
    rng = np.random.default_rng(6)
    X = rng.integers(0, 256, (50, 784), dtype=np.uint8)
    idx = rng.integers(0, 50, 17).astype(np.int64)
    out = np.empty((17, 784), np.float32)
    K.gather(X, idx, K.PIXEL, out)
    assert np.array_equal(out, X[idx].astype(np.float32) / np.float32(255))


def test_gather_nonzeros_reads_every_byte_as_pixel():
    """Each of the 256 byte values becomes exactly PIXEL (the float32 quotient u8 / 255), in both rows of a pair."""
    X = np.zeros((3, 784), np.uint8)
    X[0, :256], X[1, 400:656], X[2, 500:756] = np.arange(256), np.arange(256)[::-1], np.arange(256)
    idx = np.arange(3, dtype=np.int64)
    out = np.empty((3, 784), np.float32)
    K.gather_nonzeros(X, idx, out, *K.nonzeros_bufs(3, 784)[:3])
    assert np.array_equal(out, K.PIXEL[X])


def _setup(sizes, B, seed=0, density=1.0):
    """A model with non-zero biases and a batch whose pixels are non-zero with probability `density`
    (MNIST: 0.19, which train_step's first layer takes by its sparse path; 1.0 takes the dense one)."""
    rng = np.random.default_rng(seed)
    model = MLP.init(sizes, rng)
    model.params += rng.standard_normal(model.params.size).astype(np.float32) * 0.01  # non-zero biases
    X = rng.random((B, sizes[0]), dtype=np.float32)
    X[rng.random(X.shape) >= density] = 0
    y = rng.integers(0, sizes[-1], B).astype(np.int64)
    return model, X, y


def _step(model, X, y, kind, lr, reduction, wd=0.0, nesterov=False, eps=1e-8):
    from nn_numba.config import from_dict
    from nn_numba.trainer import Trainer

    cfg = from_dict({"optim": {"name": kind, "lr": lr, "reduction": reduction, "weight_decay": wd,
                               "nesterov": nesterov, "eps": eps}})
    tr = Trainer(cfg, model, len(y))
    return tr, tr.train_step(X, y, lr)


def _near_kink(model, X, y, opt, reduction, steps=2, margin=1e-6):
    """True when a hidden pre-activation of the reference comes within `margin` of 0 in one of `steps`
    steps: float32 may then put it on the other side, and that unit's whole gradient row differs (seen:
    a pre-activation of 2e-7 in float64, -2e-8 in float32), which says nothing about the kernels."""
    import copy

    Ws = [W.astype(np.float64) for W in model.weights]
    bs = [b.astype(np.float64) for b in model.biases]
    opt = copy.deepcopy(opt)
    for _ in range(steps):
        A = X.astype(np.float64)
        for W, b in zip(Ws[:-1], bs[:-1]):
            Z = A @ W.T + b
            if np.abs(Z).min() < margin:
                return True
            A = np.maximum(Z, 0)
        ref.step(Ws, bs, X, y, opt, reduction)
    return False


@pytest.mark.parametrize("kind,reduction,wd", [("sgd", "sum", 0.0), ("momentum", "mean", 1e-3),
                                               ("adam", "mean", 1e-2)])
@pytest.mark.parametrize("sizes,B", [([784, 250, 250, 10], 64), ([784, 250, 250, 10], 37), ([784, 30, 20, 17, 10], 5),
                                     ([784, 70, 10], 13), ([784, 10], 8)])
@pytest.mark.parametrize("density", [0.2, 1.0])
def test_train_step_against_reference(sizes, B, kind, reduction, wd, density):
    """Two full training steps (forward, loss, backward, optimiser) against the float64 reference.

    Adam divides each gradient by its own magnitude, so a weight whose gradient is ~0 moves by ±lr on
    float32 rounding noise alone; a larger eps keeps that comparison well-conditioned.
    """
    eps = 1e-3 if kind == "adam" else 1e-8
    opt = ref.Optimizer(kind, 0.01, momentum=0.9, wd=wd, eps=eps)
    for seed in range(10):  # the first data whose ReLUs all stay clear of float32 noise (see _near_kink)
        model, X, y = _setup(sizes, B, seed=seed, density=density)
        if not _near_kink(model, X, y, opt, reduction):
            break
    Ws = [W.astype(np.float64) for W in model.weights]
    bs = [b.astype(np.float64) for b in model.biases]
    tr, loss = _step(model, X, y, kind, 0.01, reduction, wd, eps=eps)
    want_loss = ref.step(Ws, bs, X, y, opt, reduction)
    assert abs(loss / B - want_loss) < 1e-5 * max(1, want_loss)
    loss2 = tr.train_step(X, y, 0.01)
    want2 = ref.step(Ws, bs, X, y, opt, reduction)
    assert abs(loss2 / B - want2) < 1e-5 * max(1, want2)
    tr.sync()
    # Adam's biases: each moves by about ±lr·(1 - noise/eps) whatever its gradient's size, so float32 noise
    # in the gradients (a first layer that sums 784 products in one chain) shows up to 1.2e-5 here
    tol_b = 3e-5 if kind == "adam" else 1e-5
    for l in range(len(sizes) - 1):
        W, b = model.layer(l)
        assert rel(W, Ws[l]) < 1e-5
        assert rel(b, bs[l]) < tol_b


@pytest.mark.parametrize("density", [0.2, 1.0])
def test_gradients_against_reference(density):
    model, X, y = _setup([784, 250, 250, 10], 37, density=density)
    _, gW, gb = ref.gradients([W.astype(np.float64) for W in model.weights], model.biases, X, y, "mean")
    before = model.params.copy()
    from nn_numba.config import from_dict
    from nn_numba.trainer import Trainer

    tr = Trainer(from_dict({"optim": {"reduction": "mean"}}), model, 37)
    tr.train_step(X, y, 0.1, update=False)
    tr.sync()
    assert np.array_equal(model.params, before)  # NO_UPDATE leaves the weights alone
    for l in range(3):
        g_W, g_b = K.layer_views(tr.state.flat.grad, model.sizes_arr, l)
        assert rel(g_W, gW[l]) < 1e-5
        assert rel(g_b, gb[l]) < 1e-5


def test_finite_differences_tiny_network():
    """The kernels' gradient against central differences of the float64 loss on a tiny network."""
    sizes = [784, 6, 5, 10]
    model, X, y = _setup(sizes, 4, seed=7)
    from nn_numba.config import from_dict
    from nn_numba.trainer import Trainer

    tr = Trainer(from_dict({"optim": {"reduction": "mean"}}), model, 4)
    tr.train_step(X, y, 0.0, update=False)
    tr.sync()
    p0 = model.params.astype(np.float64)

    def loss_at(p):
        Ws, bs = [], []
        off = 0
        for l in range(len(sizes) - 1):
            n_in, n_out = sizes[l], sizes[l + 1]
            Ws.append(p[off:off + n_in * n_out].reshape(n_out, n_in))
            bs.append(p[off + n_in * n_out:off + n_in * n_out + n_out])
            off += n_in * n_out + n_out
        return ref.loss_and_grad(ref.forward(Ws, bs, X)[-1], y)[0]

    rng = np.random.default_rng(0)
    check = rng.choice(n_params(sizes), 60, replace=False)
    h = 1e-6
    for i in check:
        e = np.zeros_like(p0)
        e[i] = h
        fd = (loss_at(p0 + e) - loss_at(p0 - e)) / (2 * h)
        assert abs(fd - tr.state.flat.grad[i]) < 1e-4 * max(1.0, abs(fd)), i


@pytest.mark.parametrize("density", [0.2, 1.0])
def test_same_result_for_any_thread_count(density):
    """Every output element has one owner and a fixed summation order: bits do not depend on threads."""
    results = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        model, X, y = _setup([784, 250, 250, 10], 64, density=density)
        tr, _ = _step(model, X, y, "adam", 1e-3, "mean")
        tr.train_step(X, y, 1e-3)
        results.append(tr.sync().params.copy())
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert np.array_equal(results[0], results[1])


_STEPS = """
import hashlib, numpy as np
from nn_numba.config import from_dict
from nn_numba.model import MLP
from nn_numba.trainer import Trainer
rng = np.random.default_rng(0)
X = rng.random((37, 784), dtype=np.float32)
X[:, ::3] = 0  # 67 % non-zero: the dense first layer; the second batch (19 %) takes the sparse one
y = rng.integers(0, 10, 37)
tr = Trainer(from_dict({"optim": {"name": "adam", "reduction": "mean"}}), MLP.init([784, 250, 250, 10], rng), 37)
for _ in range(2):
    tr.train_step(X, y, 1e-3)
    tr.train_step(X * (rng.random(X.shape) < 0.3), y, 1e-3)
print(hashlib.sha256(tr.sync().params.tobytes() + tr.state.first_t.m.tobytes() + tr.state.flat.v.tobytes()).hexdigest())
"""


def test_same_result_compiled_fresh_or_loaded_from_cache(tmp_path):
    """A first run compiles the kernels, later runs load them from the cache: the weights must not differ.
    (They did once, in the last bit of gb, while fastmath let LLVM reorder explicit vector sums.)"""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    run = [subprocess.run([sys.executable, "-c", _STEPS], env=env, capture_output=True, text=True, check=True)
           for _ in range(2)]
    assert any(tmp_path.rglob("*.nbi"))  # the first run did fill the cache
    assert run[0].stdout == run[1].stdout


def test_same_result_on_three_threads():
    """Each thread's tasks are a band of an output's rows (kernels.py, `_banded`); with 3 threads the bands
    of the 37 samples' 7 row blocks and of their 19 pairs are ragged (3, 3, 1 and 7, 7, 5): the weights and
    moments must still be those of one thread, bit for bit."""
    import os
    import subprocess
    import sys

    out = [subprocess.run([sys.executable, "-c", _STEPS], env={**os.environ, "NUMBA_NUM_THREADS": n},
                          capture_output=True, text=True, check=True).stdout for n in ("1", "3")]
    assert out[0] == out[1] and len(out[0]) == 65


def test_forward_logits_match_reference():
    model, X, _ = _setup([784, 250, 250, 10], 2500)
    want = ref.forward([W.astype(np.float64) for W in model.weights], model.biases, X)[-1]
    assert rel(model.logits(X, chunk=1000), want) < 1e-5  # also crosses chunk boundaries (2500 = 2.5 chunks)
    p = model.predict_proba(X)
    assert np.allclose(p.sum(axis=1), 1, atol=1e-5)


def test_logits_follow_the_weights_through_reused_buffers():
    """logits keeps its views into the weights and buffers between calls: after the weights change in place
    or are replaced, and across batch sizes and chunkings (more than it keeps at once), they are still the
    reference's logits of the weights of the moment."""
    model, X, _ = _setup([784, 250, 250, 10], 40)
    rng = np.random.default_rng(5)

    def check():
        want = ref.forward([W.astype(np.float64) for W in model.weights], model.biases, X)[-1]
        few = [(1, 1000), (40, 1000), (40, 16), (7, 3), (3, 1000), (1, 1000)]
        for n, chunk in few + [(n, 1000) for n in range(9, 20)] + few:  # the last views made stay for the next check
            assert rel(model.logits(X[:n], chunk=chunk), want[:n]) < 1e-5, (n, chunk)

    check()
    model.params *= np.float32(0.5)  # in place
    model.params[-10:] = rng.standard_normal(10)
    check()
    model.params = model.params + np.float32(0.01) * rng.standard_normal(model.params.size).astype(np.float32)
    check()


def test_huge_zeros_are_zeroed_aligned_and_disjoint():
    """huge_zeros carves each array 64-byte aligned (the first on a huge-page boundary) with its shape and
    dtype, zeroed, and no two overlap: each keeps what was written to it after all were written."""
    specs = [((3, 5), np.float32), ((7,), np.int64), ((2, 17), np.int32), ((1,), np.float32), ((65, 3), np.float32)]
    arrays = K.huge_zeros(specs)
    assert arrays[0].ctypes.data % K.HUGE == 0
    for a, (shape, dtype) in zip(arrays, specs):
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
        assert a.ctypes.data % 64 == 0 and not a.any()
    for i, a in enumerate(arrays):
        a[...] = i + 1
    assert [np.unique(a).tolist() for a in arrays] == [[i + 1] for i in range(len(arrays))]


@contextlib.contextmanager
def numba_threads(n):
    """Run the block with n Numba threads (skipped where Numba cannot run that many)."""
    if n > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"needs {n} Numba threads, NUMBA_NUM_THREADS is {numba.config.NUMBA_NUM_THREADS}")
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _block_lists(nz):
    """Each block's list as nonzero_blocks leaves it, its bands joined in order: (samples, their 3 pixels)."""
    S, bs = nz.block_bands
    out = []
    for kb in range(nz.block_vals.shape[0]):
        p = np.concatenate([s * bs + np.arange(nz.block_count[s, kb]) for s in range(S)]).astype(np.int64)
        out.append((nz.block_samples[kb, 4 * p + 3], nz.block_vals[kb].reshape(-1, 4)[p, :3]))
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("K_in", [784, 787, 5])
def test_nonzeros_rows_and_blocks_match_numpy(K_in, threads):
    """The pair lists and the lit blocks of the first layer's sparse path list exactly X's non-zeros, in
    order: an all-zero sample, a dense one, an odd count of samples, ragged widths (K % 8, K % 6 != 0), a
    pixel lit nowhere, a block lit only by its last pixel; each block's samples in sample order with their
    pixels, whether one thread or two list them, in one band or two."""
    rng = np.random.default_rng(3)
    B = 23
    X = rng.random((B, K_in), dtype=np.float32)
    X[rng.random(X.shape) < 0.8] = 0
    X[4] = 0
    X[7] = rng.random(K_in, dtype=np.float32) + 0.1
    X[:, 0] = 0
    X[:, 3:6] = 0
    X[9, 5 % K_in] = 1.0
    X[:, -1] = 0.5  # the last block is lit in every sample: each band's list fills it
    nz = K.nonzeros_bufs(B, K_in)
    cnt, cols, vals = nz.count, nz.cols, nz.vals
    nz.block_count[:] = -1
    nz.block_vals[:] = np.nan
    K.nonzeros(X, cnt, cols, vals)
    with numba_threads(threads):
        K.nonzero_blocks(X, nz.block_count, nz.block_vals, nz.block_bands)
    assert list(nz.block_bands) == ([1, 23] if threads == 1 else [2, 12])
    Xq = np.zeros((B + 1, K_in), np.float32)  # the odd last sample is paired with zeros
    Xq[:B] = X
    for q in range((B + 1) // 2):
        (want,) = np.nonzero((Xq[2 * q] != 0) | (Xq[2 * q + 1] != 0))
        assert cnt[q] == len(want) and np.array_equal(cols[q, :cnt[q]], want)
        assert np.array_equal(vals[2 * q:2 * q + 2, :cnt[q]], Xq[2 * q:2 * q + 2, want])
    Xp = np.zeros((B, 3 * nz.block_vals.shape[0]), np.float32)
    Xp[:, :K_in] = X
    lists = _block_lists(nz)
    for kb, (samples, pixels) in enumerate(lists):
        (want,) = np.nonzero(Xp[:, 3 * kb:3 * kb + 3].any(axis=1))
        assert samples.tolist() == want.tolist()
        assert pixels.view(np.int32).tolist() == Xp[want, 3 * kb:3 * kb + 3].view(np.int32).tolist()
    assert lists[1][0].tolist() == [9] or K_in < 6


@pytest.mark.parametrize("N", [250, 10, 70])
@pytest.mark.parametrize("relu", [True, False])
def test_sparse_forward_against_reference(N, relu):
    """The first layer's sparse forward product (transposed weights, X's non-zeros) against float64."""
    rng = np.random.default_rng(4)
    B, K_in = 37, 784
    X = rng.random((B, K_in), dtype=np.float32)
    X[rng.random(X.shape) < 0.8] = 0
    W = rng.standard_normal((N, K_in)).astype(np.float32) * 0.05
    b = rng.standard_normal(N).astype(np.float32)
    WT = K.aligned_zeros((K_in, K.pad(N)))
    WT[:, :N] = W.T
    want = X.astype(np.float64) @ W.T.astype(np.float64) + b
    want = np.maximum(want, 0) if relu else want
    cnt, cols, vals, *_ = K.nonzeros_bufs(B, K_in)
    K.nonzeros(X, cnt, cols, vals)
    buf = K.aligned_zeros((B, K.pad(N)))
    K.sparse_forward(cnt, cols, vals, WT, b, buf[:, :N], relu)
    assert rel(buf[:, :N], want) < 1e-5
    assert not buf[:, N:].any()  # nothing stored past the row's N outputs


def test_first_layer_moves_between_paths():
    """A dense batch after sparse ones (and back) trains the same weights: the first layer moves between
    its transposed and its (out, in) copy, and both paths agree with the float64 reference."""
    sizes, B = [784, 40, 10], 12
    model, X, y = _setup(sizes, B, density=0.2)
    Ws = [W.astype(np.float64) for W in model.weights]
    bs = [b.astype(np.float64) for b in model.biases]
    opt = ref.Optimizer("momentum", 0.01, momentum=0.9)
    tr, _ = _step(model, X, y, "momentum", 0.01, "mean")
    ref.step(Ws, bs, X, y, opt, "mean")
    Xd = np.random.default_rng(9).random((B, 784), dtype=np.float32)
    for x, path in ((Xd, 0), (X, 1), (Xd, 0)):
        tr.train_step(x, y, 0.01)
        ref.step(Ws, bs, x, y, opt, "mean")
        assert tr.state.first_is_t[0] == path
    tr.sync()
    for l in range(2):
        assert rel(model.layer(l)[0], Ws[l]) < 1e-5
        assert rel(model.layer(l)[1], bs[l]) < 1e-5


def test_gather_with_nonzeros_is_gather_then_nonzeros():
    """Trainer.gather (one pass: pixels and their non-zeros) then train_step(listed=True) is bit for bit
    gather, then train_step listing the non-zeros itself; also for a width that is not a multiple of the
    vector's."""
    from nn_numba.config import from_dict
    from nn_numba.trainer import Trainer

    rng = np.random.default_rng(5)
    X_u8 = rng.integers(0, 256, (300, 784), dtype=np.uint8)
    X_u8[rng.random(X_u8.shape) < 0.8] = 0
    X_u8[:, 100:116] = 0  # whole zero blocks in every sample
    X_u8[3] = 0
    y = rng.integers(0, 10, 300).astype(np.int64)
    idx = rng.permutation(300)[:64].astype(np.int64)
    cfg = from_dict({"optim": {"name": "adam", "reduction": "mean"}})
    a = Trainer(cfg, MLP.init([784, 50, 10], np.random.default_rng(0)), 64)
    b = Trainer(cfg, MLP.init([784, 50, 10], np.random.default_rng(0)), 64)
    xa = a.gather(X_u8, idx)
    xb = b.xb[:64]
    K.gather(X_u8, idx, K.PIXEL, xb)
    assert np.array_equal(xa, xb)
    cnt, cols, vals = K.nonzeros_bufs(64, 784)[:3]
    K.nonzeros(xb, cnt, cols, vals)
    assert np.array_equal(a.buf.nonzeros.count, cnt)
    for q in range(32):
        assert np.array_equal(a.buf.nonzeros.cols[q, :cnt[q]], cols[q, :cnt[q]])
        assert np.array_equal(a.buf.nonzeros.vals[2 * q:2 * q + 2, :cnt[q]], vals[2 * q:2 * q + 2, :cnt[q]])
    for _ in range(2):
        a.train_step(a.gather(X_u8, idx), y[idx], 1e-3, listed=True)
        K.gather(X_u8, idx, K.PIXEL, b.xb[:64])
        b.train_step(b.xb[:64], y[idx], 1e-3)
    assert np.array_equal(a.sync().params, b.sync().params)
    c = Trainer(cfg, MLP.init([780, 50, 10], np.random.default_rng(0)), 64)
    odd = np.ascontiguousarray(X_u8[:, :780])  # the last vector holds 780 % W pixels
    for B in (64, 63):  # an odd batch: its last sample is paired with zeros
        nz = c.buf.nonzeros
        nz.vals[:] = np.nan
        x = np.zeros((B + 1, 780), np.float32)
        x[:B] = c.gather(odd, idx[:B])
        assert np.array_equal(x[:B], odd[idx[:B]] / np.float32(255))
        for q in range((B + 1) // 2):
            (want,) = np.nonzero((x[2 * q] != 0) | (x[2 * q + 1] != 0))
            assert nz.count[q] == len(want) and np.array_equal(nz.cols[q, :nz.count[q]], want)
            assert np.array_equal(nz.vals[2 * q:2 * q + 2, :nz.count[q]], x[2 * q:2 * q + 2, want])


@pytest.mark.parametrize("transposed", [False, True], ids=["dot", "axpy"])
def test_a_samples_outputs_do_not_depend_on_the_batch(transposed):
    """linear_forward and linear_forward_t give a sample's outputs the same bits in a batch of one, in any
    batch and at any position (the ragged edges included), and for a layer of any width (fewer than six
    outputs too)."""
    rng = np.random.default_rng(8)
    for K_in, N in ((784, 250), (250, 10), (37, 5), (9, 1)):
        X = rng.standard_normal((13, K_in), dtype=np.float32)
        W = rng.standard_normal((N, K_in), dtype=np.float32)
        b = rng.standard_normal(N, dtype=np.float32)
        WT = np.zeros((K_in, K.pad(N)), np.float32)
        one = np.empty((1, N), np.float32)
        alone = []
        for i in range(13):
            _forward(transposed, X[i:i + 1], W, WT, b, one)
            alone.append(one[0].copy())
        for B in (2, 3, 7, 13):
            Y = np.full((B, N), np.nan, np.float32)
            _forward(transposed, X[13 - B:], W, WT, b, Y)
            assert Y.tobytes() == np.array(alone[13 - B:]).tobytes(), (K_in, N, B)
