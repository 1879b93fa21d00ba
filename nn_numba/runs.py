"""Run folders: OUT/<timestamp>/ holding config.toml, metrics.jsonl, best.ck and last.ck, the OUT/latest
pointer, the checkpoint a command uses by default, atomic text writes and the free-space check.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path

from .errors import NNError


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
                continue  # another run started this second
            why = "a file is in the way" if isinstance(e, FileExistsError) else e.strerror
            raise NNError(f"cannot create the run folder {run}: {why} (choose another with --out)") from None
    raise NNError(f"cannot create a new run folder in {root}: too many runs started this second")

def point_latest(run: Path) -> None:
    """OUT/latest -> run (a relative symlink, swapped in atomically)."""
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

def default_checkpoint(checkpoint: str | None = None, runs: str | os.PathLike = "runs",
                       name_one: str = "pass --checkpoint FILE") -> Path:
    """`checkpoint` if given, else best.ck of the newest run. `name_one`: how the command takes a checkpoint,
    for the hint when there is none."""
    if checkpoint:
        return Path(checkpoint)
    try:
        ck = latest_run(runs) / "best.ck"
    except NNError:
        ck = None
    if ck is None or not ck.is_file():
        raise NNError(f"no trained model found ({ck or Path(runs) / 'latest'} does not exist): "
                      f"run `nn-numba train default` first, or {name_one}")
    return ck

def resolve_checkpoint(path: str | os.PathLike | None = None, runs: str | os.PathLike = "runs") -> Path:
    """A checkpoint file as given, a run folder's best.ck, or (None) best.ck of the newest run."""
    if path is None or str(path) == "":
        return default_checkpoint(None, runs)
    p = Path(path)
    if p.is_dir():
        if not (p / "best.ck").is_file():
            raise NNError(f"{p}: a folder without best.ck, so not a finished run folder; give a run folder "
                          "or a checkpoint file (.ck)")
        return p / "best.ck"
    return p

def write_text_atomic(path: Path, text: str) -> None:
    """`write_atomic` for text, as UTF-8."""
    write_atomic(path, text.encode("utf-8"))

def write_atomic(path: Path, data: bytes, hint: str = "free some space or choose another --out") -> None:
    """Temp file + fsync + rename, like checkpoint.save: `path` is always either the old or the new bytes."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # incl. a second Ctrl-C: leave no temp file behind
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise NNError(f"cannot write {path}: {e.strerror or e}; the previous file, if any, is unchanged "
                          f"({hint})") from None
        raise

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
