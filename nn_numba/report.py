"""`nn-numba report`: pictures and a Markdown page of a training run, so a run is looked at, not read.

For each run folder (config.toml, metrics.jsonl, best.ck) it writes into RUN/report/ (or OUT/<run-name>/):
curves.png, confusion.png, mistakes.png, lr.png, augment.png (only when the run augmented) and report.md.
Several runs also get one overlay of their curves, compare.png, linked from a combined page.

matplotlib is an optional extra and is imported only inside the functions below (Agg backend, no display),
so the rest of the package never pays for it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint, load
from .config import Config, load_config
from .errors import NNError, printable
from .runs import write_text_atomic

N_TRAIN = 60000  # MNIST training images, before the validation split


def _plt():
    """matplotlib.pyplot on the Agg backend, or a one-line NNError saying how to get it."""
    try:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:  # figures are only saved: no display needed, none opened
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NNError("`nn-numba report` needs matplotlib, which is not installed: "
                      "pip install 'nn-numba[plot]'") from None
    return plt


@dataclass
class Run:
    path: Path  # the run folder, symlinks resolved
    cfg: Config
    hist: list[dict[str, Any]]  # metrics.jsonl rows, one per epoch; values that are not numbers are NaN
    best: Checkpoint  # best.ck
    notes: list[str] = field(default_factory=list)  # what in metrics.jsonl could not be used

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def has_val(self) -> bool:
        return all("val_acc" in r for r in self.hist)


def load_run(folder: str | Path) -> Run:
    """Read and check a run folder; every problem is a one-line NNError naming the file."""
    p = Path(folder)
    if not p.exists():
        raise NNError(f"run folder {p} does not exist (runs are in the train --out folder, default runs/)")
    if not p.is_dir():
        raise NNError(f"{p} is a file, not a run folder: give the folder holding metrics.jsonl and best.ck")
    p = p.resolve()
    mpath = p / "metrics.jsonl"
    if not mpath.is_file():
        raise NNError(f"{mpath}: missing, so {p} is not a run folder or no epoch has finished yet")
    hist, notes = read_metrics(mpath)
    if not hist:
        raise NNError(f"{mpath}: empty, no epoch has finished yet; report again after the first epoch")
    cfg = load_config(p / "config.toml")
    ck_path = p / "best.ck"
    if not ck_path.is_file():
        raise NNError(f"{ck_path}: missing, so the run has no best model to report on")
    best = load(ck_path)  # CheckpointError (an NNError) on a damaged file
    if best.sizes[0] != 784 or best.sizes[-1] != 10:
        raise NNError(f"{ck_path}: has sizes {best.sizes}, not an MNIST network (784 inputs, 10 classes)")
    return Run(p, cfg, hist, best, notes)


NEED = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds")


def read_metrics(mpath: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of metrics.jsonl and notes on what could not be used. A value that is not a finite number
    (train writes an infinite one as null) becomes NaN, which the plots skip and the page shows as "-";
    a row without a whole epoch and step number is left out."""
    hist, notes = [], []
    for i, line in enumerate(mpath.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise NNError(f"{mpath}: line {i} is not JSON (the file is damaged; remove that line)") from None
        if not isinstance(row, dict) or any(k not in row for k in NEED):
            raise NNError(f"{mpath}: line {i} lacks one of {', '.join(NEED)} "
                          "(not written by nn-numba train?)")
        if not all(_whole(row[k]) for k in ("epoch", "step")):
            notes.append(f"metrics.jsonl line {i}: epoch or step is not a whole number; the line is left out")
            continue
        bad = [k for k, v in row.items() if k not in ("epoch", "step") and not _number(v)]
        notes += [f"metrics.jsonl line {i}: {', '.join(bad)} not a number (shown as -)"] if bad else []
        hist.append({k: (v if k in ("epoch", "step") or _number(v) else math.nan) for k, v in row.items()})
    return hist, notes


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**53  # 2^53: exact in a float


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def steps_per_epoch(cfg: Config) -> int:
    from .rng import n_val

    n_train = N_TRAIN - n_val(N_TRAIN, cfg.data.val_split)
    return math.ceil(n_train / cfg.train.batch_size)


def schedule(cfg: Config, steps: np.ndarray | None = None) -> np.ndarray:
    """The learning rate (float64) of each optimiser step in `steps` (from 0; default: every step the
    config plans), as docs/training.md defines it."""
    from . import schedule as sched

    spe = steps_per_epoch(cfg)
    steps = range(cfg.train.epochs * spe) if steps is None else steps
    return np.array([sched.lr_at(cfg, int(s), spe) for s in steps], float)


MAX_POINTS = 4000  # points of a per-step learning-rate line: the figure is 900 px wide


def spread(start: int, stop: int) -> np.ndarray:
    """Steps start..stop-1, or MAX_POINTS of them evenly spread (both ends kept) when there are more."""
    return np.unique(np.linspace(start, stop - 1, min(stop - start, MAX_POINTS)).round().astype(np.int64))


def best_row(run: Run) -> dict[str, Any]:
    """The epoch train.py kept as best.ck; an epoch whose validation accuracy was not a number in
    metrics.jsonl (NaN here) is not a candidate."""
    from .runs import best_row as best

    return best([r for r in run.hist if not math.isnan(r.get("val_acc", 0.0))] or run.hist)


# ---------------------------------------------------------------------------------------------------- figures


def plot_curves(run: Run, path: Path) -> None:
    """Loss (log scale) and accuracy per epoch for train, validation and test; the best epoch marked."""
    plt = _plt()
    ep = [r["epoch"] for r in run.hist]
    best = best_row(run)["epoch"]
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4.2))
    for split, style in (("train", "-o"), ("val", "-s"), ("test", "--^")):
        if split == "val" and not run.has_val:
            continue
        label = {"val": "validation"}.get(split, split)
        ax_l.plot(ep, [r[f"{split}_loss"] for r in run.hist], style, ms=4, label=label)
        ax_a.plot(ep, [100 * r[f"{split}_acc"] for r in run.hist], style, ms=4, label=label)
    for ax in (ax_l, ax_a):
        ax.axvline(best, color="0.6", ls=":", lw=1, label=f"best epoch ({best})")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    _log_y(ax_l)
    ax_l.set_ylabel("mean cross-entropy loss")
    ax_a.set_ylabel("accuracy (%)")
    ax_l.set_title("loss")
    ax_a.set_title("accuracy")
    fig.suptitle(f"run {run.name}: {_short(run.cfg)}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(conf: np.ndarray, acc: float, path: Path) -> None:
    """The 10 x 10 confusion matrix with counts; colour on a log scale so the few errors stand out too."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(7, 6.2))
    im = ax.imshow(np.maximum(conf, 0.5), cmap="Blues", norm=LogNorm(vmin=0.5, vmax=max(conf.max(), 1)))
    thresh = math.sqrt(max(conf.max(), 1))  # on the log scale, half way up: white text on dark cells
    for t in range(10):
        for p in range(10):
            n = int(conf[t, p])
            ax.text(p, t, str(n), ha="center", va="center", fontsize=8,
                    color="white" if n > thresh else ("black" if n else "0.7"))
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(f"test set confusion (best.ck): {100 * acc:.2f}% of {int(conf.sum())} correct")
    fig.colorbar(im, ax=ax, label="images (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def worst_mistakes(y: np.ndarray, pred: np.ndarray, proba: np.ndarray, n: int) -> np.ndarray:
    """Indices of the (at most n) misclassified images, most confident first (ties by index)."""
    wrong = np.flatnonzero(pred != y)
    conf = proba[wrong, pred[wrong]]
    return wrong[np.lexsort((wrong, -conf))][:n]


def plot_mistakes(X_u8: np.ndarray, y: np.ndarray, pred: np.ndarray, proba: np.ndarray, path: Path,
                  n: int = 36) -> int:
    """A grid of the most confidently misclassified test digits; returns how many it shows.

    The digits are pasted into one picture with one axes (36 axes made this the slowest figure)."""
    plt = _plt()
    idx = worst_mistakes(y, pred, proba, n)
    cols = 6
    rows = max(1, math.ceil(len(idx) / cols))
    cw, ch, band = 34, 42, 12  # cell width and height in pixels; the white band above a digit holds its label
    canvas = np.full((rows * ch, cols * cw), 255, np.uint8)
    zoom = 3.2 / 100  # inches per canvas pixel: a digit ~90 screen pixels wide, labels at 8 pt fit the band
    fig, ax = plt.subplots(figsize=(cols * cw * zoom, rows * ch * zoom + 0.35))
    for k, i in enumerate(idx):
        r, c = divmod(k, cols)
        y0, x0 = r * ch + band, c * cw + (cw - 28) // 2
        canvas[y0:y0 + 28, x0:x0 + 28] = X_u8[i].reshape(28, 28)
        ax.text(c * cw + cw / 2, r * ch + band - 1, f"#{i}: true {y[i]}\npred {pred[i]} "
                f"({100 * proba[i, pred[i]]:.0f}%)", ha="center", va="bottom", fontsize=8, linespacing=1.1)
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    n_wrong = int((pred != y).sum())
    title = f"the {len(idx)} most confidently misclassified test digits (of {n_wrong})"
    ax.set_title(title if n_wrong else "no misclassified test digits", fontsize=10)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(idx)


def plot_lr(run: Run, path: Path) -> float:
    """The per-step learning rate computed from the config, with the per-epoch rates metrics.jsonl
    recorded (the rate of each epoch's last step) marked on it; returns their largest relative gap."""
    plt = _plt()
    spe = steps_per_epoch(run.cfg)
    done = max(r["step"] for r in run.hist)  # steps taken so far (fewer than planned if stopped early)
    total = run.cfg.train.epochs * spe
    s = spread(0, max(done, 1))  # the cost follows what was run, not what was planned
    lr = schedule(run.cfg, s)
    shown = min(total, max(10 * done, 2 * spe))  # and a stretch of the plan, not all of it
    at = np.array([max(r["step"] - 1, 0) for r in run.hist])  # the last step of each epoch, from 0
    rec = np.array([r["lr"] for r in run.hist], float)
    want = schedule(run.cfg, at)
    ok = np.isfinite(rec)
    gap = float(np.max(np.abs(rec - want)[ok] / np.maximum(np.abs(want[ok]), 1e-300), initial=0.0))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.plot(s, lr, lw=1.5, label="applied per step (from config.toml)")
    top = lr.max()
    if done < shown:
        s2 = spread(max(done - 1, 0), shown)
        lr2 = schedule(run.cfg, s2)
        more = f", continues to step {total:,}" if shown < total else ""
        ax.plot(s2, lr2, lw=1, ls="--", color="0.6", label=f"planned, not run{more}")
        top = max(top, lr2.max())
    ax.plot(at, rec, "o", mfc="none", mec="C3", ms=7, clip_on=False,
            label="recorded in metrics.jsonl (epoch's last step)")
    if shown // spe <= 100:  # epoch boundaries, while there are few enough to see
        for e in range(1, shown // spe + (shown % spe > 0)):
            ax.axvline(e * spe, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel(f"optimiser step ({spe} per epoch; grey lines: epoch boundaries)")
    ax.set_ylabel("learning rate")
    ax.set_ylim(-0.02 * top, top * 1.08)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="best", fontsize=8)
    agree = "agree" if gap < 1e-9 else f"DIFFER by up to {100 * gap:.3g}%"
    w = run.cfg.schedule.warmup_epochs
    ax.set_title(f"learning rate: {run.cfg.schedule.name}, {f'warm-up {w:g} epochs' if w else 'no warm-up'} "
                 f"(recorded and computed {agree})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return gap


def plot_augment(X_u8: np.ndarray, run: Run, path: Path) -> None:
    """Random training digits (first column) and independent augmentations of each (other columns)."""
    from .augment import Augment, augment_grid

    plt = _plt()
    aug = Augment(**asdict(run.cfg.augment))
    img = augment_grid(X_u8, aug, np.random.default_rng([run.cfg.train.seed, 4]), n=64)
    fig, ax = plt.subplots(figsize=(6.4, 7))
    ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.axvline(27.5, color="C3", lw=1.5)  # the edge between the column of originals and the rest
    on = [f"{k} {v:g}" for k, v in asdict(aug).items() if v and k != "elastic_sigma"]
    on += [f"elastic_sigma {aug.elastic_sigma:g}"] if aug.elastic_alpha else []
    ax.set_title(f"augmentation ({', '.join(on)})\n"
                 "left of the red line: the original; right: random augmentations",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compared(run: Run) -> str:
    """The accuracy a comparison draws for a run: validation, or for a run trained without a validation
    split (on all 60,000 images) test, the held-out figure it has (its training accuracy is a running mean
    over distorted digits, not comparable)."""
    return "val_acc" if run.has_val else "test_acc"


def plot_compare(runs: list[Run], path: Path) -> None:
    """Several runs overlaid: validation accuracy (compared) and training loss per epoch."""
    plt = _plt()
    fig, (ax_a, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, run in enumerate(runs):
        ep = [r["epoch"] for r in run.hist]
        key = compared(run)
        label = f"{run.name} ({_short(run.cfg)})" + ("" if run.has_val else " [test acc: no val split]")
        ax_a.plot(ep, [100 * r[key] for r in run.hist], "-o" if run.has_val else "--o", ms=3,
                  color=f"C{k % 10}", label=label)
        ax_l.plot(ep, [r["train_loss"] for r in run.hist], "-o", ms=3, color=f"C{k % 10}", label=label)
    ax_a.set_title("validation accuracy" if all(r.has_val for r in runs) else
                   "validation accuracy (dashed: test, runs without a validation split)")
    ax_a.set_ylabel("accuracy (%)")
    ax_l.set_title("training loss")
    ax_l.set_ylabel("mean cross-entropy loss")
    _log_y(ax_l)
    for ax in (ax_a, ax_l):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    # one legend under both panels: run names are long and would hide the curves
    rows = math.ceil(len(runs) / 2)
    fig.set_size_inches(11, 4.2 + 0.22 * rows)
    fig.legend(*ax_a.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.22 * rows / (4.2 + 0.22 * rows) + 0.02, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _log_y(ax) -> None:
    """A log y axis labelled with plain numbers (0.3, 0.5, 1) rather than 3 x 10^-1."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _short(cfg: Config) -> str:
    a = cfg.augment
    aug = " aug" if (a.shift or a.rotate or a.scale or a.elastic_alpha) else ""
    return (f"{'-'.join(map(str, cfg.model.sizes))} {cfg.optim.name} lr {cfg.optim.lr:g} "
            f"b{cfg.train.batch_size} {cfg.schedule.name}{aug}")


# ---------------------------------------------------------------------------------------------------- pages


def _num(v: float, spec: str) -> str:
    """v formatted, or "-" for NaN (a value metrics.jsonl did not hold as a number)."""
    return "-" if math.isnan(v) else format(v, spec)


def _pct(v: float) -> str:
    return _num(100 * v, ".2f") + ("%" if not math.isnan(v) else "")


def _fmt_time(s: float) -> str:
    m, s = divmod(s, 60)
    return f"{int(m)} min {s:.1f} s" if m else f"{s:.1f} s"


def predict_test_set(model, X_u8: np.ndarray,
                     y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy, predictions (N,), softmax probabilities (N, 10) and the confusion matrix (10, 10),
    rows = true digit, of `model` on uint8 images X_u8 (N, 784); predictions exactly as `evaluate`."""
    from .kernels import PIXEL
    from .model import evaluate

    _, acc, pred = evaluate(model, X_u8, y)
    proba = model.predict_proba(PIXEL[X_u8])  # the same u8 -> f32 table evaluate uses
    conf = np.zeros((10, 10), np.int64)
    np.add.at(conf, (y, pred), 1)
    return acc, pred, proba, conf


def report_run(run: Run, mnist, dest: Path) -> dict[str, Any]:
    """Write the figures and report.md of one run into dest; returns the figures quoted on the page."""
    from .model import MLP
    from .predict import OVERFLOW

    y = mnist.test_y.astype(np.int64)
    acc, pred, proba, conf = predict_test_set(MLP.from_checkpoint(run.best), mnist.test_x, y)
    if not np.isfinite(proba).all():
        raise NNError(f"{run.path / 'best.ck'}: {OVERFLOW}")
    dest.mkdir(parents=True, exist_ok=True)

    files = {"curves": "curves.png", "confusion": "confusion.png", "mistakes": "mistakes.png", "lr": "lr.png"}
    plot_curves(run, dest / files["curves"])
    plot_confusion(conf, acc, dest / files["confusion"])
    shown = plot_mistakes(mnist.test_x, y, pred, proba, dest / files["mistakes"])
    gap = plot_lr(run, dest / files["lr"])
    augmented = any(v for k, v in asdict(run.cfg.augment).items() if k != "elastic_sigma")
    if augmented:
        files["augment"] = "augment.png"
        plot_augment(mnist.train_x, run, dest / files["augment"])

    b = best_row(run)
    wall = float(np.nansum([r["seconds"] for r in run.hist]))
    imgs = float(np.nansum([r.get("samples_per_s", 0.0) * r["seconds"] for r in run.hist]))
    sel = "on validation" if run.has_val else "(no validation split: the last)"
    summary = {"run": str(run.path), "epochs": len(run.hist), "planned_epochs": run.cfg.train.epochs,
               "best_epoch": b["epoch"], "best_val_acc": b.get("val_acc"), "best_test_acc": b["test_acc"],
               "best_ck_test_acc": acc, "final_test_acc": run.hist[-1]["test_acc"], "wall_seconds": wall,
               "samples_per_s": imgs / wall if wall > 0 else 0.0, "lr_gap": gap, "mistakes_shown": shown,
               "files": files, "dest": str(dest)}
    ck_epoch = run.best.meta.get("epoch")

    md = [f"# Run {run.name}", "",
          f"`{run.path}` ({run.best.meta.get('producer', 'nn-numba')}; {_short(run.cfg)})",
          "", "## Summary", "",
          "| | |", "| --- | --- |",
          f"| epochs run | {len(run.hist)} of {run.cfg.train.epochs} |",
          f"| best epoch {sel} | {b['epoch']}"
          + (f" ({_pct(b['val_acc'])} validation)" if run.has_val else f" ({_pct(b['train_acc'])} train)")
          + " |",
          f"| its test accuracy | {_pct(b['test_acc'])} (recomputed from best.ck"
          + (f", epoch {ck_epoch}" if ck_epoch is not None else "") + f": {100 * acc:.2f}%) |",
          f"| last epoch's test accuracy | {_pct(run.hist[-1]['test_acc'])} |",
          f"| wall time (training, sum of per-epoch seconds) | {_fmt_time(wall)} |",
          f"| training speed | {summary['samples_per_s']:,.0f} images/s |", "",
          *(["## Notes", "", *[f"- {n}" for n in run.notes], ""] if run.notes else []),
          "## Loss and accuracy", "", f"![loss and accuracy per epoch]({files['curves']})", "",
          "## Test confusion matrix (best.ck)", "", "Rows are the true digit, columns the prediction.", "",
          f"![confusion matrix]({files['confusion']})", "",
          "## Most confident mistakes", "",
          f"The {shown} misclassified test digits the network was surest about "
          "(`#` is the index in the test set).", "",
          f"![most confidently misclassified test digits]({files['mistakes']})", "",
          "## Learning-rate schedule", "",
          "The line is the rate of every optimiser step computed from the config (docs/training.md); the "
          "circles are the rates metrics.jsonl recorded for each epoch's last step. "
          + ("They agree." if gap < 1e-9 else f"**They differ by up to {100 * gap:.3g}%.**"), "",
          f"![learning rate per step]({files['lr']})", ""]
    if augmented:
        md += ["## Augmented training samples", "",
               "Each row is one training digit: the original on the left, random augmentations of it after.",
               "",
               f"![augmented training samples]({files['augment']})", ""]
    md += ["## Per epoch", "",
           "| epoch | lr | train loss | train acc | val loss | val acc | test loss | test acc | s | img/s |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in run.hist:
        val = f"{_num(r['val_loss'], '.4f')} | {_pct(r['val_acc'])}" if "val_acc" in r else "- | -"
        md.append(f"| {r['epoch']} | {_num(r['lr'], '.3g')} | {_num(r['train_loss'], '.4f')} | "
                  f"{_pct(r['train_acc'])} | {val} | {_num(r['test_loss'], '.4f')} | {_pct(r['test_acc'])} | "
                  f"{_num(r['seconds'], '.1f')} | {_num(r.get('samples_per_s', 0), ',.0f')} |")
    md += ["", "## Config", "", "```toml", (run.path / "config.toml").read_text().strip(), "```", ""]
    (dest / "report.md").write_text("\n".join(md))
    return summary


def report_compare(runs: list[Run], summaries: list[dict[str, Any]], dest: Path, page: str) -> Path:
    """compare.png overlaying the runs and a page `page` in dest linking every run's report."""
    dest.mkdir(parents=True, exist_ok=True)
    plot_compare(runs, dest / "compare.png")
    md = [f"# {len(runs)} runs compared", "",
          "![validation accuracy and training loss per epoch](compare.png)", "",
          "| run | config | epochs | best epoch | val acc | its test acc | wall time | img/s |",
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run, s in zip(runs, summaries):
        link = Path(os.path.relpath(Path(s["dest"]) / "report.md", dest)).as_posix()
        val = _pct(s["best_val_acc"]) if s["best_val_acc"] is not None else "-"
        md.append(f"| [{run.name}]({link}) | {_short(run.cfg)} | {s['epochs']} | {s['best_epoch']} | {val} | "
                  f"{_pct(s['best_test_acc'])} | {_fmt_time(s['wall_seconds'])} | "
                  f"{s['samples_per_s']:,.0f} |")
    path = dest / page
    path.write_text("\n".join(md) + "\n")
    return path


def destinations(runs: list[Run], out: str | None) -> list[Path]:
    """RUN/report/ each, or OUT/<run-name>/ with -2, -3 ... added when two runs share a folder name."""
    if not out:
        return [run.path / "report" for run in runs]
    names: set[str] = set()
    dests = []
    for run in runs:
        name, n = run.name, 1
        while name in names:
            n += 1
            name = f"{run.name}-{n}"
        names.add(name)
        dests.append(Path(out) / name)
    return dests


# ----------------------------------------------------------------------------------------------------
# a sweep folder (nn-numba sweep): SWEEP/trials.json


def is_sweep(folder: Path) -> bool:
    return (folder / "trials.json").is_file() and (folder / "sweep.toml").is_file()


def load_trials(folder: Path) -> dict[str, Any]:
    try:
        d = json.loads((folder / "trials.json").read_text(encoding="utf-8"))
        ok = isinstance(d.get("space"), dict) and all(isinstance(t, dict) for t in d.get("trials", None))
    except (OSError, ValueError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise NNError(f"{folder}/trials.json: damaged; run the sweep command again to rewrite it")
    return d


def trial_value(t: dict[str, Any]) -> float | None:
    """A trial's best validation accuracy: its result, or (pruned, stopped) the best epoch it reported."""
    vals = [v for v in (t.get("value"), *t.get("intermediate", {}).values()) if isinstance(v, int | float)]
    return max(vals) if vals else None


def plot_sweep(d: dict[str, Any], dest: Path) -> list[str]:
    """history.png (each trial's accuracy and the best so far) and one PNG per searched key."""
    plt = _plt()
    trials = [t for t in d["trials"] if trial_value(t) is not None]
    colour = {"complete": "tab:blue", "pruned": "tab:orange"}
    files = ["history.png"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for state, c in colour.items():
        pts = [(t["number"], 100 * trial_value(t)) for t in trials if t["state"] == state]
        if pts:
            ax.scatter(*zip(*pts), c=c, label=state, s=25)
    done = sorted((t["number"], 100 * t["value"]) for t in trials if t["state"] == "complete")
    if done:
        best = np.maximum.accumulate([v for _, v in done])
        ax.step([n for n, _ in done], best, where="post", c="tab:green", label="best so far")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="trial", ylabel="best validation accuracy (%)", title=f"sweep {d['study']}: optimisation history")
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest / "history.png", dpi=100)
    plt.close(fig)
    for key, kind in d["space"].items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for state, c in colour.items():
            pts = [(t["params"][key], 100 * trial_value(t)) for t in trials
                   if t["state"] == state and key in t["params"]]
            if pts:
                ax.scatter(*zip(*pts), c=c, label=state, s=25)
        if kind == "log":
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel="best validation accuracy (%)", title=f"validation accuracy against {key}")
        ax.legend()
        fig.tight_layout()
        name = f"param-{key.replace('.', '-')}.png"
        fig.savefig(dest / name, dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def report_sweep(folder: Path, out: str | None, quiet: bool = False) -> Path:
    """SWEEP/report/ (or OUT/<sweep>/): the plots and a report.md with the table of trials."""
    d = load_trials(folder)
    dest = Path(out) / folder.name if out else folder / "report"
    dest.mkdir(parents=True, exist_ok=True)
    files = plot_sweep(d, dest)
    keys = list(d["space"])
    lines = [f"# Sweep {d['study']}", "", f"{len(d['trials'])} trials; the objective is the run's best validation "
             "accuracy (pruned trials: the best epoch they reached).", "",
             "| trial | state | validation | " + " | ".join(keys) + " | run |",
             "|---|---|---|" + "---|" * len(keys) + "---|"]
    for t in d["trials"]:
        v = trial_value(t)
        params = " | ".join(f"{t['params'][k]:.4g}" if isinstance(t["params"].get(k), float)
                            else str(t["params"].get(k, "")) for k in keys)
        run = Path(t["run"]).name if t.get("run") else ""
        lines.append(f"| {t['number']} | {t['state']} | {'' if v is None else f'{100 * v:.2f}%'} | {params} | {run} |")
    lines += [""] + [f"![{f}]({f})" for f in files] + [""]
    write_text_atomic(dest / "report.md", "\n".join(lines))
    if not quiet:
        print(f"sweep {d['study']}: wrote {dest / 'report.md'}")
    return dest


def report(runs: list[str] | None = None, out: str | None = None, data_dir: str | None = None,
           runs_root: str = "runs", quiet: bool = False) -> list[dict[str, Any]]:
    """Report on each run folder (default: the latest under runs_root); returns one summary per run."""
    from .data import load_mnist
    from .runs import latest_run

    _plt()  # fail first, in one line, when matplotlib is missing
    folders = [Path(r) for r in runs] if runs else [latest_run(runs_root)]
    sweeps = [f for f in folders if is_sweep(f)]
    for f in sweeps:
        report_sweep(f, out, quiet)
    folders = [f for f in folders if f not in sweeps]
    if not folders:
        return []
    loaded = [load_run(f) for f in folders]  # check them all before writing anything
    dests = destinations(loaded, out)
    data: dict[str, Any] = {}
    summaries = []
    for run, dest in zip(loaded, dests):
        key = run.cfg.data.dir
        if key not in data:
            data[key] = load_mnist(data_dir, key or None)
        summaries.append(report_run(run, data[key], dest))
        if not quiet:
            print(printable(f"{run.name}: wrote {dest / 'report.md'}"))
    if len(loaded) > 1:
        # with --out the combined page is OUT/report.md; by default it goes beside the first run's own
        # report.md, so it takes another name
        page = report_compare(loaded, summaries, Path(out) if out else dests[0],
                              "report.md" if out else "compare.md")
        for s in summaries:  # each run's page links the comparison too
            s["compare"] = str(page)
            link = Path(os.path.relpath(page, s["dest"])).as_posix()
            with open(Path(s["dest"]) / "report.md", "a") as f:
                f.write(f"\nCompared with {len(loaded) - 1} other run(s) in [{page.name}]({link}).\n")
        if not quiet:
            print(printable(f"comparison of {len(loaded)} runs: wrote {page}"))
    return summaries
