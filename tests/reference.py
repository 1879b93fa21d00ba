"""The one float64 reference of docs/training.md, written for clarity, not speed: the network (forward,
loss, gradients, optimisers), the learning-rate schedule, the counter-based random numbers (plain Python
integers, independent of nn_numba/rng.py) and the augmentation (draws, affine maps, bilinear sampling,
the elastic B-spline).

Every kernel and both trainers (Numba and C++) are checked against it, directly or through the shared
test vectors (tests/vectors). BLAS is allowed here.
"""

import math

import numpy as np

# ---------------------------------------------------------------------------------------------- network


def forward(Ws, bs, X):
    """All layer outputs [A0=X, A1, ..., Z_L] in float64."""
    acts = [np.asarray(X, np.float64)]
    for l, (W, b) in enumerate(zip(Ws, bs)):
        Z = acts[-1] @ np.asarray(W, np.float64).T + b
        acts.append(np.maximum(Z, 0) if l < len(Ws) - 1 else Z)
    return acts


def log_softmax(Z):
    """Row-wise log p of logits Z (float64), stable: the row maximum is subtracted first."""
    Z = np.asarray(Z, np.float64)
    Z = Z - Z.max(axis=1, keepdims=True)
    return Z - np.log(np.exp(Z).sum(axis=1, keepdims=True))


def softmax(Z):
    return np.exp(log_softmax(Z))


def losses(Z, y):
    """Per-sample cross-entropy -log p[y]."""
    return -log_softmax(Z)[np.arange(len(y)), y]


def loss_and_grad(Z, y, reduction="sum"):
    """Mean per-sample loss, and dZ for the given reduction."""
    n = len(y)
    dZ = softmax(Z)
    dZ[np.arange(n), y] -= 1
    if reduction == "mean":
        dZ /= n
    return losses(Z, y).mean(), dZ


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


# ---------------------------------------------------------------------------------------------- optimisers


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


def train(Ws, bs, X, y, steps, batch, opt, reduction="sum"):
    """`steps` mini-batches of X, y in file order with optimiser `opt`; float64 copies [W1, B1, W2, ...]."""
    Ws = [np.asarray(W, np.float64).copy() for W in Ws]
    bs = [np.asarray(b, np.float64).copy() for b in bs]
    for t in range(steps):
        step(Ws, bs, X[t * batch:(t + 1) * batch], y[t * batch:(t + 1) * batch], opt, reduction)
    return [p for wb in zip(Ws, bs) for p in wb]


def slots(opt, n):
    """The optimiser's state as lists per slot (momentum: [v], adam: [m, v]) of n parameters."""
    names = {"sgd": [], "momentum": [opt.m], "adam": [opt.m, opt.v]}[opt.kind]
    return [[slot[i] for i in range(n)] for slot in names]


# ---------------------------------------------------------------------------------------------- schedule


def warmup_steps(warmup_epochs, steps_per_epoch):
    """Wu: warm-up epochs in steps, rounded half up."""
    return math.floor(warmup_epochs * steps_per_epoch + 0.5)


def lr_at(s, steps_per_epoch, epochs, lr, name="constant", warmup_epochs=0.0, step_epochs=10, gamma=0.1,
          min_lr=0.0):
    """The learning rate of optimiser step s (from 0)."""
    wu = warmup_steps(warmup_epochs, steps_per_epoch)
    if s < wu:
        return lr * (s + 1) / wu
    if name == "step":
        return lr * gamma ** ((s // steps_per_epoch) // step_epochs)
    if name == "cosine":
        total = epochs * steps_per_epoch
        frac = min((s - wu) / max(total - wu, 1), 1.0)
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * frac)) / 2
    return lr


# ---------------------------------------------------------------------------------------------- random numbers

U64 = (1 << 64) - 1
SPLIT, SHUFFLE, AUGMENT = 1, 2, 3


def mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def bits(seed, stream, epoch, i, k):
    a = mix(seed & U64)
    a = mix(a ^ stream)
    a = mix((a + epoch) & U64)
    a = mix((a + i) & U64)
    return mix((a + 0x9E3779B97F4A7C15 * (k + 1)) & U64)


def uniform(seed, stream, epoch, i, k):
    return (bits(seed, stream, epoch, i, k) >> 11) / 2.0**53


def perm(n, seed, stream, epoch):
    p = list(range(n))
    for i in range(n - 1, 0, -1):
        j = math.floor(uniform(seed, stream, epoch, i, 0) * (i + 1))
        p[i], p[j] = p[j], p[i]
    return p


def split(n, val_split, seed):
    """(train, val) sorted lists of indices."""
    p = perm(n, seed, SPLIT, 0)
    k = n - math.floor(n * val_split + 0.5)
    return sorted(p[:k]), sorted(p[k:])


