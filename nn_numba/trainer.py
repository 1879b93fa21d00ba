"""One run's optimiser state and work buffers, and the one call per mini-batch into compiled code.

All arithmetic happens in kernels.py. Per mini-batch the Python work is one `gather` (or `augment`)
call and one `train_step` call.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .augment import augment_listed
from .checkpoint import OptimState
from .config import Augment, Config
from .model import MLP
from .optim import SLOTS, settings


class Trainer:
    """Model, optimiser state and the reusable buffers of one training run.

    While batches are sparse (MNIST's are) the first layer's weights, gradient and moments are trained
    in a transposed copy (kernels.TrainState says why). `sync` writes them back into the model and the
    flat arrays, which checkpoints, evaluation and the tests read: call it before reading any of those.
    After changing those from outside, call `load`.
    """

    def __init__(self, cfg: Config, model: MLP, batch_cap: int):
        self.cfg, self.model = cfg, model
        self.state = kernels.train_state(model.sizes, model.params)  # aligned, like the model's params
        self.buf = kernels.buffers(model.sizes, batch_cap)
        self.xb = self.buf.x  # the mini-batch's pixels
        self.step = 0  # optimiser steps taken

    def load(self) -> None:
        """Take the first layer from the model and the flat arrays again (after they were set from outside)."""
        self.state.first_is_t[0] = 0

    def sync(self) -> MLP:
        """Make the model and the flat arrays current (the first layer back from its transposed copy)."""
        if self.state.first_is_t[0] == 1:
            # both copies agree afterwards; training goes on from the transposed one
            kernels.move_first(self.state, self.model.sizes_arr, False)
        return self.model

    def gather(self, X_u8: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """The mini-batch X_u8[idx] / 255 into self.xb (returned, (B, n_0)), with its non-zero pixels listed
        for the next train_step(..., listed=True) in the same pass (kernels.gather_nonzeros). X_u8 C-contiguous."""
        xb = self.xb[:len(idx)]
        nz = self.buf.nonzeros
        kernels.gather_nonzeros(X_u8, idx, xb, nz.count, nz.cols, nz.vals)
        return xb

    def augment(self, X_u8: np.ndarray, idx: np.ndarray, aug: Augment, seed: int, epoch: int, q0: int) -> np.ndarray:
        """The mini-batch X_u8[idx] / 255 distorted as augment.augment_batch distorts the samples at positions
        q0 .. of epoch `epoch`, into self.xb (returned), with its non-zero pixels listed for the next
        train_step(..., listed=True) in the same pass (augment.augment_listed). X_u8 C-contiguous."""
        xb = self.xb[:len(idx)]
        nz = self.buf.nonzeros
        augment_listed(X_u8, idx, xb, nz.count, nz.cols, nz.vals, aug, seed, epoch, q0)
        return xb

    def train_step(self, X: np.ndarray, y: np.ndarray, lr: float, update: bool = True, listed: bool = False) -> float:
        """One optimiser step on float32 inputs X (B, n_0) and int64 labels y (B,); the summed loss.

        update=False computes loss and gradients only (into state.flat.grad, after `sync`): weights and
        optimiser state stay as they are. An update step fuses the gradient into the optimiser step and
        leaves the gradient stale. listed=True: X is the batch `gather` or `augment` just wrote, whose
        non-zeros it listed.
        """
        o, B = self.cfg.optim, len(y)
        self.step += update
        scale = 1.0 / B if o.reduction == "mean" else 1.0
        return kernels.train_step(self.state, self.model.sizes_arr, X, y, self.buf, listed,
                                  settings(o, lr, self.step, update), scale)

    @property
    def loss(self) -> np.ndarray:
        return self.buf.loss

    @property
    def pred(self) -> np.ndarray:
        return self.buf.pred

    def optim_state(self) -> OptimState:
        """The optimiser state for a checkpoint (after `sync`)."""
        self.sync()
        flat = self.state.flat
        slots = [flat.m, flat.v][:SLOTS[self.cfg.optim.name]]
        return OptimState(self.cfg.optim.name, self.step, [self.model.split(s) for s in slots])

    def load_optim_state(self, st: OptimState) -> None:
        """Continue from a checkpoint's optimiser state (its kind is the config's: checked on resume)."""
        for flat, arrays in zip((self.state.flat.m, self.state.flat.v), st.slots):
            flat[:] = np.concatenate([a.ravel() for a in arrays])
        self.step = st.step
        self.load()
