"""The README's promise: the same seed gives bit-identical weights, whether the kernels were compiled in this
run or loaded from the cache, and for any thread count."""

import os
import subprocess
import sys

from conftest import ROOT

from nn_numba.checkpoint import load
from nn_numba.config import load_config
from nn_numba.rng import n_val

# `nn-numba train configs/default.toml --epochs 1` (augmentation on) on the first 4,000 training images
# (less its validation split, if it has one) and 500 test images. Everything else is the command.
TRAIN = """
import sys
import nn_numba.data as data

real = data.load_mnist
def first(*args, **kwargs):
    m = real(*args, **kwargs)
    return data.MNIST(m.train_x[:4000], m.train_y[:4000], m.test_x[:500], m.test_y[:500])
data.load_mnist = first

from nn_numba.cli import main
sys.argv = ["nn-numba", "train", *sys.argv[1:]]
main()
"""


def _train(tmp_path, name, threads, mnist_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / name
    r = subprocess.run([sys.executable, "-c", TRAIN, str(ROOT / "configs" / "default.toml"), "--epochs", "1",
                        "--threads", str(threads), "--out", str(out), "--data-dir", str(mnist_path), "--quiet"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    ck = load(next(out.glob("*/last.ck")))
    cfg = load_config(ROOT / "configs" / "default.toml")
    assert ck.meta["step"] == -(-(4000 - n_val(4000, cfg.data.val_split)) // cfg.train.batch_size)
    return [*ck.weights, *ck.biases, *(a for slot in ck.optim.slots for a in slot)]


def _cache_files(tmp_path):
    return {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.nb[ic]")}


def test_same_bits_from_a_cold_or_warm_kernel_cache_and_any_thread_count(tmp_path, mnist_path):
    cold = _train(tmp_path, "cold", 2, mnist_path)  # an empty cache: every kernel is compiled in this run
    filled = _cache_files(tmp_path)
    assert any("linear_backward_weight" in p.name for p in filled)
    warm = _train(tmp_path, "warm", 2, mnist_path)  # every kernel loaded from the cache
    assert _cache_files(tmp_path) == filled  # nothing was compiled again
    one = _train(tmp_path, "one", 1, mnist_path)
    for a, b, c in zip(cold, warm, one):
        assert a.tobytes() == b.tobytes(), "compiled now and loaded from the cache differ"
        assert a.tobytes() == c.tobytes(), "1 and 2 threads differ"
