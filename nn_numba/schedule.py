"""The learning-rate schedule of docs/training.md: warm-up, then constant, step or cosine, per optimiser step."""

from __future__ import annotations

import math

from .config import Config


def lr_at(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimiser step `step` (from 0), as in docs/training.md."""
    o, s = cfg.optim, cfg.schedule
    warm = warmup_steps(s.warmup_epochs, steps_per_epoch)
    if step < warm:
        return o.lr * (step + 1) / warm
    if s.name == "step":
        return o.lr * s.gamma ** (step // steps_per_epoch // s.step_epochs)
    if s.name == "cosine":
        total = planned_epochs(cfg) * steps_per_epoch
        frac = (step - warm) / max(total - warm, 1)
        return s.min_lr + (o.lr - s.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0))) / 2
    return o.lr


def planned_epochs(cfg: Config) -> int:
    """The epochs the cosine decay spans: [schedule] plan_epochs, else [train] epochs. Extending a run sets
    plan_epochs to the old total, so the steps already run keep their rate and the new ones run at min_lr."""
    return cfg.schedule.plan_epochs or cfg.train.epochs


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    """Wu = floor(warmup_epochs * steps_per_epoch + 0.5): round half up, as nn-cpp does."""
    return math.floor(warmup_epochs * steps_per_epoch + 0.5)
