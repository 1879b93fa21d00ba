"""A float64 NumPy reference of the whole network (docs/training.md), written for clarity, not speed.

Every kernel and both trainers (Numba and C++) are checked against it. BLAS is allowed here.
"""

import numpy as np


def forward(Ws, bs, X):
    """All layer outputs [A0=X, A1, ..., Z_L] in float64."""
    acts = [np.asarray(X, np.float64)]
    for l, (W, b) in enumerate(zip(Ws, bs)):
        Z = acts[-1] @ np.asarray(W, np.float64).T + b
        acts.append(np.maximum(Z, 0) if l < len(Ws) - 1 else Z)
    return acts


def loss_and_grad(Z, y, reduction="sum"):
    """Mean per-sample loss, and dZ for the given reduction."""
    Z = Z - Z.max(axis=1, keepdims=True)
    logp = Z - np.log(np.exp(Z).sum(axis=1, keepdims=True))
    n = len(y)
    loss = -logp[np.arange(n), y]
    dZ = np.exp(logp)
    dZ[np.arange(n), y] -= 1
    if reduction == "mean":
        dZ /= n
    return loss.mean(), dZ


def gradients(Ws, bs, X, y, reduction="sum"):
    acts = forward(Ws, bs, X)
    loss, dZ = loss_and_grad(acts[-1], y, reduction)
    gW, gb = [None] * len(Ws), [None] * len(Ws)
    for l in range(len(Ws) - 1, -1, -1):
        gW[l] = dZ.T @ acts[l]
        gb[l] = dZ.sum(axis=0)
        if l > 0:
            dZ = (dZ @ np.asarray(Ws[l], np.float64)) * (acts[l] > 0)
    return loss, gW, gb


class Optimizer:
    """sgd / momentum (optionally Nesterov) / adam on float64 copies, PyTorch semantics."""

    def __init__(self, kind, lr, momentum=0.9, nesterov=False, wd=0.0, b1=0.9, b2=0.999, eps=1e-8):
        self.kind, self.lr, self.mu, self.nesterov, self.wd = kind, lr, momentum, nesterov, wd
        self.b1, self.b2, self.eps, self.t, self.m, self.v = b1, b2, eps, 0, {}, {}

    def step(self, params, grads, decay):
        self.t += 1
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g + (self.wd * p if decay[i] else 0)
            if self.kind == "sgd":
                p -= self.lr * g
            elif self.kind == "momentum":
                self.m[i] = self.mu * self.m.get(i, 0) + g
                p -= self.lr * (g + self.mu * self.m[i] if self.nesterov else self.m[i])
            else:
                self.m[i] = self.b1 * self.m.get(i, 0) + (1 - self.b1) * g
                self.v[i] = self.b2 * self.v.get(i, 0) + (1 - self.b2) * g * g
                mh = self.m[i] / (1 - self.b1**self.t)
                vh = self.v[i] / (1 - self.b2**self.t)
                p -= self.lr * mh / (np.sqrt(vh) + self.eps)


def step(Ws, bs, X, y, opt, reduction="sum"):
    """One training step in place on float64 lists Ws, bs; returns the mean loss before the step."""
    loss, gW, gb = gradients(Ws, bs, X, y, reduction)
    params, grads = [], []
    for l in range(len(Ws)):
        params += [Ws[l], bs[l]]
        grads += [gW[l], gb[l]]
    opt.step(params, grads, [i % 2 == 0 for i in range(len(params))])
    return loss
