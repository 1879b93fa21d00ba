"""nn_numba against the shared test vectors (tests/vectors/vectors.json, also read by cpp/tests/test_vectors.cpp):
the kernels (forward, loss, gradients, two steps of every optimiser), the learning-rate schedule, the
counter-based random numbers and the augmentation. The file itself must be what its generator writes
from tests/reference.py today."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from nn_numba import kernels as K
from nn_numba import rng
from nn_numba.augment import Augment, Draws, apply, draws
from nn_numba.config import from_dict
from nn_numba.model import MLP
from nn_numba.schedule import lr_at, warmup_steps
from nn_numba.trainer import Trainer

HERE = Path(__file__).resolve().parent / "vectors"
V = json.loads((HERE / "vectors.json").read_text())
NET = V["network"]


def test_the_file_is_what_the_generator_writes():
    sys.path.insert(0, str(HERE))
    try:
        import make_vectors
    finally:
        sys.path.remove(str(HERE))
    assert (HERE / "vectors.json").read_text() == make_vectors.generate(), \
        "tests/reference.py changed: run python tests/vectors/make_vectors.py and check the C++ side too"


# ---------------------------------------------------------------------------------------------- network


def rel(got, want) -> float:
    """Largest error relative to the largest reference value."""
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64).ravel() - want.ravel()).max() / max(np.abs(want).max(), 1e-30))


def model() -> MLP:
    return MLP(NET["sizes"], np.concatenate([np.r_[W, b] for W, b in zip(NET["W"], NET["b"])]).astype(np.float32))


def inputs() -> tuple[np.ndarray, np.ndarray]:
    return np.array(NET["X"], np.float32).reshape(NET["batch"], -1), np.array(NET["y"], np.int64)


def trainer(m: MLP, **optim) -> Trainer:
    return Trainer(from_dict({"optim": optim}), m, NET["batch"])  # sizes: the model's, not the config's


def test_forward_and_loss():
    X, y = inputs()
    Z = model().logits(X)
    assert rel(Z, NET["acts"][-1]) < 1e-6
    dZ, loss, pred = np.empty_like(Z), np.empty(len(y), np.float32), np.empty(len(y), np.int64)
    K.softmax_xent(Z, y, dZ, loss, pred, 1.0)
    assert loss.astype(np.float64).mean() == pytest.approx(NET["loss"], rel=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradients(reduction):
    X, y = inputs()
    m = model()
    tr = trainer(m, reduction=reduction)
    loss = tr.train_step(X, y, 0.0, update=False)
    assert loss / len(y) == pytest.approx(NET["loss"], rel=1e-6)
    tr.sync()
    want = NET[f"grad_{reduction}"]
    for l in range(len(NET["sizes"]) - 1):
        gW, gb = K.layer_views(tr.state.flat.grad, m.sizes_arr, l)
        assert rel(gW, want["W"][l]) < 1e-5 and rel(gb, want["b"][l]) < 1e-5, l


@pytest.mark.parametrize("case", NET["steps"], ids=lambda c: "{optim}-{reduction}-wd{weight_decay}{n}".format(
    n="-nesterov" if c.get("nesterov") else "", **c))
def test_two_optimiser_steps(case):
    X, y = inputs()
    m = model()
    keys = ("lr", "momentum", "nesterov", "weight_decay", "reduction", "beta1", "beta2", "eps")
    tr = trainer(m, name=case["optim"], **{k: case[k] for k in keys if k in case})
    for want in case["after"]:
        tr.train_step(X, y, case["lr"])
        tr.sync()
        for l in range(len(NET["sizes"]) - 1):
            W, b = m.layer(l)
            assert rel(W, want["W"][l]) < 1e-5 and rel(b, want["b"][l]) < 1e-5, l


# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("case", V["schedule"], ids=lambda c: f"{c['name']}-warm{c['warmup_epochs']}")
def test_schedule(case):
    spe = case["steps_per_epoch"]
    table = {k: case[k] for k in ("name", "warmup_epochs", "step_epochs", "gamma", "min_lr") if k in case}
    cfg = from_dict({"optim": {"lr": case["lr"]}, "schedule": table, "train": {"epochs": case["epochs"]}})
    assert warmup_steps(case["warmup_epochs"], spe) == case["warmup_steps"]
    for s, want in case["at"]:
        assert lr_at(cfg, s, spe) == pytest.approx(want, rel=1e-12, abs=0), s


# ---------------------------------------------------------------------------------------------- random numbers


def test_mix_and_uniform():
    for z, want in V["rng"]["mix"]:
        assert int(rng.mix(np.uint64(int(z, 16)))) == int(want, 16)
    for c in V["rng"]["uniform"]:
        assert int(rng.bits(c["seed"], c["stream"], c["epoch"], c["i"], c["k"])) == int(c["bits"], 16)
        assert rng.uniform(c["seed"], c["stream"], c["epoch"], c["i"], c["k"]) == c["u"]


def test_perm_and_split():
    seed = V["rng"]["seed"]
    for c in V["rng"]["perm"]:
        assert rng.perm(c["n"], seed, c["stream"], c["epoch"]).tolist() == c["p"]
    sp = V["rng"]["split"]
    tr, va = rng.split(sp["n"], sp["val_split"], seed)
    assert tr.tolist() == sp["train"] and va.tolist() == sp["val"]


# ---------------------------------------------------------------------------------------------- augmentation


def augment_of(name: str) -> Augment:
    a = dict(V["augment"]["augs"][name])
    return Augment(shift=a.get("shift", 0), rotate=a.get("rotate", 0.0), scale=a.get("scale", 0.0),
                   elastic_alpha=a.get("alpha", 0.0), elastic_sigma=a.get("sigma", 4.0))


def test_augmentation_draws():
    for c in V["augment"]["draws"]:
        d = draws(augment_of(c["aug"]), V["augment"]["seed"], c["epoch"], c["q"], 1)
        assert (int(d.dx[0]), int(d.dy[0])) == (c["dx"], c["dy"])
        assert (float(d.angle[0]), float(d.scale[0])) == (c["angle"], c["scale"])
        assert d.field.shape[-1] == c["G"] and d.field.ravel().tolist() == c["field"]


@pytest.mark.parametrize("case", V["augment"]["images"], ids=lambda c: c["aug"])
def test_augmentation_of_a_fixed_image(case):
    img = np.array(V["augment"]["image"], np.uint8)[None]
    d, G = case["draws"], case["draws"]["G"]
    fixed = Draws(np.array([d["dx"]]), np.array([d["dy"]]), np.array([d["angle"]]), np.array([d["scale"]]),
                  np.array(d["field"], np.float32).reshape(1, 2, G, G))
    out = np.empty((1, 784), np.float32)
    apply(img, np.zeros(1, np.int64), out, augment_of(case["aug"]), fixed)
    if case["aug"] == "shift":  # pixels move exactly: u8 / 255 rounded once to float32
        np.testing.assert_array_equal(out[0], np.float32(case["out"]))
    else:  # bilinear interpolation in float32
        np.testing.assert_allclose(out[0], case["out"], rtol=0, atol=2e-5)
