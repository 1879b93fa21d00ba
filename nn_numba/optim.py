"""The optimisers by name: their kernel and checkpoint codes, their state slots, and the one named tuple
of settings that the kernels' optimiser step (`kernels.step`) reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .config import Optim

KINDS = ("sgd", "momentum", "adam")  # position = the code in kernels and in the checkpoint's OPTM section
SGD, MOMENTUM, ADAM = 0, 1, 2
NO_UPDATE = 3  # a kernel code only: compute the gradients, change nothing
SLOTS = {"sgd": 0, "momentum": 1, "adam": 2}  # flat state arrays: momentum its velocity; adam m, then v


class Settings(NamedTuple):
    """What one optimiser step needs, in the types the kernels are compiled for (float, bool, int)."""

    kind: int  # SGD, MOMENTUM, ADAM or NO_UPDATE
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float  # on weights only: the kernels pass 0 for biases
    beta1: float
    beta2: float
    eps: float
    inv_bias1: float  # Adam's bias corrections as factors: 1 / (1 - beta1^t) and 1 / (1 - beta2^t)
    inv_bias2: float


def settings(o: Optim, lr: float, step: int, update: bool = True) -> Settings:
    """The settings of optimiser step number `step` (from 1) at learning rate `lr`; update=False computes
    gradients only."""
    t = max(step, 1)
    adam = o.name == "adam"  # only Adam reads the corrections (beta = 1 would divide by 0 elsewhere)
    return Settings(KINDS.index(o.name) if update else NO_UPDATE, float(lr), float(o.momentum), bool(o.nesterov),
                    float(o.weight_decay), float(o.beta1), float(o.beta2), float(o.eps),
                    1.0 / (1.0 - o.beta1**t) if adam else 1.0, 1.0 / (1.0 - o.beta2**t) if adam else 1.0)


def plain(kind: int, lr: float, **over: float) -> Settings:
    """Settings for a direct kernel call (tests, bench): PyTorch's defaults, corrections of step 1."""
    s = Settings(kind, float(lr), 0.0, False, 0.0, 0.9, 0.999, 1e-8, 1.0, 1.0)
    return s._replace(**over)
