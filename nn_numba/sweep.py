"""`nn-numba sweep`: hyperparameter search over config keys, on Optuna ([sweep] extra).

A sweep file names a base config, fixed changes to it and a search space (docs/sweep.md):

    base = "no-augment.toml"          # a path (relative to this file) or a shipped config's name
    trials = 8                        # the study ends when it has this many finished trials
    [set]
    train.epochs = 4
    [space]
    optim.lr = {log = [3e-4, 3e-3]}
    train.batch_size = {choice = [64, 128, 256]}
    [pruner]
    name = "median"                   # median | hyperband | none

Each trial trains an ordinary run folder SWEEP/runs/NAME-TTT/ (report, evaluate and predict work on it) and
reports its validation accuracy after every epoch to the pruner, which may stop it there. The objective
is the run's best validation accuracy. The study lives in an Optuna storage (a SQLite file in the sweep
folder unless --storage names another), which several worker processes and machines can share; this
module only describes the trials, Optuna schedules them.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import time
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config, shipped_names, with_values
from .data import load_mnist
from .errors import NNError
from .runs import write_text_atomic

KINDS = ("log", "range", "int", "choice")
PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random")
TOP_KEYS = {"base", "name", "trials", "sampler", "seed", "heartbeat_seconds", "set", "space", "pruner"}


@dataclass
class Sweep:
    """A checked sweep file."""

    name: str
    base: Config  # the base config with [set] applied
    space: dict[str, dict[str, Any]]  # "optim.lr" -> {"log": [1e-4, 1e-2]}
    trials: int
    sampler: str
    seed: int
    pruner: dict[str, Any]  # name, startup_trials, warmup_epochs
    heartbeat: int  # seconds; a trial silent for 3x this long is marked failed
    text: str  # the file as written, kept in the sweep folder


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and check a sweep file; every problem is a one-line ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file (see configs/no-augment.sweep.toml)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not a readable TOML sweep file: {e}") from None
    src = str(path)
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise ConfigError(f"{src}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(TOP_KEYS))})")
    if not isinstance(raw.get("base"), str):
        raise ConfigError(f"{src}: 'base' must name the config to start from, e.g. base = \"no-augment.toml\"")
    base = Path(raw["base"])
    if not base.is_absolute() and (path.parent / base).exists():
        base = path.parent / base
    elif not base.exists() and base.suffix == ".toml" and base.stem in shipped_names():
        base = Path(base.stem)  # the shipped config the file names, also from a copy kept elsewhere
    cfg = with_values(load_config(base), flatten(raw.get("set", {}), f"{src} [set]"), f"{src} [set]")
    space = {k: check_range(k, v, cfg, src) for k, v in flatten(raw.get("space", {}), f"{src} [space]").items()}
    if not space:
        raise ConfigError(f"{src}: [space] is empty: give at least one key to search, "
                          "e.g. optim.lr = {log = [1e-4, 1e-2]}")
    if cfg.data.val_split <= 0:
        raise ConfigError(f"{src}: the sweep chooses on validation accuracy, but the base config has no "
                          "validation split: set data.val_split = 0.1 in [set]")
    pruner = {"name": "median", "startup_trials": 3, "warmup_epochs": 0} | raw.get("pruner", {})
    checks = [
        (whole(raw.get("trials", 20), 1), "'trials' must be a whole number >= 1"),
        (raw.get("sampler", "tpe") in SAMPLERS, f"'sampler' must be one of {', '.join(SAMPLERS)}"),
        (whole(raw.get("seed", 0), 0), "'seed' must be a whole number >= 0"),
        (whole(raw.get("heartbeat_seconds", 10), 1), "'heartbeat_seconds' must be a whole number >= 1"),
        (pruner["name"] in PRUNERS and set(pruner) <= {"name", "startup_trials", "warmup_epochs"},
         f"[pruner] takes name ({', '.join(PRUNERS)}), startup_trials and warmup_epochs"),
        (whole(pruner["startup_trials"], 0) and whole(pruner["warmup_epochs"], 0),
         "[pruner] startup_trials and warmup_epochs must be whole numbers >= 0"),
    ]
    for ok, why in checks:
        if not ok:
            raise ConfigError(f"{src}: {why}")
    name = raw.get("name", path.name.removesuffix(".toml").removesuffix(".sweep"))
    return Sweep(name, cfg, space, raw.get("trials", 20), raw.get("sampler", "tpe"), raw.get("seed", 0), pruner,
                 raw.get("heartbeat_seconds", 10), text)


def whole(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def flatten(table: Any, src: str) -> dict[str, Any]:
    """{"optim": {"lr": X}} (what TOML makes of `optim.lr = X`) -> {"optim.lr": X}."""
    if not isinstance(table, dict):
        raise ConfigError(f"{src} must be a table of TABLE.KEY = ... lines")
    out = {}
    for table_name, keys in table.items():
        if not isinstance(keys, dict):
            raise ConfigError(f"{src}: '{table_name}' is not TABLE.KEY: write e.g. optim.lr = ...")
        for key, value in keys.items():
            out[f"{table_name}.{key}"] = value
    return out


def check_range(key: str, spec: Any, cfg: Config, src: str) -> dict[str, Any]:
    """One search-space entry, checked: its kind, its bounds, and that both ends give a valid config."""
    where = f"{src} [space] {key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{where} must be one of {{log = [LOW, HIGH]}}, {{range = [LOW, HIGH]}}, "
                          "{int = [LOW, HIGH]}, {choice = [A, B, ...]}")
    kind, v = next(iter(spec.items()))
    ok = isinstance(v, list) and len(v) >= 1
    if kind != "choice":
        number = all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        ok = ok and len(v) == 2 and number and v[0] < v[1] and (kind != "log" or v[0] > 0)
        ok = ok and (kind != "int" or all(isinstance(x, int) for x in v))
    if not ok:
        need = "a non-empty list" if kind == "choice" else "[LOW, HIGH] with LOW < HIGH"
        raise ConfigError(f"{where} = {spec!r}: needs {need}{' and LOW > 0' if kind == 'log' else ''}")
    for value in v:  # every end of the range must make a valid config
        with_values(cfg, {key: value}, where)
    return {kind: v}


def suggest(trial: Any, key: str, spec: dict[str, Any]) -> Any:
    kind, v = next(iter(spec.items()))
    if kind == "choice":
        return trial.suggest_categorical(key, v)
    if kind == "int":
        return trial.suggest_int(key, v[0], v[1])
    return trial.suggest_float(key, float(v[0]), float(v[1]), log=kind == "log")


# ----------------------------------------------------------------------------------------------------
# the study


def optuna_module():
    try:
        import optuna
    except ImportError:
        raise NNError("sweep needs the optional packages: pip install 'nn-numba[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is said once, by this module
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the heartbeat's
    return optuna


def storage(url: str, sweep: Sweep):
    """An Optuna storage: an SQL database URL, or a journal file (a path ending in .log)."""
    optuna = optuna_module()
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    if url.startswith(("postgresql://", "postgres://")):  # the driver the [sweep] extra installs
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    kw = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(3):  # workers that meet an empty database at once race to create its tables
        try:
            st = optuna.storages.RDBStorage(url, engine_kwargs=kw, heartbeat_interval=sweep.heartbeat,
                                            grace_period=3 * sweep.heartbeat)
            if url.startswith("sqlite"):
                immediate(st.engine)
            return st
        except Exception as e:  # the drivers' own errors (no server, wrong password, unknown driver)
            if attempt == 2 or "already exists" not in str(e) and "duplicate key" not in str(e):
                raise NNError(f"cannot open the study storage {redact(url)}: {str(e).splitlines()[0]}") from None
            time.sleep(1 + attempt)


def immediate(engine) -> None:
    """Make every transaction on a SQLite engine take the database's write lock when it begins. Optuna
    checks a trial's state and changes it in one transaction with SELECT ... FOR UPDATE, which SQLite
    ignores: two workers could both see a queued trial waiting and both run it. SQLAlchemy's recipe for
    pysqlite: no implicit BEGIN from the driver, and BEGIN IMMEDIATE from SQLAlchemy."""
    from sqlalchemy import event

    event.listen(engine, "connect", lambda conn, _: setattr(conn, "isolation_level", None))
    event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    engine.dispose()  # the connections opened so far (to create the tables) began the old way


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("@")
    if not sep or "://" not in head:
        return url
    scheme, _, auth = head.partition("://")
    return f"{scheme}://{auth.split(':')[0]}:***@{tail}"


def open_study(sweep: Sweep, url: str, stream: int = 0):
    """The study (created on first use). `stream` tells the workers' samplers apart: with one seed each
    they would all propose the same first parameters."""
    optuna = optuna_module()
    pruners = {
        "median": lambda p: optuna.pruners.MedianPruner(n_startup_trials=p["startup_trials"],
                                                        n_warmup_steps=p["warmup_epochs"]),
        "hyperband": lambda p: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=sweep.base.train.epochs),
        "none": lambda p: optuna.pruners.NopPruner(),
    }
    seed = sweep.seed + 1000 * stream
    sampler = (optuna.samplers.TPESampler(seed=seed) if sweep.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    return optuna.create_study(study_name=sweep.name, storage=storage(url, sweep), direction="maximize",
                               sampler=sampler, pruner=pruners[sweep.pruner["name"]](sweep.pruner),
                               load_if_exists=True)


def counted(study) -> int:
    """Trials that count towards the total: finished ones and those running now. A trial whose process
    has not been heard of for 3 heartbeats (a killed worker's) is marked failed first, so it counts no more."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    fail_stale_trials(study)
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                         TrialState.RUNNING)))


