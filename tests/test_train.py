"""Training end to end on real MNIST with a small network: run folder, determinism, selection, CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nn_numba.checkpoint import load, save
from nn_numba.config import from_dict
from nn_numba.runs import latest_run
from nn_numba.train import split, train

SMALL = {"model": {"sizes": [784, 64, 10]}, "optim": {"name": "adam", "lr": 2e-3},
         "schedule": {"name": "cosine"}, "train": {"epochs": 2, "batch_size": 256, "seed": 3}}


def _cfg(tmp_path, **train_over):
    raw = json.loads(json.dumps(SMALL))
    raw["train"].update(out=str(tmp_path), **train_over)
    return from_dict(raw)


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_path):
    return train(_cfg(tmp_path_factory.mktemp("runs")), data_dir=str(mnist_path), quiet=True)


def test_run_folder(run):
    assert {"config.toml", "metrics.jsonl", "best.ck", "last.ck"} <= {p.name for p in run.iterdir()}
    assert latest_run(str(run.parent)) == run.resolve()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "seconds"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[-1]["test_acc"] > 0.93  # a 784-64-10 net with Adam gets there in 2 epochs
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_best_checkpoint_is_chosen_on_validation(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: r["val_acc"])
    meta = load(run / "best.ck").meta
    assert meta["epoch"] == best["epoch"] and meta["val_acc"] == best["val_acc"]
    assert load(run / "last.ck").meta["epoch"] == rows[-1]["epoch"]


def test_same_seed_gives_identical_weights(run, tmp_path, mnist_path):
    again = train(_cfg(tmp_path), data_dir=str(mnist_path), quiet=True)
    a, b = load(run / "last.ck"), load(again / "last.ck")
    for x, y in zip(a.weights + a.biases, b.weights + b.biases):
        assert np.array_equal(x, y)
    other = train(_cfg(tmp_path, seed=4, epochs=1), data_dir=str(mnist_path), quiet=True)
    assert not np.array_equal(load(other / "last.ck").weights[0], a.weights[0])


def test_without_validation_split_best_is_the_last_epoch(tmp_path, mnist_path):
    """docs/training.md: no validation split, best.ck is the last epoch, even when training got worse
    (a resumed second epoch at a far too high rate)."""
    raw = json.loads(json.dumps(SMALL))
    raw["data"] = {"val_split": 0.0}
    raw["train"].update(out=str(tmp_path), epochs=1)
    run = train(from_dict(raw), data_dir=str(mnist_path), quiet=True)
    raw["train"]["epochs"], raw["optim"]["lr"], raw["schedule"] = 2, 0.05, {"name": "constant"}
    # a resume cannot change the plan's lr: the run's own plan says 0.05, constant (config.toml and last.ck
    # agree), so that the second epoch runs at that rate
    plan = from_dict(raw | {"train": raw["train"] | {"epochs": 1}})
    (run / "config.toml").write_text(plan.to_toml())
    ck = load(run / "last.ck")
    ck.meta["config"] = plan.to_dict()
    save(run / "last.ck", ck)
    train(from_dict(raw), data_dir=str(mnist_path), resume=str(run), quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train_acc"] < rows[0]["train_acc"]  # the case that tells the rules apart
    best, last = load(run / "best.ck"), load(run / "last.ck")
    assert best.meta["epoch"] == 2
    assert all(np.array_equal(x, y) for x, y in zip(best.weights + best.biases, last.weights + last.biases))


def test_resume_ignores_the_generator_states_older_files_hold(tmp_path, mnist_path):
    """last.ck needs only (epoch, batch) to resume; the NumPy generator states that older versions saved
    under `resume` are ignored, and the resumed epoch is the one an uninterrupted run trains."""
    def cfg(out, epochs):
        raw = json.loads(json.dumps(SMALL))
        raw["schedule"] = {"name": "constant"}
        raw["train"].update(out=str(out), epochs=epochs, batch_size=1024)
        return from_dict(raw)

    run = train(cfg(tmp_path / "a", 1), data_dir=str(mnist_path), quiet=True)
    ck = load(run / "last.ck")
    pcg = {"bit_generator": "PCG64", "state": {"state": 2**127 + 5, "inc": 2**126 + 1}, "has_uint32": 0,
           "uinteger": 0}
    ck.meta["resume"] |= {"shuffle_rng": pcg, "aug_rng": pcg}
    save(run / "last.ck", ck)
    train(cfg(tmp_path / "a", 2), data_dir=str(mnist_path), resume=str(run), quiet=True)
    full = train(cfg(tmp_path / "b", 2), data_dir=str(mnist_path), quiet=True)
    a, b = load(run / "last.ck"), load(full / "last.ck")
    assert a.meta["epoch"] == b.meta["epoch"] == 2 and "shuffle_rng" not in a.meta["resume"]
    for x, y in zip(a.weights + a.biases, b.weights + b.biases):
        assert np.array_equal(x, y)


def test_validation_split_is_disjoint_and_seeded():
    tr, va = split(60000, 0.1, 0)
    assert len(tr) == 54000 and len(va) == 6000 and not np.intersect1d(tr, va).size
    assert np.array_equal(split(60000, 0.1, 0)[1], va) and not np.array_equal(split(60000, 0.1, 1)[1], va)


def _cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "nn_numba.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_evaluate_cli_agrees_with_training(run, mnist_path):
    r = _cli("evaluate", str(run / "best.ck"), "--json", "--data-dir", str(mnist_path))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["accuracy"] == load(run / "best.ck").meta["test_acc"]
    assert np.array(out["confusion"]).sum() == 10000
    assert abs(sum(np.diag(out["confusion"])) / 10000 - out["accuracy"]) < 1e-12
    text = _cli("evaluate", str(run / "best.ck"), "--data-dir", str(mnist_path)).stdout
    assert "test accuracy" in text and "confusion" in text


def test_info_cli(run):
    r = _cli("info", str(run / "last.ck"), "--json")
    d = json.loads(r.stdout)
    assert d["sizes"] == [784, 64, 10] and d["params"] == 784 * 64 + 64 + 64 * 10 + 10 and d["epoch"] == 2


def test_missing_data_folder_is_one_line(tmp_path):
    r = _cli("train", "configs/seed.toml", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.startswith("nn-numba: error:") and r.stderr.count("\n") == 1
    assert "nowhere" in r.stderr


def test_bad_config_is_one_line(tmp_path):
    (tmp_path / "c.toml").write_text("[train]\nbatch_size = 0\n")
    r = _cli("train", str(tmp_path / "c.toml"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "batch_size" in r.stderr
