"""Run folders: OUT/<name>/ holding config.toml, metrics.jsonl, best.ck and last.ck; the OUT/latest
pointer; which checkpoint a command means; which epoch is best; the lock that keeps one process per run;
the free-space check.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from .errors import NNError
from .files import write_text_atomic


def best_row(history: list[dict]) -> dict:
    """The epoch a run keeps as best.ck (docs/training.md): the highest validation accuracy, the first one
    on ties; without a validation split, the last epoch."""
    if "val_acc" not in history[-1]:
        return history[-1]
    return max(history, key=lambda r: r["val_acc"])


def check_run_name(name: str) -> None:
    """A run name is one folder name: letters, digits, '-', '_' and '.', not starting with '.'."""
    ok = name and len(name) <= 100 and not name.startswith(".") and all(c.isalnum() or c in "-_." for c in name)
    if not ok or name == "latest":
        raise NNError(f"--name {name!r}: a run name is one folder name of letters, digits, '-', '_' and '.' "
                      "(not starting with '.', not 'latest'), e.g. --name lr-3e-3")


def new_run_dir(out: str, name: str | None = None) -> Path:
    """OUT/NAME/ (or OUT/<timestamp>/), created now so an unwritable folder fails before any training; a
    name already taken gets -1, -2, ..."""
    root = Path(out)
    stamp = name or datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(100):
        run = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            run.mkdir(parents=True, exist_ok=False)
            return run
        except OSError as e:
            if isinstance(e, FileExistsError) and run.is_dir():
                continue  # another run of that name, or started this second
            why = "a file is in the way" if isinstance(e, FileExistsError) else e.strerror
            raise NNError(f"cannot create the run folder {run}: {why} (choose another with --out)") from None
    raise NNError(f"cannot create a new run folder in {root}: too many runs named {stamp}")


def is_run(folder: Path) -> bool:
    """A folder that `nn-numba train` made: it holds config.toml and at least one checkpoint."""
    return (folder / "config.toml").is_file() and ((folder / "last.ck").is_file() or (folder / "best.ck").is_file())


def point_latest(run: Path) -> None:
    """OUT/latest -> run (a relative symlink, swapped in atomically). Called once the run has a checkpoint."""
    link = run.parent / "latest"
    tmp = run.parent / f".latest.tmp-{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(run.name)
        os.replace(tmp, link)
        return
    except OSError:
        pass
    try:  # no symlinks here (or `latest` is in the way): a text file naming the run, else nothing
        tmp.unlink(missing_ok=True)
        if not link.is_symlink() and not link.is_dir():
            write_text_atomic(link, run.name + "\n")
    except (OSError, NNError):
        pass  # a convenience only: never fail a run over it


def latest_run(out: str | os.PathLike = "runs") -> Path:
    """The newest run folder, via OUT/latest (a symlink, or a text file naming the run where links fail)."""
    link = Path(out) / "latest"
    if link.is_symlink() or link.is_dir():
        return link.resolve()
    if link.is_file():
        return (link.parent / link.read_text().strip()).resolve()
    raise NNError(f"no runs found in {out}/: run `nn-numba train default` first")


def checkpoint_path(arg: str | os.PathLike | None = None, runs: str | os.PathLike = "runs",
                    name_one: str = "give a checkpoint or run folder") -> Path:
    """The checkpoint a command means: a file as given, a run folder's best.ck, or (None) the best.ck of
    the newest run. `name_one`: how the command takes a checkpoint, for the hint when there is none."""
    if arg is not None and str(arg) != "":
        p = Path(arg)
        if not p.is_dir():
            return p
        if not (p / "best.ck").is_file():
            raise NNError(f"{p} is a folder without best.ck: give a checkpoint file or a run folder")
        return p / "best.ck"
    try:
        ck = latest_run(runs) / "best.ck"
    except NNError:
        ck = None
    if ck is None or not ck.is_file():
        raise NNError(f"no trained model found ({ck or Path(runs) / 'latest'} does not exist): "
                      f"run `nn-numba train default` first, or {name_one}")
    return ck


def write_metrics(run: Path, history: list[dict]) -> None:
    """metrics.jsonl, one JSON object per epoch, rewritten whole (atomically) from the history."""
    write_text_atomic(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def read_metrics(run: Path) -> list[dict] | None:
    """metrics.jsonl's rows, or None if it is missing or not whole JSON lines."""
    try:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None


@contextmanager
def locked(run: Path) -> Iterator[None]:
    """Hold a lock on the run folder while training: a second process that tries to train the same run
    is refused. (flock on the folder itself: no extra file, and the kernel drops it when the process dies.)"""
    try:
        fd = os.open(run, os.O_RDONLY)
    except OSError as e:
        raise NNError(f"cannot open the run folder {run}: {e.strerror} (choose another with --out)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise NNError(f"{run} is being trained by another process right now; wait for it to finish "
                          "(or stop it) before resuming it") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def check_space(folder: Path, n_params: int, slots: int) -> None:
    """Fail before training, not after an hour, if best.ck + last.ck (+ the temp copy of a save) cannot fit."""
    need = 4 * n_params * (1 + 2 * (1 + slots)) + (1 << 20)  # + 1 MB for META, metrics and config
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # unknown: the saves will tell
    if free < need:
        raise NNError(f"not enough free space in {folder}: checkpoints need about {need / 1e6:.1f} MB, "
                      f"{free / 1e6:.1f} MB free (free some space or choose another --out)")
