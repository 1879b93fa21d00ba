"""Write tests/vectors/vectors.json: fixed small inputs and what tests/reference.py says about them.

    python tests/vectors/make_vectors.py          # rewrite the committed file

Both test suites read the file (tests/test_vectors.py, cpp/tests/test_vectors.cpp), so a change of the
maths on one side that the other does not follow fails a test. Every number is the exact decimal repr of
a float64 (float32 inputs are exact in float64); 64-bit integers are hex strings.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import reference as ref  # noqa: E402

SIZES = [6, 5, 4, 3]
BATCH = 4
SEED = 20261206  # the [train] seed of the random-number vectors


def f32(a) -> list:
    """float32 values as exact float64 numbers (flat)."""
    return [float(v) for v in np.asarray(a, np.float32).ravel()]


def f64(a) -> list:
    return [float(v) for v in np.asarray(a, np.float64).ravel()]


def near_kink(Ws, bs, X, y, opt, reduction, margin=1e-3) -> bool:
    """True when a hidden pre-activation comes within `margin` of 0 in either step, or a gradient within
    `margin` of 0 but not 0 (Adam turns that into a ±lr move on float32 noise): such data says nothing
    about a float32 implementation."""
    import copy

    Ws, bs, opt = [W.copy() for W in Ws], [b.copy() for b in bs], copy.deepcopy(opt)
    for _ in range(2):
        acts = ref.forward(Ws, bs, X)
        if any(np.abs(A @ W.T + b).min() < margin for A, W, b in zip(acts[:-2], Ws, bs)):
            return True
        _, gW, gb = ref.gradients(Ws, bs, X, y, reduction)
        g = np.abs(np.concatenate([g.ravel() for g in gW + gb]))
        if ((g > 0) & (g < margin)).any():  # exactly 0 (a unit dead for the whole batch) is exact in float32
            return True
        ref.step(Ws, bs, X, y, opt, reduction)
    return False


OPTIMS = [dict(optim="sgd", lr=0.1), dict(optim="momentum", lr=0.1, momentum=0.9, nesterov=False),
          dict(optim="momentum", lr=0.1, momentum=0.9, nesterov=True),
          dict(optim="adam", lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)]


def network() -> dict:
    """A 6-5-4-3 network, batch 4: forward, loss, gradients, two optimiser steps of every kind."""
    cases = [dict(o, weight_decay=wd, reduction=red) for o in OPTIMS for wd in (0.0, 0.01) for red in ("sum", "mean")]
    for seed in range(100):  # the first data clear of ReLU kinks and zero gradients for every case
        rng = np.random.default_rng(seed)
        Ws = [(rng.standard_normal((o, i)) * math.sqrt(2 / i)).astype(np.float32) for i, o in zip(SIZES, SIZES[1:])]
        bs = [(0.1 * rng.standard_normal(o)).astype(np.float32) for o in SIZES[1:]]
        X = rng.random((BATCH, SIZES[0])).astype(np.float32)
        y = np.array([0, 2, 1, 2])
        W64, b64 = [W.astype(np.float64) for W in Ws], [b.astype(np.float64) for b in bs]
        if not any(near_kink(W64, b64, X, y, optimizer(c), c["reduction"]) for c in cases):
            break
    else:
        raise RuntimeError("no seed below 100 gives data clear of kinks")
    acts = ref.forward(W64, b64, X)
    out = {"sizes": SIZES, "batch": BATCH, "W": [f32(W) for W in Ws], "b": [f32(b) for b in bs], "X": f32(X),
           "y": y.tolist(), "acts": [f64(A) for A in acts[1:]], "loss": float(ref.losses(acts[-1], y).mean())}
    for red in ("sum", "mean"):
        _, gW, gb = ref.gradients(W64, b64, X, y, red)
        out[f"grad_{red}"] = {"W": [f64(g) for g in gW], "b": [f64(g) for g in gb]}
    out["steps"] = []
    for c in cases:
        opt = optimizer(c)
        Wc, bc = [W.copy() for W in W64], [b.copy() for b in b64]
        after = []
        for _ in range(2):
            ref.step(Wc, bc, X, y, opt, c["reduction"])
            after.append({"W": [f64(W) for W in Wc], "b": [f64(b) for b in bc]})
        out["steps"].append(dict(c, after=after))
    return out


def optimizer(c: dict) -> ref.Optimizer:
    return ref.Optimizer(c["optim"], c["lr"], momentum=c.get("momentum", 0.9), nesterov=c.get("nesterov", False),
                         wd=c["weight_decay"], b1=c.get("beta1", 0.9), b2=c.get("beta2", 0.999),
                         eps=c.get("eps", 1e-8))


def schedule() -> list:
    """lr at chosen steps of each schedule with warm-up, and 3 steps past the planned end. A key left out
    means its default: step_epochs 10, gamma 0.1, min_lr 0 (the contract's defaults, which each trainer
    must have)."""
    cases = [dict(name="constant", lr=0.1, warmup_epochs=0.25, steps_per_epoch=10, epochs=3),  # Wu 2.5 -> 3
             dict(name="constant", lr=0.1, warmup_epochs=0.45, steps_per_epoch=10, epochs=3),  # Wu 4.5 -> 5
             dict(name="step", lr=0.5, warmup_epochs=1.0, steps_per_epoch=7, epochs=25),  # step_epochs 10
             dict(name="step", lr=0.5, warmup_epochs=0.0, steps_per_epoch=7, epochs=25, step_epochs=3, gamma=0.5),
             dict(name="cosine", lr=1e-3, warmup_epochs=0.5, steps_per_epoch=211, epochs=2),  # Wu 105.5 -> 106
             dict(name="cosine", lr=0.2, warmup_epochs=1.5, steps_per_epoch=5, epochs=8, min_lr=0.01)]
    for c in cases:
        total = c["epochs"] * c["steps_per_epoch"]
        wu = ref.warmup_steps(c["warmup_epochs"], c["steps_per_epoch"])
        steps = sorted({0, 1, max(wu - 1, 0), wu, wu + 1, total // 3, total // 2, total - 2, total - 1, total + 3}
                       | {e * c["steps_per_epoch"] + d for e in (3, 10, 20) for d in (-1, 0)
                          if 0 < e * c["steps_per_epoch"] < total})
        kw = {k: v for k, v in c.items() if k not in ("steps_per_epoch",)}
        c["warmup_steps"] = wu
        c["at"] = [[s, ref.lr_at(s, c["steps_per_epoch"], **kw)] for s in steps]
    return cases


def rng() -> dict:
    """The counter-based generator: mix, uniform at a few keys, perm(10) for two epochs, a split."""
    keys = [(0, 1, 0, 0, 0), (SEED, 2, 0, 9, 0), (SEED, 3, 4, 53999, 203), (2**53 - 1, 3, 39, 127, 5),
            (1, 2, 100000, 2**40, 1)]
    return {"seed": SEED,
            "mix": [[hex(z), hex(ref.mix(z))] for z in (0, 1, 0x9E3779B97F4A7C15, 2**64 - 1)],
            "uniform": [{"seed": s, "stream": st, "epoch": e, "i": i, "k": k, "bits": hex(ref.bits(s, st, e, i, k)),
                         "u": ref.uniform(s, st, e, i, k)} for s, st, e, i, k in keys],
            "perm": [{"n": 10, "stream": ref.SHUFFLE, "epoch": e, "p": ref.perm(10, SEED, ref.SHUFFLE, e)}
                     for e in (0, 1)],
            "split": dict(zip(("train", "val"), ref.split(100, 0.1, SEED)), n=100, val_split=0.1)}


AUGS = {"shift": dict(shift=2), "affine": dict(shift=2, rotate=12.0, scale=0.12),
        "elastic": dict(shift=2, rotate=12.0, scale=0.12, alpha=2.0, sigma=9.0),
        "elastic-only": dict(alpha=1.5, sigma=6.0)}  # 27 / 6 = 4.5 inner spacings: rounds up to G = 8


def image() -> np.ndarray:
    """A fixed 28x28 uint8 '0'-like ring with a stroke through it, soft-edged (not from MNIST)."""
    y, x = np.mgrid[0:28, 0:28].astype(np.float64)
    r = np.hypot((x - 13.0) / 7.0, (y - 14.0) / 10.0)
    ring = np.clip(1.6 - 6 * np.abs(r - 1), 0, 1)
    stroke = np.clip(1.5 - np.abs((x - 13.0) - 0.4 * (y - 14.0)), 0, 1) * (np.abs(y - 14) < 8)
    return np.rint(255 * np.maximum(ring, stroke)).astype(np.uint8).ravel()


def augment() -> dict:
    """Draws at a few positions, and one fixed image under one sample's draws for shift / affine / elastic."""
    draws = [dict(aug=a, epoch=e, q=q, **pack(ref.aug_draws(SEED, e, q, **AUGS[a])))
             for a, e, q in (("shift", 0, 0), ("affine", 1, 127), ("elastic", 2, 53999), ("elastic", 0, 5),
                             ("elastic-only", 1, 64))]
    img = image()
    cases = []
    for name, aug in list(AUGS.items())[:3]:
        d = ref.aug_draws(SEED, 3, 17, **aug)
        cases.append(dict(aug=name, draws=pack(d), out=f64(ref.augment(img, d, shift_only=name == "shift"))))
    return {"seed": SEED, "augs": AUGS, "draws": draws, "image": img.tolist(), "images": cases}


def pack(d: dict) -> dict:
    return dict(d, field=f32(d["field"]), G=d["field"].shape[-1])


def generate() -> str:
    doc = {"about": "Shared test vectors: written by tests/vectors/make_vectors.py from tests/reference.py; "
                    "read by tests/test_vectors.py and cpp/tests/test_vectors.cpp. Do not edit by hand.",
           "network": network(), "schedule": schedule(), "rng": rng(), "augment": augment()}
    return dumps(doc) + "\n"


def dumps(v, indent: str = "") -> str:
    """JSON with objects one key a line and every list of scalars on one line: small diffs, short file."""
    inner = indent + " "
    if isinstance(v, dict):
        body = ",\n".join(f"{inner}{json.dumps(k)}: {dumps(x, inner)}" for k, x in v.items())
        return "{\n" + body + "\n" + indent + "}"
    if isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
        return "[\n" + ",\n".join(inner + dumps(x, inner) for x in v) + "\n" + indent + "]"
    return json.dumps(v, allow_nan=False)


if __name__ == "__main__":
    (HERE / "vectors.json").write_text(generate())
