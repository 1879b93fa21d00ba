"""The network: layer sizes and one flat float32 array of parameters, W1 b1 W2 b2 ... in checkpoint order."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from . import kernels

if TYPE_CHECKING:
    from .checkpoint import Checkpoint, OptimState


def n_params(sizes: list[int]) -> int:
    from .checkpoint import shapes

    return sum(math.prod(s) for s in shapes(sizes))


class MLP:
    """Linear+ReLU hidden layers and a linear output layer whose logits go to softmax."""

    def __init__(self, sizes: list[int], params: np.ndarray | None = None):
        self.sizes = list(sizes)
        self.sizes_arr = np.array(sizes, dtype=np.int64)
        n = n_params(self.sizes)
        if params is not None and np.shape(params) != (n,):
            raise ValueError(f"expected {n} parameters for sizes {sizes}, got {np.shape(params)}")
        # 64-byte aligned (a copy of `params`): the products are faster on aligned rows (kernels.aligned_zeros)
        self.params = kernels.aligned_zeros(n)
        if params is not None:
            self.params[:] = params
        self._acts = np.empty(0, np.float32)
        self._views: dict = {}  # (id of params, cap, B) -> (kernels.ForwardViews, their kernels.Calls)

    @classmethod
    def init(cls, sizes: list[int], rng: np.random.Generator) -> MLP:
        """He (Kaiming) normal weights, N(0, 2/fan_in), and zero biases."""
        m = cls(sizes)
        for l in range(len(sizes) - 1):
            W, _ = m.layer(l)
            W[:] = rng.standard_normal(W.shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / sizes[l]))
        return m

    def layer(self, l: int) -> tuple[np.ndarray, np.ndarray]:
        """Views W_l (n_out, n_in) and b_l (n_out,) into the flat parameters (l from 0)."""
        return kernels.layer_views(self.params, self.sizes_arr, l)

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """A parameter-shaped flat array (a gradient, an optimiser moment) as copies [W1, b1, W2, b2, ...]."""
        return [a.copy() for l in range(len(self.sizes) - 1) for a in kernels.layer_views(flat, self.sizes_arr, l)]

    @property
    def weights(self) -> list[np.ndarray]:
        return [self.layer(l)[0] for l in range(len(self.sizes) - 1)]

    @property
    def biases(self) -> list[np.ndarray]:
        return [self.layer(l)[1] for l in range(len(self.sizes) - 1)]

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint) -> MLP:
        flat = [a.ravel() for W, b in zip(ck.weights, ck.biases) for a in (W, b)]
        return cls(ck.sizes, np.concatenate(flat).astype(np.float32))

    def to_checkpoint(self, meta: dict, optim: OptimState | None = None) -> Checkpoint:
        from .checkpoint import Checkpoint

        params = self.split(self.params)
        return Checkpoint(list(self.sizes), params[0::2], params[1::2], meta, optim)

    def logits(self, X: np.ndarray, chunk: int = 1000) -> np.ndarray:
        """Logits (N, n_L) for float32 inputs X (N, n_0) in [0, 1], computed `chunk` rows at a time."""
        X = np.ascontiguousarray(X, np.float32)
        if X.ndim != 2 or X.shape[1] != self.sizes[0]:
            raise ValueError(f"expected inputs of shape (N, {self.sizes[0]}), got {X.shape}")
        cap = min(chunk, max(len(X), 1))
        out = np.empty((len(X), self.sizes[-1]), np.float32)
        for i in range(0, len(X), cap):
            out[i:i + cap] = kernels.forward(*self._forward_views(cap, len(X[i:i + cap])), X[i:i + cap])
        return out

    def _forward_views(self, cap: int, B: int) -> tuple[kernels.ForwardViews, kernels.Calls]:
        """The views of a forward pass of B of `cap` samples and their compiled calls, made once (at batch 1
        making them costs more than the products). The calls are the views' own: a view's layout is part of
        its compiled entry point (one row is C-contiguous, more are strided). The views keep the arrays they
        view alive, so a key's params cannot be another's."""
        if self._acts.size < kernels.acts_size(self.sizes, cap):
            self._acts = kernels.aligned_zeros(kernels.acts_size(self.sizes, cap))
            self._views.clear()
        key = (id(self.params), cap, B)
        if key not in self._views:
            if len(self._views) >= 8:  # callers with ever new batch sizes: keep the memory bounded
                self._views.clear()
            self._views[key] = (kernels.forward_views(self.params, self.sizes_arr, self._acts, cap, B),
                                kernels.Calls())
        return self._views[key]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Softmax probabilities (N, n_L)."""
        z = self.logits(X).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def evaluate(model: MLP, X_u8: np.ndarray, y: np.ndarray, chunk: int = 1000) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy and predictions on uint8 images X_u8 (N, 784) with labels y (N,)."""
    n, C = len(y), model.sizes[-1]
    cap = min(chunk, max(n, 1))
    xb = kernels.aligned_zeros((cap, X_u8.shape[1]))
    loss = np.empty(cap, np.float32)
    pred = np.empty(n, np.int64)
    dZ = np.empty((cap, C), np.float32)
    total = 0.0
    for i in range(0, n, cap):
        B = min(cap, n - i)
        idx = np.arange(i, i + B, dtype=np.int64)
        kernels.gather(X_u8, idx, kernels.PIXEL, xb)
        Z = model.logits(xb[:B], chunk=cap)
        kernels.softmax_xent(Z, y[i:i + B].astype(np.int64), dZ[:B], loss[:B], pred[i:i + B], 1.0)
        total += float(loss[:B].astype(np.float64).sum())
    return total / max(n, 1), float((pred == y).mean()) if n else 0.0, pred
