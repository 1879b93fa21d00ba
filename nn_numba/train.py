"""The training loop: epochs of mini-batches, an evaluation and a save after each, resume from last.ck.

`train` reads top to bottom: set up (`Session`), then per epoch `run_epoch`, `evaluate_epoch` and
`save_epoch`. What a run has done so far (`Progress`) goes into each checkpoint's META and comes back
out of one, checked, on resume. The kernels are called through trainer.Trainer; run folders are runs.py's.
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numba
import numpy as np
from tqdm import tqdm

from . import __version__, jitcache, kernels, precompile
from .checkpoint import Checkpoint, load, save
from .config import Config, ConfigError, from_dict, load_config
from .data import load_mnist
from .errors import CtrlC, NNError
from .files import write_text_atomic
from .model import MLP, evaluate, n_params
from .optim import SLOTS
from .rng import order as epoch_order
from .rng import split
from .runs import best_row, check_space, is_run, locked, new_run_dir, point_latest, read_metrics, write_metrics
from .schedule import lr_at, planned_epochs
from .trainer import Trainer

# A mini-batch whose mean loss exceeds this many nats has blown up, though it is still finite: a network
# that guesses uniformly scores ln 10 = 2.3, and 100 means the right digit got a probability below e^-100.
# Training stops there as it does on NaN/Inf (docs/training.md).
EXPLODED = 100.0


class Diverged(NNError):
    pass


class Interrupted(NNError):
    exit_code = 130


def set_threads(threads: int) -> int:
    """0 means every core; more threads than Numba can run is clamped (with a note), not an error."""
    limit = numba.config.NUMBA_NUM_THREADS
    if threads < 0:
        raise ConfigError(f"--threads {threads}: must be 0 (all cores) or a positive number")
    n = limit if threads == 0 else threads
    if n > limit:
        tqdm.write(f"note: --threads {threads} is more than the {limit} cores available; using {limit}")
        n = limit
    numba.set_num_threads(n)
    return n


# --------------------------------------------------------------------------------------------------
# What a run has done: into a checkpoint and back out of one


@dataclass
class Progress:
    """Everything of a run besides weights and optimiser state: position, running sums and metrics. (The
    random draws are counter-based, rng.py: the position alone says where they continue.)"""

    epoch: int = 0  # epochs completed
    batch: int = 0  # mini-batches completed of the current epoch
    run_loss: float = 0.0  # summed loss of those mini-batches
    run_correct: int = 0  # and their correct predictions
    history: list[dict] = field(default_factory=list)  # one metrics row per completed epoch
    best_val: float = -1.0  # the best epoch's validation accuracy (-1: none yet, or no validation split)
    wall_time: float = 0.0  # seconds of training so far

    def meta(self, cfg: Config, step: int, extra: dict, resumable: bool) -> dict:
        """A checkpoint's META: the run's config, history and, for last.ck, the state to resume from."""
        m = {"producer": f"nn-numba {__version__}", "created": datetime.now().isoformat(timespec="seconds"),
             "config": cfg.to_dict(), "history": self.history, "best_val_acc": self.best_val, "step": step,
             "wall_time": self.wall_time, **extra}
        if resumable:
            m["resume"] = {"epoch": self.epoch, "batch": self.batch, "run_loss": self.run_loss,
                           "run_correct": self.run_correct}
        return m

    @classmethod
    def from_meta(cls, meta: dict, steps_per_epoch: int, src: str) -> Progress:
        """The progress a last.ck's META records, checked: a damaged or crafted one is an NNError."""
        st = meta.get("resume")
        p = cls(**{k: st.get(k) for k in ("epoch", "batch", "run_loss", "run_correct")},
                history=meta.get("history"), best_val=meta.get("best_val_acc", -1.0),
                wall_time=meta.get("wall_time", 0.0)) if isinstance(st, dict) else None
        if p is None or not p._valid(steps_per_epoch):
            raise NNError(f"cannot resume {src}: its training state is damaged; use another last.ck or start anew")
        return p

    def _valid(self, steps_per_epoch: int) -> bool:
        counts = all(type(v) is int and v >= 0 for v in (self.epoch, self.batch, self.run_correct))
        numbers = all(_number(v) for v in (self.run_loss, self.best_val, self.wall_time))
        return (counts and numbers and self.batch < steps_per_epoch and isinstance(self.history, list)
                and len(self.history) == self.epoch and all(_row_ok(r, i + 1) for i, r in enumerate(self.history)))


