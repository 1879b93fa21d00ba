"""Regenerate tests/data/tiny.ck and tiny.json, byte for byte: `python tests/data/make_tiny.py`.

tiny.ck is a 4-3-2 ReLU network (L = 2) with a META section and a momentum OPTM section. The values are
small fractions (a few not exactly representable, like 0.1, to catch float64 round trips); tiny.json
lists them as the float64 value of each float32, so parsing the JSON and casting to float32 is exact.
META holds no timestamp, so the file is the same on every run.
"""

import json
import sys
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing
from nn_numba.checkpoint import Checkpoint, OptimState, save  # noqa: E402

SIZES = [4, 3, 2]
META = {"epoch": 2, "step": 6, "val_acc": 0.75, "test_acc": 0.5, "val_loss": 0.625, "best_val_acc": 0.75,
        "producer": "nn-numba 0.1.0", "note": "tests/data/make_tiny.py"}


def tiny() -> Checkpoint:
    W1 = (np.arange(12, dtype=np.float32).reshape(3, 4) - 5) / 8  # W1[o, i] = (4o + i - 5) / 8
    B1 = np.array([0.1, -0.25, 0.0], np.float32)
    W2 = np.array([[1.5, -2.0, 0.3], [-0.125, 0.75, -1.0]], np.float32)
    B2 = np.array([0.5, -1 / 3], np.float32)
    params = [W1, B1, W2, B2]
    velocity = [np.float32(0.5) * p - np.float32(0.0625) for p in params]
    return Checkpoint(SIZES, [W1, W2], [B1, B2], dict(META), OptimState("momentum", 6, [velocity]))


def make(out: Path) -> None:
    ck = tiny()
    save(out / "tiny.ck", ck)
    data = (out / "tiny.ck").read_bytes()
    ref = {
        "sizes": ck.sizes,
        "activation": "relu",
        "file_bytes": len(data),
        "crc32": zlib.crc32(data[:-4]),
        "sections": ["META", "OPTM"],
        "weights": [w.tolist() for w in ck.weights],  # W_l[o][i], float64 values of float32s
        "biases": [b.tolist() for b in ck.biases],
        "meta": ck.meta,
        "optim": {"kind": ck.optim.kind, "step": ck.optim.step,
                  "slots": [[a.tolist() for a in slot] for slot in ck.optim.slots]},
    }
    (out / "tiny.json").write_text(json.dumps(ref, indent=1) + "\n")


if __name__ == "__main__":
    make(Path(__file__).resolve().parent)