def grid_nodes(sigma):
    """Side of the elastic control grid with its outer ring: inner nodes about sigma pixels apart, >= 2."""
    return max(2, math.floor(27 / sigma + 0.5) + 1) + 2


def aug_draws(seed, epoch, q, shift=0, rotate=0.0, scale=0.0, alpha=0.0, sigma=4.0):
    """The distortion of the sample at position q of epoch `epoch`: dx, dy, angle (degrees), scale factor,
    and the elastic control grid (2, G, G) float32 (G = 0 when elastic is off)."""
    def u(k):
        return uniform(seed, AUGMENT, epoch, q, k)

    G = grid_nodes(sigma) if alpha > 0 else 0
    field = np.array([alpha * (2 * u(4 + k) - 1) for k in range(2 * G * G)], np.float32).reshape(2, G, G)
    return {"dx": math.floor(u(0) * (2 * shift + 1)) - shift if shift else 0,
            "dy": math.floor(u(1) * (2 * shift + 1)) - shift if shift else 0,
            "angle": rotate * (2 * u(2) - 1) if rotate else 0.0,
            "scale": 1 + scale * (2 * u(3) - 1) if scale else 1.0,
            "field": field}


# ---------------------------------------------------------------------------------------------- augmentation

S = 28  # image side; pixel centres at integer coordinates, x right, y down, the centre at (13.5, 13.5)
C = (S - 1) / 2


def shifted(img, dx, dy):
    """img (28, 28) moved dx pixels right and dy down, zero fill."""
    r = np.roll(img, (dy, dx), axis=(0, 1))
    if dy > 0:
        r[:dy] = 0
    elif dy < 0:
        r[dy:] = 0
    if dx > 0:
        r[:, :dx] = 0
    elif dx < 0:
        r[:, dx:] = 0
    return r


def affine_map(angle, scale, dx, dy):
    """(2, 3) float64 inverse map output pixel -> source of: rotate by angle degrees (counter-clockwise on
    screen) and scale about the centre, then move by (dx, dy)."""
    t = math.radians(angle)
    a, b = math.cos(t) / scale, math.sin(t) / scale
    ux, uy = C + dx, C + dy  # where the centre goes
    return np.array([[a, -b, C - a * ux + b * uy], [b, a, C - b * ux - a * uy]])


def bilinear(img, sx, sy):
    """float64 bilinear sampling of img (28, 28) at (sx, sy) arrays, zero outside (zero-padded)."""
    pad = np.zeros((S + 2, S + 2))
    pad[1:-1, 1:-1] = img
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = sx - x0, sy - y0
    inside = (sx > -1) & (sx < S) & (sy > -1) & (sy < S)
    xi = np.where(inside, x0, -1).astype(int) + 1  # padded index, 0 = the zero border
    yi = np.where(inside, y0, -1).astype(int) + 1
    v = ((1 - fy) * ((1 - fx) * pad[yi, xi] + fx * pad[yi, xi + 1])
         + fy * ((1 - fx) * pad[yi + 1, xi] + fx * pad[yi + 1, xi + 1]))
    return np.where(inside, v, 0.0)


def bspline(f):
    """Cubic B-spline of control nodes f (G + 2, G + 2) (inner G x G spanning the image) -> (28, 28) [y, x]."""
    G = len(f) - 2
    pos = np.arange(S) * (G - 1) / (S - 1)
    i = np.minimum(np.floor(pos), G - 2).astype(int)
    t = pos - i
    basis = [(1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6]
    Wm = np.zeros((S, G + 2))
    for k, w in enumerate(basis):
        Wm[np.arange(S), i + k] = w
    return Wm @ np.asarray(f, np.float64) @ Wm.T


def warp(img, m, field=None):
    """img (28, 28) in [0, 1] sampled at m @ (x, y, 1) (+ the elastic displacement of `field` (2, G, G))."""
    y, x = np.mgrid[0:S, 0:S].astype(np.float64)
    m = np.asarray(m, np.float64)
    sx = m[0, 0] * x + m[0, 1] * y + m[0, 2]
    sy = m[1, 0] * x + m[1, 1] * y + m[1, 2]
    if field is not None and np.size(field):
        sx = sx + bspline(field[0])
        sy = sy + bspline(field[1])
    return bilinear(img, sx, sy)


def augment(img_u8, d, shift_only=False):
    """One uint8 image (784,) distorted by draws d (aug_draws' dict) -> (784,) float64, as augment.py does:
    an exact integer shift when only shift is on, else the affine (+ elastic) map sampled bilinearly."""
    img = np.asarray(img_u8, np.float64).reshape(S, S) / 255
    if shift_only:
        return shifted(img, d["dx"], d["dy"]).ravel()
    return warp(img, affine_map(d["angle"], d["scale"], d["dx"], d["dy"]), d["field"]).ravel()
