"""Resume keeps the run's plan and writes only into the run's own folder; `latest` and divergence.

In-process on real MNIST with a small network (784-32-10, half the training set held out, batch 256), so
that an epoch takes about a second; `cli.train` is called as the command would call it.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from nn_numba import cli, report
from nn_numba.checkpoint import load, save
from nn_numba.config import from_dict, load_config
from nn_numba.errors import NNError
from nn_numba.runs import checkpoint_path, latest_run, locked
from nn_numba.train import train

SMALL = {"model": {"sizes": [784, 32, 10]}, "data": {"val_split": 0.5},
         "optim": {"name": "adam", "lr": 2e-3}, "schedule": {"name": "cosine", "warmup_epochs": 0.5},
         "train": {"epochs": 1, "batch_size": 256, "seed": 3, "threads": 1}}


def cfg(out: Path, **tables) -> object:
    raw = json.loads(json.dumps(SMALL))
    for table, values in tables.items():
        raw[table] = raw.get(table, {}) | values
    raw["train"]["out"] = str(out)
    return from_dict(raw)


def resume(run, mnist, config=None, **over):
    """`nn-numba train [CONFIG] --resume RUN [--epochs ...]`, quiet."""
    args = dict(epochs=None, batch_size=None, lr=None, seed=None, threads=None, out=None) | over
    cli.train(config=config, resume=str(run), data_dir=str(mnist), quiet=True, **args)


def files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def refused(run: Path, mnist_path, match: str, **opts) -> None:
    """Resuming `run` fails with `match` and leaves every file of the run as it was."""
    before = files(run)
    with pytest.raises(NNError, match=match):
        resume(run, mnist_path, **opts)
    assert files(run) == before


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, mnist_path) -> Path:
    return train(cfg(tmp_path_factory.mktemp("runs")), data_dir=str(mnist_path), quiet=True)


@pytest.fixture
def run(one_epoch, tmp_path) -> Path:
    dst = tmp_path / "runs" / "r"
    shutil.copytree(one_epoch, dst)
    return dst


def test_resume_by_folder_without_config_extends_the_plan(run, mnist_path, tmp_path):
    """--resume RUN --epochs 2 with no CONFIG: config.toml, last.ck, metrics.jsonl and report agree after
    it; the epoch past the cosine's planned end runs at min_lr; and the result is bit for bit the run that
    config.toml now describes, trained in one go."""
    resume(run, mnist_path, epochs=2)
    c = load_config(run / "config.toml")
    assert (c.train.epochs, c.schedule.plan_epochs) == (2, 1)
    last = load(run / "last.ck")
    assert last.meta["config"] == c.to_dict() and last.meta["history"] == rows(run)
    hist = rows(run)
    assert [r["epoch"] for r in hist] == [1, 2] and hist[1]["lr"] == c.schedule.min_lr
    lr = report.schedule(c)
    assert [float(lr[r["step"] - 1]) for r in hist] == [r["lr"] for r in hist]
    fresh = train(c, data_dir=str(mnist_path), quiet=True)
    for a, b in zip(load(fresh / "last.ck").weights, last.weights, strict=True):
        assert np.array_equal(a, b)
    before = files(run)
    resume(run, mnist_path)  # nothing to do: nothing rewritten
    assert files(run) == before


def test_a_change_of_plan_is_refused(run, mnist_path, tmp_path):
    before = files(run)
    other = tmp_path / "other.toml"
    text = (run / "config.toml").read_text()
    other.write_text(text.replace("lr = 0.002", "lr = 0.001"))
    with pytest.raises(NNError, match=r"cannot resume .*planned with \[optim\] lr = 0.002, the config says "
                                      r"\[optim\] lr = 0.001.*the schedule depend"):
        resume(run, mnist_path, config=other)
    with pytest.raises(NNError, match=r"\[train\] batch_size = 256"):
        resume(run, mnist_path, batch_size=128)
    with pytest.raises(NNError, match="extended but not shortened"):
        resume(run, mnist_path, epochs=0)
    assert files(run) == before
    resume(run, mnist_path, config=run / "config.toml", threads=2)  # its own config, other threads: fine


def test_a_second_process_on_the_same_run_is_refused(run, mnist_path):
    before = files(run)
    with locked(run), pytest.raises(NNError, match="being trained by another process"):
        resume(run, mnist_path, epochs=2)
    assert files(run) == before


def test_a_checkpoint_in_an_unrelated_folder_is_continued_elsewhere(run, mnist_path, tmp_path):
    """--resume some/folder/snap.ck never writes into some/folder (nor a `latest` beside it)."""
    folder = tmp_path / "some" / "folder"
    folder.mkdir(parents=True)
    shutil.copy(run / "last.ck", folder / "snap.ck")
    (folder / "config.toml").write_text("# my notes\n[train]\nepochs = 7\n")
    (folder / "best.ck").write_bytes(b"not mine")
    (folder / "metrics.jsonl").write_text("{}\n")
    before = files(folder)
    resume(folder / "snap.ck", mnist_path, epochs=2, out=str(tmp_path / "new"))
    assert files(folder) == before and sorted(p.name for p in folder.parent.iterdir()) == ["folder"]
    new = latest_run(tmp_path / "new")
    assert [r["epoch"] for r in rows(new)] == [1, 2] and load_config(new / "config.toml").train.epochs == 2
    # a folder whose config.toml and last.ck disagree is no run to continue either
    shutil.copy(run / "last.ck", folder / "last.ck")
    with pytest.raises(NNError, match="config.toml and last.ck disagree"):
        resume(folder, mnist_path, epochs=2)


def test_metrics_are_repaired_from_last_ck(run, mnist_path, capsys):
    """A SIGKILL between last.ck's and metrics.jsonl's writes: resume rewrites metrics.jsonl from last.ck,
    and `done:` names the best epoch from that history."""
    resume(run, mnist_path, epochs=2)
    hist = rows(run)
    (run / "metrics.jsonl").write_text(json.dumps(hist[0]) + "\n")  # the second epoch's row never landed
    capsys.readouterr()
    resume(run, mnist_path)
    assert rows(run) == hist == load(run / "last.ck").meta["history"]
    best = max(hist, key=lambda r: r["val_acc"])["epoch"]
    assert f"done: best epoch {best} " in capsys.readouterr().out


def test_a_damaged_history_is_refused_before_training(run, mnist_path):
    ck = load(run / "last.ck")
    ck.meta["history"] = [{}]
    save(run / "last.ck", ck)
    refused(run, mnist_path, "training state is damaged", epochs=2)


def test_exploding_loss_stops_and_keeps_the_checkpoints(mnist_path, tmp_path):
    """Plain SGD at lr 10 on the summed loss: the loss explodes (finite at first). A fresh run stops
    without a checkpoint and leaves `latest` on the earlier run; a run with good epochs keeps them."""
    out = tmp_path / "runs"
    sgd = {"name": "sgd", "lr": 1e-4, "reduction": "sum"}
    good = train(cfg(out, optim=sgd, schedule={"name": "constant", "warmup_epochs": 0.0}), data_dir=str(mnist_path),
                 quiet=True)
    bad = cfg(out, optim=sgd | {"lr": 10.0}, schedule={"name": "constant", "warmup_epochs": 0.0})
    with pytest.raises(NNError, match=r"diverged at epoch 1, step \d+: the mean loss is .*No checkpoint") as e:
        train(bad, data_dir=str(mnist_path), quiet=True)
    assert not re.search("nan|inf", str(e.value).split("mean loss is")[1].split()[0])  # stopped while finite
    assert latest_run(out) == good.resolve() and checkpoint_path(None, out) == good.resolve() / "best.ck"
    # the same plan, continued at the exploding rate: its good checkpoints stay as they were
    c = load_config(good / "config.toml")
    c.optim.lr = 10.0
    (good / "config.toml").write_text(c.to_toml())
    ck = load(good / "last.ck")
    ck.meta["config"] = c.to_dict()
    save(good / "last.ck", ck)
    refused(good, mnist_path, "diverged at epoch 2.*are the last good ones", epochs=2)


def test_a_run_folder_is_accepted_wherever_a_checkpoint_is(one_epoch, capsys):
    assert checkpoint_path(one_epoch) == one_epoch / "best.ck"
    cli.info(checkpoint=str(one_epoch), as_json=True)
    assert json.loads(capsys.readouterr().out)["path"] == str(one_epoch / "best.ck")


def test_a_second_ctrl_c_during_a_save_keeps_its_exit_code(one_epoch, tmp_path, monkeypatch):
    """The second Ctrl-C raises Interrupted (exit 130) wherever training is, also inside a checkpoint save:
    the save cleans up and lets it through unchanged, not as a CheckpointError (exit 1)."""
    import os

    from nn_numba.train import Interrupted

    ck = load(one_epoch / "last.ck")

    def second_ctrl_c(fd):
        raise Interrupted("stopped at once")

    monkeypatch.setattr(os, "fsync", second_ctrl_c)
    with pytest.raises(Interrupted) as e:
        save(tmp_path / "last.ck", ck)
    assert e.value.exit_code == 130 and list(tmp_path.iterdir()) == []


def test_resume_through_the_latest_link_keeps_it_pointing_at_the_run(run, mnist_path):
    (run.parent / "latest").symlink_to(run.name)
    resume(run.parent / "latest", mnist_path, epochs=2)
    assert (run.parent / "latest").resolve() == run.resolve() and len(rows(run)) == 2