def objective(trial, sweep: Sweep, folder: Path, threads: int, data_dir: str | None) -> float:
    """Train one run with the trial's parameters; the pruner sees every epoch's validation accuracy."""
    import optuna

    from .train import Diverged, train

    params = {k: suggest(trial, k, spec) for k, spec in sweep.space.items()}
    runs = (folder / "runs").resolve()
    cfg = with_values(sweep.base, params | {"train.threads": threads, "train.out": str(runs)}, f"trial {trial.number}")
    name = f"{sweep.name}-{trial.number:03d}"
    trial.set_user_attr("run", str(runs / name))
    best = -1.0

    def on_epoch(row: dict) -> None:
        nonlocal best
        acc = row.get("val_acc")
        best = max(best, acc if isinstance(acc, float) else -1.0)
        trial.report(best, row["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"epoch {row['epoch']}: validation {100 * best:.2f}% is below the median")

    state = "failed"
    try:
        run = train(cfg, data_dir=data_dir, quiet=True, name=name, on_epoch=on_epoch)
        trial.set_user_attr("run", str(run))
        state = "complete"
        return best
    except optuna.TrialPruned:
        state = "pruned"
        raise
    except Diverged as e:  # a learning rate too high for the rest: a result of the search, not an error
        state = "pruned"
        raise optuna.TrialPruned(f"diverged: {e}") from None
    finally:
        run = Path(trial.user_attrs["run"])
        if run.is_dir():
            record = {"study": sweep.name, "trial": trial.number, "params": params, "state": state,
                      "best_val_acc": best if best >= 0 else None}
            write_text_atomic(run / "trial.json", json.dumps(record, indent=1) + "\n")


def worker(sweep: Sweep, folder: str, url: str, threads: int, data_dir: str | None, total: int,
           stream: int) -> None:
    """Run trials until the study has `total` of them; a process of its own when there are several workers."""
    import sys

    own_group = stream > 0
    if own_group:
        os.setpgrp()  # Ctrl-C reaches the parent only, which passes one SIGINT on to each worker
    try:
        earlier = len(open_study(sweep, url).get_trials(deepcopy=False))
        study = open_study(sweep, url, stream + 7 * earlier)  # a re-run does not repeat the first proposals
        while counted(study) < total:
            study.optimize(lambda t: objective(t, sweep, Path(folder), threads, data_dir), n_trials=1,
                           callbacks=[say])
    except NNError as e:  # Ctrl-C in a trial (Interrupted, 130) or a problem every trial would meet
        if e.exit_code != 130 and not own_group:
            raise  # the one worker runs in the command's process: its reason is the command's
        if e.exit_code != 130:
            print(f"nn-numba: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None


def say(study, trial) -> None:
    """One line per finished trial."""
    acc = trial.value if trial.value is not None else max(trial.intermediate_values.values(), default=None)
    got = "" if acc is None else f" at validation {100 * acc:.2f}%"
    print(f"trial {trial.number} {trial.state.name.lower()}{got}: "
          f"{', '.join(f'{k} = {fmt(v)}' for k, v in trial.params.items())}", flush=True)


# ----------------------------------------------------------------------------------------------------
# the command


def sweep(sweep_file: str, trials: int | None = None, workers: int = 1, storage_url: str | None = None,
          name: str | None = None, out: str = "sweeps", data_dir: str | None = None) -> Path:
    """`nn-numba sweep`: run the study to its number of trials, then print the table and write best.toml."""
    optuna_module()
    if workers < 1:
        raise NNError(f"--workers {workers}: give 1 or more")
    sw = load_sweep(sweep_file)
    sw.name = name or sw.name
    folder = Path(out) / sw.name
    keep_sweep_file(folder, sw, sweep_file)
    url = storage_url or f"sqlite:///{(folder / 'study.db').resolve()}"
    total = trials or sw.trials
    study = open_study(sw, url)  # creates it, once, before the workers race to
    load_mnist(data_dir, sw.base.data.dir or None)  # present and intact (or downloaded) once, not by each worker
    done = counted(study)
    import numba

    threads = max(1, numba.config.NUMBA_NUM_THREADS // workers)
    print(f"sweep {sw.name}: {done} of {total} trials done; {workers} worker(s) x {threads} thread(s); "
          f"storage {redact(url)}", flush=True)
    code = run_workers(sw, folder, url, threads, data_dir, total, workers)
    study = open_study(sw, url)
    print(table(study))
    write_results(study, sw, folder)
    if code == 130:
        from .train import Interrupted

        raise Interrupted(f"stopped before the study had {total} trials; run the same command again to go on")
    if code:
        raise NNError(f"a worker stopped with exit code {code}; a trial it left running is marked failed "
                      f"after {3 * sw.heartbeat} s: run the same command again to go on")
    return folder


def keep_sweep_file(folder: Path, sw: Sweep, source: str) -> None:
    """SWEEP/sweep.toml: the file the study was started with; a different one under the same name is refused."""
    kept = folder / "sweep.toml"
    if kept.exists():
        if kept.read_text(encoding="utf-8") != sw.text:
            raise NNError(f"{folder} holds another sweep file than {source}: give this sweep another --name, "
                          "or run it with the sweep.toml kept there")
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NNError(f"cannot create the sweep folder {folder}: {e.strerror} (choose another --out)") from None
    write_text_atomic(kept, sw.text)


def run_workers(sw: Sweep, folder: Path, url: str, threads: int, data_dir: str | None, total: int,
                workers: int) -> int:
    """Run the workers (in this process when there is one) on the sweep as the command read it; the first bad
    exit code, 0 if none."""
    if workers == 1:
        try:
            worker(sw, str(folder), url, threads, data_dir, total, 0)
        except SystemExit as e:
            return int(e.code or 0)
        return 0
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(sw, str(folder), url, threads, data_dir, total, k + 1))
             for k in range(workers)]
    for p in procs:
        p.start()

    def stop(signum, frame):
        print("stopping: each worker finishes its mini-batch, saves, and marks its trial failed", flush=True)
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)

    old = signal.signal(signal.SIGINT, stop)
    try:
        for p in procs:
            p.join()
    finally:
        signal.signal(signal.SIGINT, old)
    return next((p.exitcode if p.exitcode > 0 else 128 - p.exitcode for p in procs if p.exitcode), 0)


def table(study) -> str:
    """The trials, one line each: number, state, best validation accuracy, parameters, run folder."""
    keys = sorted({k for t in study.trials for k in t.params})
    head = ["trial", "state", "val_acc", *keys, "run"]
    rows = [head]
    for t in study.trials:
        acc = t.value if t.value is not None else (max(t.intermediate_values.values())
                                                   if t.intermediate_values else None)
        rows.append([str(t.number), t.state.name.lower(), "" if acc is None else f"{100 * acc:.2f}%",
                     *(fmt(t.params.get(k)) for k in keys), Path(t.user_attrs.get("run", "")).name])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def fmt(v: Any) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def write_results(study, sw: Sweep, folder: Path) -> None:
    """SWEEP/trials.json (what `report` draws) and, once a trial is complete, SWEEP/best.toml."""
    from optuna.trial import TrialState

    trials = [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
               "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
               "run": t.user_attrs.get("run")} for t in study.trials]
    space = {k: next(iter(v)) for k, v in sw.space.items()}
    write_text_atomic(folder / "trials.json", json.dumps({"study": sw.name, "space": space, "trials": trials},
                                                         indent=1) + "\n")
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        print("no trial is complete yet: no best config")
        return
    best = study.best_trial
    cfg = with_values(sw.base, best.params, "best trial")
    cfg.train.out = "runs"
    head = (f"# The best of sweep {sw.name}: trial {best.number}, validation accuracy {100 * best.value:.2f}%.\n"
            f"# {', '.join(f'{k} = {fmt(v)}' for k, v in best.params.items())}\n\n")
    write_text_atomic(folder / "best.toml", head + cfg.to_toml())
    print(f"best: trial {best.number}, validation {100 * best.value:.2f}%: "
          f"{', '.join(f'{k} = {fmt(v)}' for k, v in best.params.items())}\n"
          f"wrote {folder / 'best.toml'} (train it with: nn-numba train {folder / 'best.toml'})")
