"""`nn-numba sweep`: sweep files, a small study on SQLite with two workers and a pruned trial, a killed
worker, Ctrl-C, the report of a sweep folder, and the same study shared by workers on a real PostgreSQL
server (`.ci/run` starts Debian's and sets NN_NUMBA_TEST_POSTGRES).

The trials train a 784-32-10 network for two epochs at batch 500, so each takes a few seconds.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from nn_numba.config import ConfigError, load_config
from nn_numba.sweep import load_sweep

optuna = pytest.importorskip("optuna")

ROOT = Path(__file__).resolve().parent.parent
TINY = f"""base = "{ROOT / 'configs' / 'no-augment.toml'}"
trials = 3
sampler = "random"
heartbeat_seconds = 1
[set]
model.sizes = [784, 32, 10]
train.epochs = {{epochs}}
train.batch_size = 500
[space]
optim.lr = {{{{choice = [0.003, 0.005, 0.000001]}}}}
[pruner]
startup_trials = 2
"""


def sweep_file(folder: Path, epochs: int = 2) -> Path:
    p = folder / "tiny.sweep.toml"
    p.write_text(TINY.format(epochs=epochs))
    return p


def nn(*args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nn_numba.cli", *map(str, args)], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout)


def start(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nn_numba.cli", *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def study(url: str, name: str = "tiny"):
    return optuna.load_study(study_name=name, storage=url)


def states(s) -> list[str]:
    return [t.state.name for t in sorted(s.trials, key=lambda t: t.number)]


def wait_for(path_glob, folder: Path, seconds: float = 300) -> None:
    t = time.time()
    while not list(folder.glob(path_glob)):
        if time.time() - t > seconds:
            pytest.fail(f"nothing matched {path_glob} in {folder} after {seconds} s")
        time.sleep(0.2)


def test_sweep_file_errors(tmp_path):
    good = sweep_file(tmp_path)
    s = load_sweep(good)
    assert s.name == "tiny" and s.space == {"optim.lr": {"choice": [0.003, 0.005, 0.000001]}}
    assert s.base.model.sizes == [784, 32, 10] and s.base.train.epochs == 2
    bad = {
        'optim.lr = {log = [0.0, 1e-2]}': "LOW > 0",
        'optim.lr = {range = [1e-2, 1e-3]}': "LOW < HIGH",
        'optim.lr = {between = [1, 2]}': "must be one of",
        'optim.speed = {log = [1e-3, 1e-2]}': "unknown config key 'optim.speed'",
        'train.batch_size = {int = [0, 64]}': "batch_size",
        'optim.name = {choice = []}': "non-empty list",
    }
    for line, words in bad.items():
        p = tmp_path / "bad.sweep.toml"
        p.write_text(good.read_text().split("[space]")[0] + "[space]\n" + line + "\n")
        with pytest.raises(ConfigError, match=words) as e:
            load_sweep(p)
        assert "\n" not in str(e.value) and "bad.sweep.toml" in str(e.value)
    p.write_text(good.read_text().replace("trials = 3", "trials = 0"))
    with pytest.raises(ConfigError, match="'trials' must be"):
        load_sweep(p)
    p.write_text(good.read_text().replace("[set]", "[set]\ndata.val_split = 0.0"))
    with pytest.raises(ConfigError, match="no validation split"):
        load_sweep(p)
    r = nn("sweep", tmp_path / "missing.toml", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("nn-numba: error: ") and r.stderr.count("\n") == 1


def test_two_workers_on_sqlite_prune_continue_and_write_the_best_config(tmp_path, mnist_path):
    f = sweep_file(tmp_path)
    url = f"sqlite:///{tmp_path / 'sweeps' / 'tiny' / 'study.db'}"
    (tmp_path / "sweeps" / "tiny").mkdir(parents=True)
    first = optuna.create_study(study_name="tiny", storage=url, direction="maximize")
    first.enqueue_trial({"optim.lr": 0.003})  # known parameters, so that what follows is certain
    first.enqueue_trial({"optim.lr": 0.005})
    r = nn("sweep", f, "--workers", 2, "--trials", 2, "--data-dir", mnist_path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert states(study(url)) == ["COMPLETE", "COMPLETE"]
    # the same command continues the study; a hopeless learning rate is pruned after its first epoch
    study(url).enqueue_trial({"optim.lr": 0.000001})
    r = nn("sweep", f, "--trials", 3, "--data-dir", mnist_path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = study(url)
    assert states(s) == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert list(s.trials[2].intermediate_values) == [1]  # stopped at once, after epoch 1
    assert "trial 2 pruned" in r.stdout and "best: trial" in r.stdout
    folder = tmp_path / "sweeps" / "tiny"
    for t in s.trials:  # each trial is an ordinary run folder that says what it is
        run = Path(t.user_attrs["run"])
        assert run.name == f"tiny-{t.number:03d}" and (run / "best.ck").is_file()
        rec = json.loads((run / "trial.json").read_text())
        assert rec["trial"] == t.number and rec["params"] == t.params and rec["state"] == t.state.name.lower()
        hist = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(hist) == (1 if t.state.name == "PRUNED" else 2)
        assert max(h["val_acc"] for h in hist) == pytest.approx(t.value if t.value is not None else
                                                                t.intermediate_values[1])
    best = load_config(folder / "best.toml")
    assert best.optim.lr == s.best_trial.params["optim.lr"] and best.model.sizes == [784, 32, 10]
    assert best.train.epochs == 2 and best.train.out == "runs"
    # report draws it
    r = nn("report", folder, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    page = (folder / "report" / "report.md").read_text()
    assert "| 2 | pruned |" in page and (folder / "report" / "history.png").stat().st_size > 0
    assert (folder / "report" / "param-optim-lr.png").stat().st_size > 0


def test_a_killed_worker_leaves_the_study_usable(tmp_path, mnist_path):
    f = sweep_file(tmp_path, epochs=6)
    url = f"sqlite:///{tmp_path / 'sweeps' / 'tiny' / 'study.db'}"
    p = start("sweep", f, "--trials", 1, "--data-dir", mnist_path, cwd=tmp_path)
    wait_for("sweeps/tiny/runs/tiny-000/metrics.jsonl", tmp_path)  # mid-trial: one epoch done
    p.kill()
    p.communicate()
    assert states(study(url)) == ["RUNNING"]  # what a killed process leaves in the storage
    time.sleep(3.5)  # 3 heartbeats without a sign of life: the trial is stale
    r = nn("sweep", f, "--trials", 1, "--data-dir", mnist_path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = study(url)
    assert states(s) == ["FAIL", "COMPLETE"]
    assert s.best_trial.number == 1


def test_ctrl_c_stops_every_worker_and_no_trial_in_flight_is_complete(tmp_path, mnist_path):
    f = sweep_file(tmp_path, epochs=30)
    url = f"sqlite:///{tmp_path / 'sweeps' / 'tiny' / 'study.db'}"
    p = start("sweep", f, "--workers", 2, "--trials", 2, "--data-dir", mnist_path, cwd=tmp_path)
    for k in range(2):
        wait_for(f"sweeps/tiny/runs/tiny-00{k}/metrics.jsonl", tmp_path)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, (out, err)
    assert err.startswith("nn-numba: error: stopped before the study had 2 trials") and err.count("\n") == 1, err
    assert "stopping:" in out
    assert states(study(url)) == ["FAIL", "FAIL"]
    for k in range(2):  # each worker saved its run where it stopped
        assert (tmp_path / "sweeps" / "tiny" / "runs" / f"tiny-00{k}" / "last.ck").is_file()


def test_two_worker_processes_share_a_study_on_postgresql(tmp_path, mnist_path):
    url = os.environ.get("NN_NUMBA_TEST_POSTGRES")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("NN_NUMBA_TEST_POSTGRES is not set: .ci/run starts PostgreSQL and sets it")
        pytest.skip("no PostgreSQL here (set NN_NUMBA_TEST_POSTGRES=postgresql://USER:PASSWORD@HOST/DB)")
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    f = sweep_file(tmp_path)
    a = start("sweep", f, "--storage", url, "--name", name, "--trials", 3, "--data-dir", mnist_path, cwd=tmp_path)
    b = start("sweep", f, "--storage", url, "--name", name, "--trials", 3, "--data-dir", mnist_path,
              "--out", tmp_path / "machine-b", cwd=tmp_path)
    for p in (a, b):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    s = study(url.replace("postgresql://", "postgresql+psycopg://"), name)
    try:
        assert 3 <= len(s.trials) <= 4  # both stop once three are finished or running; a race may add one
        assert all(t.state.name in ("COMPLETE", "PRUNED") for t in s.trials)
        runs = {Path(t.user_attrs["run"]).parents[2].name for t in s.trials}  # OUT/NAME/runs/RUN
        assert len(runs) == 2, "both processes ran trials of the one study"
    finally:
        optuna.delete_study(study_name=name, storage=url.replace("postgresql://", "postgresql+psycopg://"))


def test_train_name_names_the_run_folder(tmp_path, mnist_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(f'[model]\nsizes = [784, 32, 10]\n[train]\nepochs = 1\nbatch_size = 500\n'
                   f'out = "{tmp_path / "runs"}"\n')
    for _ in range(2):
        r = nn("train", cfg, "--name", "lr-3e-3", "--quiet", "--data-dir", mnist_path, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["latest", "lr-3e-3", "lr-3e-3-1"]
    for bad in ("a/b", ".hidden", "latest", ""):
        r = nn("train", cfg, "--name", bad, "--data-dir", mnist_path, cwd=tmp_path)
        assert r.returncode == 1 and "a run name is one folder name" in r.stderr and r.stderr.count("\n") == 1


def test_relative_base_resolves_from_the_sweep_file_in_every_worker(tmp_path, mnist_path):
    """A base named relative to the sweep file (as the shipped examples do) is found by the workers too,
    which read the copy kept in the sweep folder, whatever the working directory."""
    files, work = tmp_path / "files", tmp_path / "work"
    files.mkdir(), work.mkdir()
    (files / "mine.toml").write_text((ROOT / "configs" / "no-augment.toml").read_text())
    p = files / "rel.sweep.toml"
    p.write_text(TINY.format(epochs=1).replace(f'"{ROOT / "configs" / "no-augment.toml"}"', '"mine.toml"')
                 .replace("trials = 3", "trials = 1"))
    r = nn("sweep", p, "--out", work / "sweeps", "--data-dir", mnist_path, cwd=work)
    assert r.returncode == 0, r.stderr
    assert [t["state"] for t in json.loads((work / "sweeps" / "rel" / "trials.json").read_text())["trials"]] == [
        "complete"]


@pytest.mark.parametrize("example", sorted((ROOT / "configs").glob("*.sweep.toml")), ids=lambda p: p.name)
def test_shipped_sweep_files_load_from_their_kept_copy(example, tmp_path):
    """The shipped sweep files name their base relative to themselves; the copy kept in a sweep folder (what
    the workers read) must reach the same base."""
    kept = tmp_path / "sweep.toml"
    kept.write_text(example.read_text())
    assert load_sweep(kept).base == load_sweep(example).base


@pytest.mark.parametrize("workers", [1, 2])
def test_a_problem_every_trial_meets_is_said_once_with_its_reason(workers, tmp_path):
    """No data (say): the command prints the reason, not only that a worker stopped."""
    r = nn("sweep", sweep_file(tmp_path), "--workers", workers, "--data-dir", tmp_path / "nothing", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "nothing" in r.stderr and r.stderr.count("nn-numba: error:") == 1, r.stderr


def _ask_all(url: str, n: int, out) -> None:
    """A worker's process: take n queued trials from the study at `url` through nn_numba's storage."""
    from nn_numba.sweep import load_sweep, storage

    sw = load_sweep(out.parent / "tiny.sweep.toml")
    s = optuna.load_study(study_name="tiny", storage=storage(url, sw))
    out.write_text(" ".join(str(s.ask().number) for _ in range(n)))


def test_two_workers_never_take_the_same_queued_trial(tmp_path):
    """SQLite ignores SELECT ... FOR UPDATE, so two workers could both read a queued trial as waiting and
    both run it; the second then fails to report it ("Cannot tell a COMPLETE trial"). Each takes 20 of 40
    queued trials as fast as it can: every trial must go to exactly one of them."""
    import multiprocessing

    sweep_file(tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = optuna.create_study(study_name="tiny", storage=url, direction="maximize")
    for i in range(40):
        first.enqueue_trial({"optim.lr": 0.001 + i * 1e-5})
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"w{i}.txt" for i in range(2)]
    procs = [ctx.Process(target=_ask_all, args=(url, 20, o)) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    taken = [int(n) for o in outs for n in o.read_text().split()]
    assert sorted(taken) == list(range(40))
