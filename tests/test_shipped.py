"""Configs that ship with the package: loaded by name from any folder, one copy in the repository,
`nn-numba configs` lists, prints and copies them; a wrong name says which ones exist."""

import subprocess

import pytest
from conftest import ROOT

from nn_numba.config import SHIPPED, ConfigError, load_config, shipped_names

NAMES = ["default", "best", "no-augment", "seed"]


@pytest.fixture
def nn(nn_main):
    """nn("export", ...): the command in this process (conftest.nn_main)."""
    return nn_main


def test_names_load_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped_names() == NAMES
    for name in NAMES:
        assert load_config(name) == load_config(ROOT / "configs" / f"{name}.toml")
    assert load_config("seed").optim.name == "sgd" and load_config("default").augment.enabled


def test_a_file_of_that_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").write_text("[train]\nepochs = 3\n")
    assert load_config("default").train.epochs == 3  # a path works as it always did
    (tmp_path / "seed").mkdir()  # a folder of that name is not a config: the shipped one is meant
    assert load_config("seed").optim.name == "sgd"


def test_unknown_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config("defualt")
    assert str(e.value) == "no such config file defualt: give a path or one of: default, best, no-augment, seed"
    with pytest.raises(ConfigError, match="one of: default, best"):
        load_config("configs/default.toml")  # the repository's path, from a folder that lacks it


def test_one_copy_of_each_config_in_the_repository():
    """configs/ is a symlink to the package's folder, so configs/default.toml still works in the repository."""
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == SHIPPED.resolve()
    tracked = subprocess.run(["git", "ls-files", "*.toml"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    names = [p.rsplit("/", 1)[-1] for p in tracked.stdout.split()]
    assert sorted(n for n in names if n[:-5] in NAMES) == sorted(f"{n}.toml" for n in NAMES)


def test_configs_lists_prints_and_copies(tmp_path, nn):
    code, out, _ = nn("configs")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[:4]] == NAMES
    assert "Adam on the mean loss" in out  # default.toml's opening comment
    code, out, _ = nn("configs", "seed")
    assert code == 0 and out == (SHIPPED / "seed.toml").read_text()
    code, out, _ = nn("configs", "best", "--to", tmp_path / "mine.toml")
    assert code == 0 and (tmp_path / "mine.toml").read_bytes() == (SHIPPED / "best.toml").read_bytes()
    assert nn("configs", "seed", "--to", tmp_path)[0] == 0  # into a folder: under its own name
    assert (tmp_path / "seed.toml").read_bytes() == (SHIPPED / "seed.toml").read_bytes()


def one_line_error(code: int, err: str) -> str:
    assert code == 1 and err.startswith("nn-numba: error: ") and err.count("\n") == 1, err
    return err


def test_configs_never_overwrites_and_names_what_exists(tmp_path, nn):
    mine = tmp_path / "mine.toml"
    mine.write_text("# my recipe\n")
    assert "already exists" in one_line_error(*nn("configs", "default", "--to", mine)[::2])
    assert mine.read_text() == "# my recipe\n"
    assert "one of default, best, no-augment, seed" in one_line_error(*nn("configs", "defualt")[::2])
    assert "needs a NAME" in one_line_error(*nn("configs", "--to", mine)[::2])


def test_train_by_name_from_an_empty_folder_fails_only_on_the_data(tmp_path, monkeypatch, nn):
    """The name resolves to the shipped file before any data is read (the wheel test trains for real)."""
    monkeypatch.chdir(tmp_path)
    err = one_line_error(*nn("train", "no-augment", "--data-dir", tmp_path / "nowhere", "--out", tmp_path)[::2])
    assert "nowhere" in err and "config" not in err
