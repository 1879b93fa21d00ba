"""The Python API for scripts and notebooks (docs/api.md walks through it).

    import nn_numba
    net = nn_numba.load("runs/latest")          # a run folder (its best.ck) or a checkpoint file
    net.predict(images)                         # digits of MNIST-style arrays, (N, 28, 28) or (N, 784)
    net.predict_files(["photo.jpg"])            # image files, preprocessed exactly as `nn-numba predict`
    run = nn_numba.fit("default", epochs=1)     # a shipped config's name, a TOML file or a dict
    nn_numba.read_metrics(run)                  # metrics.jsonl: one dict per epoch

`import nn_numba` stays cheap: these names are imported from here on first use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .checkpoint import Checkpoint
from .errors import NNError

__all__ = ["Network", "Prediction", "load", "fit", "read_metrics", "config_names"]

Source = str | os.PathLike


class Prediction(NamedTuple):
    """One image file's result: its path, the likeliest digit and the probability of each digit 0-9."""

    path: str
    digit: int
    probabilities: np.ndarray  # float32 (10,)


class Network:
    """A trained network: the layer sizes, the checkpoint's metadata, and prediction."""

    def __init__(self, checkpoint: Checkpoint, path: Path | None = None):
        from .model import MLP

        self.checkpoint = checkpoint
        self.path = path
        self._mlp = MLP.from_checkpoint(checkpoint)

    @property
    def sizes(self) -> list[int]:
        """Layer widths, inputs first: [784, 250, 250, 10]."""
        return list(self.checkpoint.sizes)

    @property
    def meta(self) -> dict[str, Any]:
        """The checkpoint's metadata: epoch, val_acc, test_acc, config, ... (whatever training recorded)."""
        return self.checkpoint.meta

    def __repr__(self) -> str:
        return f"Network({'-'.join(map(str, self.sizes))}, path={str(self.path)!r})"

    def inputs(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, 784) network inputs from MNIST-style images: white ink on black, 28x28.

        Takes one image or a batch, as (28, 28), (784,), (N, 28, 28) or (N, 784); uint8 pixels (0-255)
        are scaled exactly as in training, float pixels must already be in [0, 1].
        """
        from .kernels import PIXEL

        x = np.asarray(images)
        n = self.sizes[0]
        flat, square = x.ndim in (1, 2) and x.shape[-1] == n, x.ndim in (2, 3) and x.shape[-2:] == (28, 28)
        if not (flat or square and n == 784):
            raise NNError(f"images of shape {x.shape}: expected (28, 28), ({n},), (N, 28, 28) or (N, {n})")
        if x.dtype == np.uint8:
            return PIXEL[x.reshape(-1, n)]
        if x.dtype.kind not in "fiu":
            raise NNError(f"images of dtype {x.dtype}: expected uint8 (0-255) or floats in [0, 1]")
        x = x.reshape(-1, n).astype(np.float32)
        if x.size and not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
            raise NNError(f"pixels must be uint8 (0-255) or in [0, 1], got values in [{x.min()}, {x.max()}]: "
                          "divide 0-255 values by 255")
        return x

    def logits(self, images: np.ndarray) -> np.ndarray:
        """The last layer's outputs before softmax, float32 (N, 10)."""
        return self._mlp.logits(self.inputs(images))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities of the digits 0-9, float32 (N, 10)."""
        return self._mlp.predict_proba(self.inputs(images))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """The likeliest digit of each image, int64 (N,)."""
        return self.logits(images).argmax(axis=1)

    def predict_files(self, paths: list[Source] | Source, raw: bool = False) -> list[Prediction]:
        """Digits in image files (folders: every image inside), with the preprocessing of `nn-numba predict`.

        raw=True: the files are already 28x28 MNIST-style and are only turned grey (as `predict --raw`).
        A file that cannot be used raises an NNError naming it.
        """
        from .predict import ImageError, classify, expand, preprocess

        given = [paths] if isinstance(paths, str | os.PathLike) else paths
        out = []
        for name, f, error in expand([os.fspath(p) for p in given]):
            if error is not None:
                raise ImageError(error)
            p = classify(self._mlp, preprocess(f, raw=raw), name)
            out.append(Prediction(name, int(np.argmax(p)), p))
        return out

    def export(self, to: Source) -> Path:
        """Write the network to `to`: .onnx (needs nn-numba[export]) or .npz; see docs/api.md for both."""
        from .export import write

        return write(self.checkpoint, to)


def load(source: Source | None = None) -> Network:
    """A trained network from a checkpoint file or a run folder (its best.ck); None: the latest run in runs/."""
    from .checkpoint import load as load_checkpoint
    from .runs import checkpoint_path

    path = checkpoint_path(source)
    return Network(load_checkpoint(path), path)


def fit(
    config: Source | dict[str, Any] = "default",
    *,
    name: str | None = None,
    data_dir: str | None = None,
    quiet: bool = True,
    **overrides: Any,
) -> Path:
    """Train as `nn-numba train` does and return the run folder (config.toml, metrics.jsonl, best.ck, last.ck).

    `config` is a shipped config's name ("default", "best", "no-augment", "seed"), a TOML file, or a dict
    of tables like {"optim": {"lr": 0.01}, "train": {"epochs": 2}} (missing keys take their defaults).
    `name` names the run folder (default: the time), as `--name`; `overrides` are the command's flags:
    epochs, batch_size, lr, seed, threads, out.
    """
    from .config import apply_overrides, from_dict, load_config
    from .runs import check_run_name
    from .train import train

    if name is not None:
        check_run_name(name)
    cfg = from_dict(config, "config dict") if isinstance(config, dict) else load_config(config)
    try:
        cfg = apply_overrides(cfg, **overrides)
    except KeyError as e:
        raise TypeError(f"fit() got an unknown override {e.args[0]!r}; see help(nn_numba.fit)") from None
    return train(cfg, data_dir=data_dir, quiet=quiet, name=name)


def read_metrics(run: Source | None = None) -> list[dict[str, Any]]:
    """A run's metrics.jsonl, one dict per epoch (epoch, lr, train/val/test loss and accuracy, seconds ...).

    `run` is a run folder; None: the latest run in runs/.
    """
    from .report import load_run
    from .runs import latest_run

    return load_run(latest_run() if run is None else run).hist


def config_names() -> list[str]:
    """The configs that ship with the package: `fit(name)` and `nn-numba train NAME` take them."""
    from .config import shipped_names

    return shipped_names()