def _number(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _row_ok(row: object, epoch: int) -> bool:
    """A metrics row as save_epoch writes it (losses may be null: a NaN/Inf is stored so)."""
    return (isinstance(row, dict) and row.get("epoch") == epoch and _number(row.get("train_acc"))
            and _number(row.get("test_acc")) and ("val_acc" not in row or _number(row["val_acc"])))


def _finite(d: dict) -> dict:
    """Metrics as strict JSON: a NaN/Inf number becomes null (checkpoint META refuses NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# --------------------------------------------------------------------------------------------------
# Resume: which run, which plan


# What a resumed run may change: nothing the schedule or the data order depends on. `epochs` may grow
# (see `extend`); threads, the output root and the data folder do not touch the results.
_FREE = {("train", "threads"), ("train", "out"), ("data", "dir"), ("train", "epochs"), ("schedule", "plan_epochs")}


@dataclass
class Resume:
    """A checkpoint to continue from, and the run folder training goes on in."""

    ck: Checkpoint
    src: str  # as the user named it, for messages
    run: Path | None  # its own run folder; None: a checkpoint of no run, continued in a new run folder
    plan: Config  # the run's config.toml (or the checkpoint's own config)


def open_resume(src: str) -> Resume:
    """The checkpoint `src` names (a run folder: its last.ck) and whether it is its folder's own.

    A folder counts as the run's only if it holds config.toml and last.ck, and they agree on the plan:
    nothing is ever written into a folder that merely contains some checkpoint."""
    p = Path(src)
    if p.is_dir() and not (p / "last.ck").is_file():
        raise NNError(f"cannot resume {src}: it holds no last.ck (give a run folder or its last.ck)")
    ck_path = p / "last.ck" if p.is_dir() else p
    ck = load(ck_path)
    if "resume" not in ck.meta or ck.optim is None:
        raise NNError(f"{ck_path}: holds no training state to resume from (use a run's last.ck)")
    try:
        saved = from_dict(ck.meta["config"], f"{ck_path} (its config)")
    except (KeyError, AttributeError, TypeError, NNError):
        raise NNError(f"cannot resume {src}: its training state is damaged; use another last.ck or start anew") \
            from None
    folder = ck_path.parent.resolve() if ck_path.parent.is_symlink() else ck_path.parent  # runs/latest: the run
    if ck_path.name == "last.ck" and is_run(folder):
        plan = load_config(folder / "config.toml")
        diff = changes(saved, plan)
        if diff:
            key, was, now = diff[0]
            raise NNError(f"cannot resume {src}: its config.toml and last.ck disagree ({key} = {now} in the one, "
                          f"{was} in the other); this folder is not a run that can be continued")
        return Resume(ck, src, folder, plan)
    return Resume(ck, src, None, saved)


def changes(was: Config, now: Config) -> list[tuple[str, str, str]]:
    """The plan keys on which two configs differ: ("[table] key", was, now) as TOML values."""
    a, b = was.to_dict(), now.to_dict()
    return [(f"[{t}] {k}", _show(a[t][k]), _show(b[t][k])) for t in a for k in a[t]
            if (t, k) not in _FREE and a[t][k] != b[t][k]]


def _show(v: object) -> str:
    return repr(v).replace("'", '"')


def resumed_config(r: Resume, given: Config | None, epochs: int | None, **free: object) -> Config:
    """The config a resumed run goes on with: its plan; `given` (a CONFIG argument, with any overrides)
    must agree with it; `epochs` may extend it; threads and out are free."""
    if given is not None:
        diff = changes(r.plan, given)
        if diff:
            key, was, now = diff[0]
            raise NNError(f"cannot resume {r.src}: it was planned with {key} = {was}, the config says {key} = "
                          f"{now}; the data order and the schedule depend on it (leave out CONFIG to continue "
                          "with the run's own config.toml)")
    d = r.plan.to_dict()
    for key, value in free.items():
        if value is not None:
            d["train"][key] = value
    cfg = from_dict(d, "command line")
    return extend(cfg, epochs) if epochs is not None else cfg


def extend(cfg: Config, epochs: int) -> Config:
    """The plan with `epochs` in total: more than planned extends the run (the cosine keeps its span, so
    the epochs added run at min_lr); fewer is refused."""
    if epochs < cfg.train.epochs:
        raise NNError(f"--epochs {epochs}: the run is planned for {cfg.train.epochs} epochs; a resumed run can be "
                      "extended but not shortened (its schedule depends on the total)")
    if epochs > cfg.train.epochs and cfg.schedule.name == "cosine":
        cfg.schedule.plan_epochs = planned_epochs(cfg)
    cfg.train.epochs = epochs
    return cfg


# --------------------------------------------------------------------------------------------------
# One session of training


class Session:
    """The pieces of a run while it trains: data, model, trainer, generators, progress and its folder."""

    def __init__(self, cfg: Config, data_dir: str | None, resume: Resume | None, quiet: bool, name: str | None):
        self.cfg, self.quiet = cfg, quiet
        self.mnist = load_mnist(data_dir, cfg.data.dir or None)
        self.tr_idx, self.va_idx = split(len(self.mnist.train_y), cfg.data.val_split, cfg.train.seed)
        self.y = self.mnist.train_y.astype(np.int64)
        B = cfg.train.batch_size
        self.steps_per_epoch = math.ceil(len(self.tr_idx) / B)
        self.model = MLP.init(cfg.model.sizes, np.random.default_rng([cfg.train.seed, 0]))
        self.trainer = Trainer(cfg, self.model, min(B, len(self.tr_idx)))
        self.progress = Progress()
        if resume is not None:
            self._continue(resume)
        self.run = resume.run if resume is not None and resume.run else new_run_dir(cfg.train.out, name)
        self.written_config = (self.run / "config.toml").read_text() if resume and resume.run else None

    def _continue(self, r: Resume) -> None:
        self.progress = Progress.from_meta(r.ck.meta, self.steps_per_epoch, r.src)
        self.model.params[:] = MLP.from_checkpoint(r.ck).params
        self.trainer.load_optim_state(r.ck.optim)

    def lr(self) -> float:
        return lr_at(self.cfg, self.trainer.step, self.steps_per_epoch)

    def write_config(self) -> None:
        """config.toml says what is being run: written before the checkpoint of a new or extended plan."""
        text = self.cfg.to_toml()
        if text != self.written_config:
            write_text_atomic(self.run / "config.toml", text)
            self.written_config = text

    def save(self, name: str, extra: dict, resumable: bool) -> None:
        self.write_config()
        self.trainer.sync()
        optim = self.trainer.optim_state() if resumable else None
        meta = self.progress.meta(self.cfg, self.trainer.step, extra, resumable)
        save(self.run / name, self.model.to_checkpoint(meta, optim))
        point_latest(self.run)  # only now: `latest` never names a run without a checkpoint

    def diverged(self, where: str, what: str) -> Diverged:
        has = (self.run / "last.ck").is_file()
        kept = (f"the checkpoints in {self.run} are the last good ones" if has else
                "no checkpoint had been saved yet, so there is nothing to resume")
        return Diverged(f"training diverged {where}: {what} (learning rate {self.lr():g}); try a smaller --lr. "
                        f"{kept[0].upper()}{kept[1:]}")

    def resume_hint(self) -> str:
        return f"Resume with: nn-numba train --resume {shlex.quote(str(self.run))}"


# --------------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, data_dir: str | None = None, resume: Resume | str | None = None, quiet: bool = False,
          name: str | None = None, on_epoch: Callable[[dict], None] | None = None) -> Path:
    """Train per `cfg` (continuing `resume`, if given); returns the run folder holding config.toml,
    metrics.jsonl, last.ck and best.ck.

    name: a new run folder's name (default: the time). on_epoch(row) is called after each epoch is saved,
    with its metrics.jsonl row; an exception it raises ends the training there (a sweep's pruner does).
    """
    if isinstance(resume, str | os.PathLike):  # a path, as from the Python API: the same checks as the CLI's
        resume = open_resume(str(resume))
        cfg = resumed_config(resume, cfg, cfg.train.epochs, threads=cfg.train.threads, out=cfg.train.out)
    threads = set_threads(cfg.train.threads)
    with precompile.start(warm_plan(cfg)) as job:  # from an empty cache: workers compile while the data loads
        s = Session(cfg, data_dir, resume, quiet, name)
        with locked(s.run):
            if s.written_config is None:  # a new run folder: its plan first
                s.write_config()
            check_space(s.run, n_params(cfg.model.sizes), SLOTS[cfg.optim.name])
            _announce(s, threads, resume, compiling=bool(job.procs))
            _warm_up(s, resume is not None, job)
            with _SigInt(s) as sigint:
                while s.progress.epoch < cfg.train.epochs:
                    seconds, n_new = run_epoch(s, sigint)
                    row = evaluate_epoch(s, seconds, n_new)
                    save_epoch(s, row)
                    if on_epoch is not None:
                        on_epoch(row)
                    if sigint.hit:
                        raise Interrupted(f"interrupted after epoch {s.progress.epoch}; saved {s.run / 'last.ck'}. "
                                          f"{s.resume_hint()}")
            _done(s)
    return s.run


def run_epoch(s: Session, sigint: _SigInt) -> tuple[float, int]:
    """The rest of the current epoch's mini-batches; (seconds, samples trained). On a first Ctrl-C it
    saves last.ck after the current mini-batch and raises Interrupted."""
    cfg, p, tr, B = s.cfg, s.progress, s.trainer, s.cfg.train.batch_size
    order = epoch_order(s.tr_idx, cfg.train.seed, p.epoch) if cfg.data.shuffle else s.tr_idx
    augment = cfg.augment.enabled
    t0, first = time.perf_counter(), p.batch
    with tqdm(total=len(order), initial=first * B, desc=f"epoch {p.epoch + 1}/{cfg.train.epochs}", unit="img",
              unit_scale=True, leave=True, disable=s.quiet, dynamic_ncols=True) as bar:
        for bi in range(first, s.steps_per_epoch):
            idx = order[bi * B:(bi + 1) * B]
            nb = len(idx)
            if augment:
                xb = tr.augment(s.mnist.train_x, idx, cfg.augment, cfg.train.seed, p.epoch, bi * B)
            else:
                xb = tr.gather(s.mnist.train_x, idx)
            yb = s.y[idx]
            loss = tr.train_step(xb, yb, s.lr(), listed=True)
            if not loss / nb <= EXPLODED:  # also NaN
                raise s.diverged(f"at epoch {p.epoch + 1}, step {bi + 1}", f"the mean loss is {loss / nb:.4g}")
            p.run_loss += loss
            p.run_correct += int((tr.pred[:nb] == yb).sum())
            p.batch = bi + 1
            bar.update(nb)
            if bi % 50 == 0:
                seen = min(p.batch * B, len(order))
                bar.set_postfix_str(f"train loss {p.run_loss / seen:.4f} acc {100 * p.run_correct / seen:.2f}% "
                                    f"({running(cfg)})", refresh=False)
            if sigint.hit and p.batch < s.steps_per_epoch:
                _save_interrupted(s, time.perf_counter() - t0)
    return time.perf_counter() - t0, len(order) - first * B


def _save_interrupted(s: Session, seconds: float) -> None:
    """First Ctrl-C in mid-epoch: last.ck with the finished mini-batches, then exit 130."""
    s.trainer.sync()
    p = s.progress
    if not np.isfinite(s.model.params).all():
        raise s.diverged(f"at epoch {p.epoch + 1}, step {p.batch}", "the weights hold NaN or Inf")
    p.wall_time += seconds
    s.save("last.ck", {"epoch": p.epoch}, resumable=True)
    raise Interrupted(f"interrupted at epoch {p.epoch + 1}, step {p.batch}; saved {s.run / 'last.ck'}. "
                      f"{s.resume_hint()}")


def evaluate_epoch(s: Session, seconds: float, n_new: int) -> dict:
    """The epoch's metrics row: running training loss and accuracy, then validation and test."""
    p, mnist = s.progress, s.mnist
    model = s.trainer.sync()  # the first layer back into the model: evaluation and checkpoints read it
    if not np.isfinite(model.params).all():
        raise s.diverged(f"in epoch {p.epoch + 1}", "the weights hold NaN or Inf")
    n_tr = len(s.tr_idx)
    row = {"epoch": p.epoch + 1, "step": s.trainer.step, "lr": lr_at(s.cfg, s.trainer.step - 1, s.steps_per_epoch),
           "train_loss": p.run_loss / n_tr, "train_acc": p.run_correct / n_tr}
    if len(s.va_idx):
        row["val_loss"], row["val_acc"], _ = evaluate(model, mnist.train_x[s.va_idx], mnist.train_y[s.va_idx])
    row["test_loss"], row["test_acc"], _ = evaluate(model, mnist.test_x, mnist.test_y)
    row["seconds"] = seconds
    row["samples_per_s"] = n_new / seconds if seconds > 0 else 0.0
    p.wall_time += seconds
    return _finite(row)


def save_epoch(s: Session, row: dict) -> None:
    """Record the epoch: best.ck if it is the best so far, last.ck, metrics.jsonl, the epoch line."""
    p = s.progress
    p.history.append(row)
    p.epoch, p.batch, p.run_loss, p.run_correct = p.epoch + 1, 0, 0.0, 0
    summary = {k: v for k, v in row.items() if k.endswith(("_acc", "_loss"))} | {"epoch": p.epoch}
    if best_row(p.history) is row:
        p.best_val = row.get("val_acc", -1.0)
        s.save("best.ck", summary, resumable=False)
    s.save("last.ck", summary, resumable=True)
    # rewritten whole from the history: after a kill between the two writes, resume repairs it
    write_metrics(s.run, p.history)
    if not s.quiet:
        val = f"val {row['val_loss']:.4f} / {100 * row['val_acc']:.2f}%  " if "val_acc" in row else ""
        tqdm.write(f"epoch {p.epoch:3d}  train {row['train_loss']:.4f} / {100 * row['train_acc']:.2f}% "
                   f"({running(s.cfg)})  {val}test {row['test_loss']:.4f} / {100 * row['test_acc']:.2f}%  "
                   f"{row['samples_per_s']:,.0f} img/s  lr {row['lr']:.3g}")


def _announce(s: Session, threads: int, resume: Resume | None, compiling: bool) -> None:
    """The run's header lines; on resume, metrics.jsonl repaired from last.ck if a kill left it behind."""
    cfg, p = s.cfg, s.progress
    if resume is not None and resume.run and read_metrics(s.run) != p.history:
        write_metrics(s.run, p.history)
        if not s.quiet:
            print(f"note: metrics.jsonl did not match last.ck (a run stopped between the two writes); "
                  f"rewrote it from last.ck's {len(p.history)} epochs")
    if s.quiet:
        return
    if resume is not None:
        how = "" if resume.run else f" (from {resume.src}, which is no run folder's last.ck: a new run folder)"
        print(f"resuming {s.run} at epoch {p.epoch + 1}, step {s.trainer.step}{how}")
        if p.epoch >= cfg.train.epochs:
            print(f"note: the run already has {p.epoch} of its {cfg.train.epochs} planned epochs: nothing to do "
                  "(pass --epochs to train longer)")
    print(f"run {s.run}  |  {'-'.join(map(str, cfg.model.sizes))}  {cfg.optim.name} lr {cfg.optim.lr:g}  "
          f"batch {cfg.train.batch_size}  {cfg.train.epochs} epochs  {threads} threads  "
          f"train {len(s.tr_idx)} / val {len(s.va_idx)} / test {len(s.mnist.test_y)}")
    if compiling:
        print(f"compiling kernels (first run only, cached in {jitcache.use()})...", flush=True)
    if cfg.augment.enabled:
        print("augment " + "  ".join(f"{k} {v:g}" for k, v in cfg.augment.active().items()))


def running(cfg: Config) -> str:
    """What the training figures are: means over the epoch's batches so far, as trained: distorted when
    augmenting (so they sit below validation accuracy), and each batch seen with the weights of that moment."""
    return "running mean, augmented" if cfg.augment.enabled else "running mean"


def _warm_up(s: Session, resumed: bool, job: precompile.Job) -> None:
    """Compile (or load from the cache) every kernel of the loop now, with the workers of `job`, so the
    first epoch's clock and images/s measure training."""
    try:
        job.join()
        warm_step(s.trainer, s.cfg, s.mnist.train_x, s.y, s.tr_idx)
    except CtrlC:  # (from the command's handler) nothing was trained in this process
        what = (f"{s.run} is as it was. {s.resume_hint()}" if resumed else
                f"nothing was trained ({s.run} holds only its config.toml)")
        raise Interrupted(f"interrupted before the first step; {what}") from None


def warm_step(tr: Trainer, cfg: Config, X: np.ndarray, y: np.ndarray, idx: np.ndarray) -> None:
    """A gradient-only step (weights and optimiser state stay) on the first 8 samples of idx through the
    kernels of the loop (the batch path of run_epoch) and evaluate()'s gather. 8 and not 1: the loop's
    batches and a batch of 8 give their kernels arrays of one layout, a single sample another."""
    idx = idx[:8]
    kernels.gather(X, idx, kernels.PIXEL, tr.xb[:len(idx)])  # evaluate()'s
    xb = tr.augment(X, idx, cfg.augment, cfg.train.seed, 0, 0) if cfg.augment.enabled else tr.gather(X, idx)
    tr.train_step(xb, y[idx], 0.0, update=False, listed=True)


def warm_plan(cfg: Config) -> list[precompile.Entry]:
    """The kernels `warm_step` calls for this config, with their argument types (precompile.record), from
    stand-in data of the types MNIST and the trainer have."""
    sizes, n = cfg.model.sizes, 8
    tr = Trainer(cfg, MLP(sizes), n)
    X = np.zeros((n, sizes[0]), np.uint8)
    return precompile.record(lambda: warm_step(tr, cfg, X, np.zeros(n, np.int64), np.arange(n, dtype=np.int64)))


def _done(s: Session) -> None:
    if not s.progress.history:
        return
    best = best_row(s.progress.history)
    val = f"validation {100 * best['val_acc']:.2f}%, " if "val_acc" in best else ""
    print(f"done: best epoch {best['epoch']} ({val}test {100 * best['test_acc']:.2f}%) saved in {s.run / 'best.ck'}")


class _SigInt:
    """First Ctrl-C: finish the mini-batch, save, exit 130. Second: stop at once (files stay whole)."""

    def __init__(self, s: Session):
        self.hit, self.s = False, s

    def __enter__(self) -> _SigInt:
        try:
            self.old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. under a test runner's worker)
            self.old = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.hit:
            raise Interrupted(f"stopped at once; the checkpoints in {self.s.run} are the last complete ones. "
                              f"{self.s.resume_hint()}")
        self.hit = True
        tqdm.write("interrupted: finishing this mini-batch and saving (Ctrl-C again to stop at once)")

    def __exit__(self, *exc) -> None:
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)

