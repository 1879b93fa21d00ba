"""The training loop: data split, mini-batches, schedule, metrics, run folders, checkpoints and resume.

All arithmetic happens in kernels.py; this file only orchestrates. Per mini-batch the Python work is one
gather (or augmentation) call and one `train_step` call into compiled code.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import numba
import numpy as np
from tqdm import tqdm

from . import __version__, jitcache, kernels
from .checkpoint import SLOTS, Checkpoint, OptimState, load, save
from .config import Config, ConfigError, check, from_dict
from .errors import CtrlC, NNError
from .model import MLP, evaluate, n_params
from .rng import order as epoch_order
from .rng import split
from .runs import best_row, check_space, new_run_dir, point_latest, write_text_atomic
from .schedule import lr_at

KINDS = {"sgd": kernels.SGD, "momentum": kernels.MOMENTUM, "adam": kernels.ADAM}


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


class Trainer:
    """Model, optimiser state and the reusable buffers of one training run.

    While batches are sparse (MNIST's are) the first layer's weights, gradient and moments are trained
    in a transposed copy (wt, gt, mt, vt; kernels.train_step says why). `sync` writes them back into the
    model and the flat arrays, which checkpoints, evaluation and the tests read: call it before reading
    any of those. After changing those from outside, call `load`.
    """

    def __init__(self, cfg: Config, model: MLP, batch_cap: int):
        self.cfg, self.model = cfg, model
        self.kind = KINDS[cfg.optim.name]
        n = model.params.size
        zeros = kernels.aligned_zeros  # 64-byte aligned rows: 10-25 % faster products (docs/performance.md)
        self.grad = zeros(n)
        self.m = zeros(n)
        self.v = zeros(n)
        sizes = model.sizes
        shape_t = (sizes[0], kernels.pad_t(sizes[1]))
        self.wt, self.gt, self.mt, self.vt = (zeros(shape_t) for _ in range(4))
        self.where = np.zeros(1, np.int64)  # 0: the flat arrays hold the first layer, 1: the transposed ones
        self.step = 0
        self.cap = batch_cap
        self.acts = zeros(kernels.acts_size(sizes, batch_cap))
        self.d0 = zeros(kernels.grad_size(sizes, batch_cap))
        self.d1 = zeros(kernels.grad_size(sizes, batch_cap))
        self.ws = zeros(kernels.ws_size(max(sizes[1:]), batch_cap))
        self.nz = kernels.nonzeros_bufs(batch_cap, sizes[0])
        self.loss = np.zeros(batch_cap, np.float32)
        self.pred = np.zeros(batch_cap, np.int64)
        self.xb = zeros((batch_cap, sizes[0]))

    def load(self) -> None:
        """Take the first layer from the model and the flat arrays again (after they were set from outside)."""
        self.where[0] = 0

    def sync(self) -> MLP:
        """Make the model and the flat arrays current (the first layer back from its transposed copy)."""
        if self.where[0] == 1:  # both copies agree afterwards; training goes on from the transposed one
            kernels.move_first(self.model.params, self.grad, self.m, self.v, self.wt, self.gt, self.mt, self.vt,
                               self.model.sizes_arr, False)
        return self.model

    def gather(self, X_u8: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """The mini-batch X_u8[idx] / 255 into self.xb (returned, (B, n_0)), with its non-zero pixels listed
        for the next train_step(..., rows=True) in the same pass (kernels.gather_nonzeros)."""
        xb = self.xb[:len(idx)]
        if X_u8.shape[1] % 8 or not X_u8.flags.c_contiguous:
            kernels.gather(X_u8, idx, kernels.PIXEL, xb)
            kernels.nonzeros(xb, *self.nz[:3])
        else:
            kernels.gather_nonzeros(X_u8, X_u8.view(np.uint64), idx, kernels.PIXEL, xb, *self.nz[:3])
        return xb

    def train_step(self, X: np.ndarray, y: np.ndarray, lr: float, update: bool = True, rows: bool = False) -> float:
        """One optimiser step on float32 inputs X (B, n_0) and int64 labels y (B,); the summed loss.

        update=False computes loss and gradients only (into self.grad, after `sync`): weights and optimiser
        state stay as they are. An update step fuses the gradient into the optimiser step and leaves the
        gradient stale. rows=True: X is the batch `gather` just wrote, whose non-zeros it listed.
        """
        o, B = self.cfg.optim, len(y)
        self.step += update
        t = max(self.step, 1)
        c1 = 1.0 / (1.0 - o.beta1**t)
        c2 = 1.0 / (1.0 - o.beta2**t)
        scale = 1.0 / B if o.reduction == "mean" else 1.0
        return kernels.train_step(self.model.params, self.grad, self.m, self.v, self.wt, self.gt, self.mt, self.vt,
                                  self.where, self.model.sizes_arr, X, y, self.acts, self.cap, self.d0, self.d1,
                                  self.ws, self.nz, rows, self.loss[:B], self.pred[:B],
                                  self.kind if update else kernels.NO_UPDATE, lr, o.momentum, o.nesterov,
                                  o.weight_decay, o.beta1, o.beta2, o.eps, c1, c2, scale)

    def optim_state(self) -> OptimState:
        self.sync()
        slots = {kernels.SGD: [], kernels.MOMENTUM: [self.m], kernels.ADAM: [self.m, self.v]}[self.kind]
        return OptimState(self.cfg.optim.name, self.step, [_split_flat(self.model, s) for s in slots])

    def load_optim_state(self, st: OptimState | None) -> None:
        if st is None or st.kind != self.cfg.optim.name:
            raise NNError(f"cannot resume: the checkpoint's optimiser state is {st.kind if st else 'missing'}, "
                          f"the config asks for {self.cfg.optim.name}")
        for flat, arrays in zip((self.m, self.v), st.slots):
            flat[:] = np.concatenate([a.ravel() for a in arrays])
        self.step = st.step
        self.load()


def _split_flat(model: MLP, flat: np.ndarray) -> list[np.ndarray]:
    """A flat parameter-shaped array as [W1, b1, W2, b2, ...] copies."""
    out = []
    for l in range(len(model.sizes) - 1):
        W, b = kernels._views(flat, model.sizes_arr, l)
        out += [W.copy(), b.copy()]
    return out


def to_checkpoint(model: MLP, meta: dict, optim: OptimState | None = None) -> Checkpoint:
    return Checkpoint(list(model.sizes), [W.copy() for W in model.weights], [b.copy() for b in model.biases],
                      meta, optim)


def _finite(d: dict) -> dict:
    """Metrics as strict JSON: a NaN/Inf number becomes null (checkpoint META refuses NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


class _SigInt:
    """First Ctrl-C: finish the mini-batch, save, exit 130. Second: stop at once (files stay whole)."""

    def __init__(self, run: Path):
        self.hit, self.run = False, run

    def __enter__(self):
        try:
            self.old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. under a test runner's worker)
            self.old = None
        return self

    def _handle(self, signum, frame):
        if self.hit:
            raise Interrupted(f"stopped at once; the checkpoints in {self.run} are the last complete ones. "
                              f"Resume with: nn-numba train CONFIG --resume {self.run}")
        self.hit = True
        tqdm.write("interrupted: finishing this mini-batch and saving (Ctrl-C again to stop at once)")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def train(cfg: Config, data_dir: str | None = None, resume: str | None = None, quiet: bool = False,
          name: str | None = None, on_epoch: Callable[[dict], None] | None = None) -> Path:
    """Train per `cfg`; returns the run folder holding config.toml, metrics.jsonl, last.ck and best.ck.

    name: the run folder's name (default: the time). on_epoch(row) is called after each epoch is saved,
    with its metrics.jsonl row; an exception it raises ends the training there (a sweep's pruner does).
    """
    from .augment import Augment, augment_batch
    from .data import load_mnist

    threads = set_threads(cfg.train.threads)
    start_ck = None
    if resume:
        start_ck, run = _resume_source(resume)
        st = _check_resume(start_ck, cfg, resume)
    mnist = load_mnist(data_dir, cfg.data.dir or None)
    tr_idx, va_idx = split(len(mnist.train_y), cfg.data.val_split, cfg.train.seed)
    B = cfg.train.batch_size
    steps_per_epoch = math.ceil(len(tr_idx) / B)
    if not resume:
        run = new_run_dir(cfg.train.out, name)
    try:
        write_text_atomic(run / "config.toml", cfg.to_toml())
    except OSError as e:
        raise NNError(f"cannot write to the run folder {run}: {e.strerror} (choose another with --out)") from None
    point_latest(run)
    check_space(run, n_params(cfg.model.sizes), SLOTS[cfg.optim.name])

    model = MLP.init(cfg.model.sizes, np.random.default_rng([cfg.train.seed, 0]))
    trainer = Trainer(cfg, model, min(B, len(tr_idx)))
    aug = Augment(**asdict(cfg.augment))
    history: list[dict] = []
    epoch, batch0, run_loss, run_correct, best_val, elapsed = 0, 0, 0.0, 0, -1.0, 0.0
    if start_ck is not None:
        model.params[:] = MLP.from_checkpoint(start_ck).params
        trainer.load_optim_state(start_ck.optim)
        epoch, batch0 = st["epoch"], st["batch"]
        run_loss, run_correct = float(st["run_loss"]), st["run_correct"]
        if batch0 >= steps_per_epoch:
            raise NNError(f"cannot resume {resume}: its training state is damaged (batch {batch0} of an "
                          f"epoch of {steps_per_epoch}); use another last.ck or start anew")
        history = start_ck.meta.get("history", [])
        best_val = start_ck.meta.get("best_val_acc", -1.0)
        elapsed = start_ck.meta.get("wall_time", 0.0)
        if not quiet:
            print(f"resuming {run} at epoch {epoch + 1}, step {trainer.step}")
            if epoch >= cfg.train.epochs:
                print(f"note: the run already has {epoch} epochs, the config asks for {cfg.train.epochs}: "
                      "nothing to do (pass --epochs to train longer)")

    def meta(extra: dict) -> dict:
        return {"producer": f"nn-numba {__version__}", "created": datetime.now().isoformat(timespec="seconds"),
                "config": cfg.to_dict(), "history": history, "best_val_acc": best_val, "step": trainer.step,
                "wall_time": elapsed, **extra}

    if not quiet:
        print(f"run {run}  |  {'-'.join(map(str, cfg.model.sizes))}  {cfg.optim.name} lr {cfg.optim.lr:g}  "
              f"batch {B}  {cfg.train.epochs} epochs  {threads} threads  "
              f"train {len(tr_idx)} / val {len(va_idx)} / test {len(mnist.test_y)}")
        if _first_compile():
            print(f"compiling the Numba kernels: about 30 s on the first run only (cached in {jitcache.use()})")
        if aug.enabled:
            on = {k: v for k, v in asdict(cfg.augment).items() if v and k != "elastic_sigma" or
                  k == "elastic_sigma" and cfg.augment.elastic_alpha}
            print("augment " + "  ".join(f"{k} {v:g}" for k, v in on.items()))
    # the training figures are means over the epoch's batches so far, as trained: distorted when augmenting
    # (so they sit below validation accuracy), and each batch seen with the weights of that moment
    running = "running mean, augmented" if aug.enabled else "running mean"
    y_all = mnist.train_y.astype(np.int64)
    # Compile (or load from the cache) every kernel of the loop now, so the first epoch's clock and
    # images/s measure training; a gradient-only step leaves weights and optimiser alone.
    idx = tr_idx[:1]
    try:
        if aug.enabled:
            augment_batch(mnist.train_x, idx, trainer.xb[:1], aug, cfg.train.seed, 0, 0)
        kernels.gather(mnist.train_x, idx, kernels.PIXEL, trainer.xb[:1])  # compiled for evaluate()
        trainer.train_step(trainer.gather(mnist.train_x, idx), y_all[idx], 0.0, update=False, rows=True)
    except CtrlC:  # (from the command's handler) nothing was trained in this process
        what = (f"{run} is as it was. Resume with: nn-numba train CONFIG --resume {run}" if resume else
                f"nothing was trained ({run} holds only its config.toml)")
        raise Interrupted(f"interrupted before the first step; {what}") from None
    with _SigInt(run) as sigint:
        while epoch < cfg.train.epochs:
            order = epoch_order(tr_idx, cfg.train.seed, epoch) if cfg.data.shuffle else tr_idx
            t0 = time.perf_counter()
            bar = tqdm(total=len(order), initial=batch0 * B, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                       unit="img", unit_scale=True, leave=True, disable=quiet, dynamic_ncols=True)
            lr = cfg.optim.lr
            for bi in range(batch0, steps_per_epoch):
                idx = order[bi * B:(bi + 1) * B]
                nb = len(idx)
                xb = trainer.xb[:nb]
                if aug.enabled:
                    augment_batch(mnist.train_x, idx, xb, aug, cfg.train.seed, epoch, bi * B)
                else:
                    trainer.gather(mnist.train_x, idx)
                yb = y_all[idx]
                lr = lr_at(cfg, trainer.step, steps_per_epoch)
                loss = trainer.train_step(xb, yb, lr, rows=not aug.enabled)
                if not math.isfinite(loss):
                    bar.close()
                    raise Diverged(f"training diverged at epoch {epoch + 1}, step {bi + 1}: the loss is {loss} "
                                   f"(learning rate {lr:g}); try a smaller --lr. Checkpoints in {run} are "
                                   "the last good ones")
                run_loss += loss
                run_correct += int((trainer.pred[:nb] == yb).sum())
                bar.update(nb)
                if bi % 50 == 0:
                    seen = bi * B + nb
                    bar.set_postfix_str(f"train loss {run_loss / seen:.4f} acc {100 * run_correct / seen:.2f}% "
                                        f"({running})", refresh=False)
                if sigint.hit:
                    bar.close()
                    trainer.sync()
                    if not np.isfinite(model.params).all():
                        raise Diverged(f"training diverged at epoch {epoch + 1}, step {bi + 1}: the weights hold "
                                       f"NaN or Inf (learning rate {lr:g}); try a smaller --lr. Checkpoints in "
                                       f"{run} are the last good ones")
                    elapsed += time.perf_counter() - t0
                    state = {"epoch": epoch, "batch": bi + 1, "run_loss": run_loss, "run_correct": run_correct}
                    if bi + 1 == steps_per_epoch:
                        break  # the epoch is complete: finish it normally below, then stop
                    save(run / "last.ck", to_checkpoint(model, meta({"epoch": epoch, "resume": state}),
                                                        trainer.optim_state()))
                    raise Interrupted(f"interrupted at epoch {epoch + 1}, step {bi + 1}; saved {run / 'last.ck'}. "
                                      f"Resume with: nn-numba train CONFIG --resume {run}")
            bar.close()
            seconds = time.perf_counter() - t0
            elapsed += seconds
            trainer.sync()  # the first layer back into the model: evaluation and checkpoints read it
            if not np.isfinite(model.params).all():
                raise Diverged(f"training diverged in epoch {epoch + 1}: the weights hold NaN or Inf "
                               f"(learning rate {lr:g}); try a smaller --lr. Checkpoints in {run} are the last "
                               "good ones")
            n_tr = len(order)
            row = {"epoch": epoch + 1, "step": trainer.step, "lr": lr, "train_loss": run_loss / n_tr,
                   "train_acc": run_correct / n_tr}
            if len(va_idx):
                row["val_loss"], row["val_acc"], _ = evaluate(model, mnist.train_x[va_idx], mnist.train_y[va_idx])
            row["test_loss"], row["test_acc"], _ = evaluate(model, mnist.test_x, mnist.test_y)
            row["seconds"] = seconds
            row["samples_per_s"] = (n_tr - batch0 * B) / seconds if seconds > 0 else 0.0
            history.append(_finite(row))
            epoch, batch0, run_loss, run_correct = epoch + 1, 0, 0.0, 0
            summary = _finite({k: row[k] for k in row if k.endswith(("_acc", "_loss"))}) | {"epoch": epoch}
            state = {"epoch": epoch, "batch": 0, "run_loss": 0.0, "run_correct": 0}
            if best_row(history) is history[-1]:
                best_val = row.get("val_acc", -1.0)
                save(run / "best.ck", to_checkpoint(model, meta(summary)))
            save(run / "last.ck", to_checkpoint(model, meta(summary | {"resume": state}), trainer.optim_state()))
            # rewritten whole from the history (atomically, like the checkpoints): never a half line, and
            # after a resume it matches last.ck even if the process was killed between the two writes
            write_text_atomic(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            if not quiet:
                val = f"val {row['val_loss']:.4f} / {100 * row['val_acc']:.2f}%  " if "val_acc" in row else ""
                tqdm.write(f"epoch {epoch:3d}  train {row['train_loss']:.4f} / {100 * row['train_acc']:.2f}% "
                           f"({running})  "
                           f"{val}test {row['test_loss']:.4f} / {100 * row['test_acc']:.2f}%  "
                           f"{row['samples_per_s']:,.0f} img/s  lr {lr:.3g}")
            if on_epoch is not None:
                on_epoch(row)
            if sigint.hit:
                raise Interrupted(f"interrupted after epoch {epoch}; saved {run / 'last.ck'}. "
                                  f"Resume with: nn-numba train CONFIG --resume {run}")
    return run


def _first_compile() -> bool:
    """True when no compiled train_step is in the kernel cache (a fresh install, or changed kernels)."""
    if os.environ.get("NUMBA_DISABLE_JIT"):
        return False  # not compiled at all
    return not jitcache.cached("kernels.train_step")


def _resume_source(resume: str) -> tuple[Checkpoint, Path]:
    """A run folder (its last.ck) or a checkpoint file with resume state; its run folder."""
    p = Path(resume)
    ck_path = p / "last.ck" if p.is_dir() else p
    ck = load(ck_path)
    if "resume" not in ck.meta or ck.optim is None:
        raise NNError(f"{ck_path}: holds no training state to resume from (use a run's last.ck)")
    return ck, ck_path.parent


# Keys a resumed run must share with the checkpoint: others would change the data split, the data order
# or the optimiser state's meaning. epochs, lr, schedule, threads and the like may change.
_SAME_ON_RESUME = (("model", "sizes"), ("optim", "name"), ("data", "val_split"), ("data", "shuffle"),
                   ("train", "seed"))


def _check_resume(ck: Checkpoint, cfg: Config, src: str) -> dict:
    """The checkpoint's resume state, checked: a damaged or foreign META gives an NNError, not a KeyError."""
    st, saved = ck.meta.get("resume"), ck.meta.get("config")
    damaged = NNError(f"cannot resume {src}: its training state is damaged; use another last.ck or start anew")
    if not isinstance(st, dict) or not isinstance(saved, dict):
        raise damaged
    for table, key in _SAME_ON_RESUME + ((("train", "batch_size"),) if st.get("batch") else ()):
        was = saved.get(table, {}).get(key) if isinstance(saved.get(table), dict) else None
        now = getattr(getattr(cfg, table), key)
        if was != now:
            why = " (it stopped mid-epoch)" if key == "batch_size" else ""
            raise NNError(f"cannot resume {src}: it was trained with [{table}] {key} = {was!r}{why}, the config "
                          f"says {now!r}; resume with the run's own config.toml")
    num = (int, float)
    ok = (all(type(st.get(k)) is int and st[k] >= 0 for k in ("epoch", "batch", "run_correct"))
          and type(st.get("run_loss")) in num and math.isfinite(st["run_loss"])
          and type(ck.meta.get("best_val_acc", 0.0)) in num and type(ck.meta.get("wall_time", 0.0)) in num
          and isinstance(ck.meta.get("history", []), list)
          and all(isinstance(r, dict) for r in ck.meta.get("history", [])))
    if not ok:
        raise damaged
    return st


def apply_overrides(cfg: Config, **over) -> Config:
    """Command-line flags over the file's values, checked again."""
    d = cfg.to_dict()
    names = {"epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"), "lr": ("optim", "lr"),
             "seed": ("train", "seed"), "threads": ("train", "threads"), "out": ("train", "out")}
    for key, value in over.items():
        if value is not None:
            table, k = names[key]
            d[table][k] = value
    new = from_dict(d, "command line")
    check(new, "command line")
    return new
