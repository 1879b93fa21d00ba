"""The same words for the same things: hints name options that exist, readable `info`, plain `--help`,
errors that say what to do, and training figures labelled for what they are."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import nn_numba.predict as P
from nn_numba.checkpoint import Checkpoint, save
from nn_numba.config import from_dict
from nn_numba.train import train

COMMANDS = ["train", "evaluate", "info", "predict", "serve", "export", "configs", "sweep", "download", "report",
            "bench"]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nn_numba.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "COLUMNS": "100"}, timeout=120)


def _options(command):
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", _cli(command, "--help").stdout))


@pytest.mark.parametrize("command,args", [("evaluate", []), ("info", []), ("predict", ["x.png"]), ("serve", [])])
def test_no_checkpoint_hint_names_what_the_command_takes(tmp_path, command, args):
    r = _cli(command, *args, cwd=tmp_path)  # no runs/ here
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no trained model found" in r.stderr
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", r.stderr))
    assert named <= _options(command), f"{command}'s hint names {named - _options(command)}"
    for cmd in re.findall(r"`nn-numba (\w+)", r.stderr):
        assert cmd in COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_plain_metavars(command):
    text = _cli(command, "--help").stdout
    assert "Usage: " in text
    assert not re.search(r"<(int|float|str|path|bool|list)\b|\{[A-Z]+\}|list\[", text), text  # <int>, {CONFIG}


def test_info_prints_readable_values(tmp_path):
    rng = np.random.default_rng(0)
    ck = Checkpoint([4, 3, 2], [rng.random((3, 4), np.float32), rng.random((2, 3), np.float32)],
                    [np.zeros(3, np.float32), np.zeros(2, np.float32)],
                    {"epoch": 3, "val_acc": 0.5, "config": {"optim": {"name": "adam"}}})  # like best.ck: no OPTM
    save(tmp_path / "best.ck", ck)
    r = _cli("info", str(tmp_path / "best.ck"))
    assert r.returncode == 0, r.stderr
    assert "[" not in r.stdout and "None" not in r.stdout and "'" not in r.stdout
    shown = {k.strip(): v for k, v in (line.split(": ", 1) for line in r.stdout.splitlines())}
    want = {"sections": "META", "optimizer": "adam", "optimizer state": "no", "sizes": "4 3 2", "epoch": "3"}
    assert shown.items() >= want.items()
    d = json.loads(_cli("info", str(tmp_path / "best.ck"), "--json").stdout)
    assert d["sections"] == ["META"] and d["optimizer"] == "adam" and d["optimizer_state"] is False


def test_blank_image_says_what_to_do(tmp_path):
    Image.new("L", (50, 40), 255).save(tmp_path / "white.png")
    with pytest.raises(P.ImageError, match=r"white\.png: no ink found: .*; use a picture of one digit"):
        P.preprocess(tmp_path / "white.png")


def test_training_figures_are_labelled_running_means_over_augmented_batches(tmp_path, mnist_path, capsys):
    cfg = from_dict({"model": {"sizes": [784, 32, 10]}, "augment": {"shift": 1},
                     "train": {"epochs": 1, "batch_size": 512, "out": str(tmp_path)}})
    train(cfg, data_dir=str(mnist_path))
    epoch_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch"))
    assert re.search(r"train [\d.]+ / [\d.]+% \(running mean, augmented\)", epoch_line), epoch_line
