"""Config files: the shipped ones load, every kind of mistake is one clear ConfigError naming file and key."""

import tomllib

import pytest
from conftest import ROOT

from nn_numba.config import ConfigError, apply_overrides, from_dict, load_config
from nn_numba.schedule import lr_at


@pytest.mark.parametrize("name", ["default", "seed", "no-augment", "best"])
def test_shipped_configs_load(name):
    path = ROOT / "configs" / f"{name}.toml"
    if name == "best" and not path.exists():
        pytest.skip("configs/best.toml not written yet")
    cfg = load_config(path)
    assert cfg.model.sizes[0] == 784 and cfg.model.sizes[-1] == 10


def test_seed_is_the_original_design():
    cfg = load_config(ROOT / "configs" / "seed.toml")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.reduction) == ("sgd", 1e-4, "sum")
    assert cfg.model.sizes == [784, 250, 250, 10]
    assert not (cfg.augment.shift or cfg.augment.rotate or cfg.augment.scale or cfg.augment.elastic_alpha)


def test_resolved_config_round_trips_through_toml():
    cfg = load_config(ROOT / "configs" / "default.toml")
    assert from_dict(tomllib.loads(cfg.to_toml())) == cfg


@pytest.mark.parametrize("text,words", [
    ("[optim]\nlrr = 1\n", "unknown key 'lrr' in [optim]"),
    ("[optimizer]\nlr = 1\n", "unknown table [optimizer]"),
    ("[optim]\nlr = -1\n", "[optim] lr = -1.0 is out of range"),
    ("[optim]\nlr = 0\n", "[optim] lr = 0.0 is out of range"),
    ("[optim]\nlr = \"fast\"\n", "[optim] lr must be a number"),
    ("[optim]\nname = \"rmsprop\"\n", "[optim] name = 'rmsprop' is not one of"),
    ("[optim]\nreduction = \"max\"\n", "[optim] reduction"),
    ("[train]\nbatch_size = 0\n", "[train] batch_size = 0 is out of range"),
    ("[train]\nepochs = 1.5\n", "[train] epochs must be a whole number"),
    ("[train]\nthreads = -2\n", "[train] threads = -2 is out of range"),
    ("[data]\nshuffle = 1\n", "[data] shuffle must be true or false"),
    ("[model]\nsizes = [784, 100]\n", "must start at 784"),
    ("[model]\nsizes = [700, 100, 10]\n", "must start at 784"),
    ("[model]\nsizes = [784, 0, 10]\n", "between 1 and 100000"),
    ("[model]\nsizes = \"784-10\"\n", "[model] sizes must be a list"),
    ("optim = 3\n", "'optim' must be a table"),
    ("[optim\nlr = 1\n", "not valid TOML"),
    ("[optim]\nlr = nan\n", "must be finite"),
    ("[train]\nepochs = 99999999999999\n", "[train] epochs"),
])
def test_bad_config(tmp_path, text, words):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert words in msg and str(p) in msg and "\n" not in msg


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "b.toml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not a text file"):
        load_config(tmp_path / "b.toml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_empty_file_means_all_defaults(tmp_path):
    (tmp_path / "e.toml").write_text("")
    assert load_config(tmp_path / "e.toml") == from_dict({})


def test_overrides_are_checked():
    cfg = from_dict({})
    assert apply_overrides(cfg, epochs=3, lr=0.5, batch_size=7).train.epochs == 3
    with pytest.raises(ConfigError, match="command line: \\[train\\] batch_size = 0"):
        apply_overrides(cfg, batch_size=0)


def test_schedules():
    cfg = from_dict({"optim": {"lr": 1.0}, "train": {"epochs": 10},
                     "schedule": {"name": "cosine", "warmup_epochs": 1, "min_lr": 0.1}})
    assert lr_at(cfg, 0, 100) == pytest.approx(0.01)  # warm-up from lr/steps
    assert lr_at(cfg, 99, 100) == pytest.approx(1.0)
    assert lr_at(cfg, 100, 100) == pytest.approx(1.0)  # cosine starts at the top
    assert lr_at(cfg, 550, 100) == pytest.approx(0.55)  # half way: (lr + min_lr) / 2
    assert lr_at(cfg, 1000, 100) == pytest.approx(0.1)
    step = from_dict({"optim": {"lr": 1.0}, "schedule": {"name": "step", "step_epochs": 2, "gamma": 0.5}})
    assert [lr_at(step, s * 10, 10) for s in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
