"""The `nn-numba` command: thin Typer wrappers over the modules that do the work.

Every user-facing problem is an NNError: printed as one line on stderr, exit code 1 (130 for Ctrl-C),
never a traceback.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import CtrlC, NNError, printable

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Train and use a 784-250-250-10 MNIST network whose every loop is an explicit Numba kernel.",
)

class PlainHelp(typer.core.TyperCommand):
    """--help with plain metavars, as click prints them (`CONFIG`, `[RUN]...`, `--epochs N`), not Typer's
    `{CONFIG}` and `<list[str]>`. Every option names its own metavar."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [self.options_metavar, *(_usage(p) for p in self.params if p.param_type_name == "argument")]

    def format_options(self, ctx, formatter) -> None:
        args = [(_usage(p), p.help or "") for p in self.params if p.param_type_name == "argument"]
        opts = [p.get_help_record(ctx) for p in self.get_params(ctx) if p.param_type_name != "argument"]
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        with formatter.section("Options"):
            formatter.write_dl([o for o in opts if o])


def _usage(arg) -> str:
    """CONFIG, [CHECKPOINT], IMAGE... or [RUN]...: the argument's name, [optional], ... for several."""
    name = arg.metavar or arg.name.upper()
    name = name if arg.required else f"[{name}]"
    return name + "..." if arg.nargs != 1 else name


DataDir = Annotated[str | None, typer.Option("--data-dir", metavar="DIR", help="Folder with the MNIST IDX files "
                                                "(default: $NN_NUMBA_DATA, the config, then a per-user cache).")]
CheckpointArg = typer.Argument(metavar="CHECKPOINT", help="Checkpoint or run folder (default: best.ck of the "
                                                            "latest run).")
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]


def _checkpoint(checkpoint: str | None, command: str) -> Path:
    from .runs import checkpoint_path

    return checkpoint_path(checkpoint, name_one=f"give one: `nn-numba {command} CHECKPOINT_OR_RUN`")


@app.command(cls=PlainHelp)
def train(
    config: Annotated[Path | None, typer.Argument(metavar="CONFIG", help="A TOML file or a shipped config's name "
                                                                         "(default, best, no-augment, seed) "
                                                                         "(with --resume: the run's own).")] = None,
    epochs: Annotated[int | None, typer.Option(metavar="N", help="Override [train] epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(metavar="N", help="Override [train] batch_size.")] = None,
    lr: Annotated[float | None, typer.Option(metavar="LR", help="Override [optim] lr.")] = None,
    seed: Annotated[int | None, typer.Option(metavar="N", help="Override [train] seed.")] = None,
    threads: Annotated[int | None, typer.Option(metavar="N", help="Override [train] threads (0 = all cores).")] = None,
    out: Annotated[str | None, typer.Option(metavar="DIR", help="Override [train] out: where run folders go.")] = None,
    name: Annotated[str | None, typer.Option(metavar="NAME", help="The run folder's name (default: the date and "
                                                                  "time); report's plots use it as the label.")] = None,
    data_dir: DataDir = None,
    resume: Annotated[str | None, typer.Option(
        metavar="RUN", help="Continue a run: its folder or its last.ck, with its own config; "
                            "--epochs N extends it.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or per-epoch lines.")] = False,
) -> None:
    """Train a network.

    Writes runs/<timestamp>/ with config.toml, metrics.jsonl, best.ck and last.ck.
    """
    from .config import apply_overrides, load_config
    from .runs import check_run_name
    from .train import open_resume, resumed_config
    from .train import train as run_training

    if config is None and resume is None:
        raise NNError("give a CONFIG (e.g. configs/default.toml), or --resume RUN to continue a run")
    if name is not None:
        check_run_name(name)
    plan = {"batch_size": batch_size, "lr": lr, "seed": seed}
    given = apply_overrides(load_config(config), **plan, threads=threads, out=out) if config else None
    if resume is None:
        cfg = apply_overrides(given, epochs=epochs)
        run_training(cfg, data_dir=data_dir, quiet=quiet, name=name)
        return
    r = open_resume(resume)
    if given is None and any(v is not None for v in plan.values()):
        given = apply_overrides(r.plan, **plan)
    cfg = resumed_config(r, given, epochs, threads=threads, out=out)
    run_training(cfg, data_dir=data_dir, resume=r, quiet=quiet, name=name)  # name: for a new folder only


@app.command(cls=PlainHelp)
def evaluate(
    checkpoint: Annotated[str | None, CheckpointArg] = None,
    data_dir: DataDir = None,
    as_json: Json = False,
) -> None:
    """Test loss, accuracy, per-class accuracy, confusion matrix."""
    import numpy as np

    from .checkpoint import load
    from .data import load_mnist
    from .model import MLP
    from .model import evaluate as run_eval

    path = _checkpoint(checkpoint, "evaluate")
    model = MLP.from_checkpoint(load(path))
    if model.sizes[0] != 784 or model.sizes[-1] != 10:
        raise NNError(f"{path}: has sizes {model.sizes}, not an MNIST network (784 inputs, 10 classes)")
    mnist = load_mnist(data_dir)
    loss, acc, pred = run_eval(model, mnist.test_x, mnist.test_y)
    if not math.isfinite(loss):  # only non-finite logits make it so: the loss is computed in log space
        from .predict import OVERFLOW

        raise NNError(f"{path}: {OVERFLOW}")
    y = mnist.test_y.astype(np.int64)
    conf = np.zeros((10, 10), np.int64)
    np.add.at(conf, (y, pred), 1)
    per_class = (np.diag(conf) / np.maximum(conf.sum(axis=1), 1)).tolist()
    if as_json:
        print(json.dumps({"checkpoint": str(path), "accuracy": acc, "loss": loss, "n": len(y),
                          "per_class_accuracy": per_class, "confusion": conf.tolist()}))
        return
    print(f"{printable(path)}: test accuracy {100 * acc:.2f}%  loss {loss:.4f}  ({len(y)} images)")
    print("\nper class:  " + "  ".join(f"{d}: {100 * a:.1f}%" for d, a in enumerate(per_class)))
    print("\nconfusion (rows = true digit, columns = predicted):")
    print("      " + "".join(f"{d:>6}" for d in range(10)))
    for d in range(10):
        print(f"{d:>6}" + "".join(f"{c:>6}" for c in conf[d]))


@app.command(cls=PlainHelp)
def info(
    checkpoint: Annotated[str | None, CheckpointArg] = None,
    as_json: Json = False,
) -> None:
    """What a checkpoint holds: sizes, parameters, epoch, accuracy."""
    from .checkpoint import describe

    path = _checkpoint(checkpoint, "info")
    d = describe(path)
    if as_json:
        print(json.dumps(d, default=str))
        return
    for k, v in d.items():
        if v is None:
            continue  # not recorded in this file
        if isinstance(v, bool):
            v = "yes" if v else "no"
        elif isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, list):
            v = " ".join(map(str, v))
        print(f"{k.replace('_', ' '):>15}: {printable(v)}")  # META strings may hold anything, escape codes too


@app.command(cls=PlainHelp)
def predict(
    images: Annotated[list[str], typer.Argument(
        metavar="IMAGE", help="Image files or folders (PNG, JPEG, BMP, GIF, WebP, TIFF).")],
    checkpoint: Annotated[str | None, typer.Option(metavar="FILE",
                                                   help="Checkpoint (default: best of the latest run).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=10, metavar="K",
                                       help="How many likeliest digits to show.")] = 3,
    raw: Annotated[bool, typer.Option("--raw", help="Images are already 28x28 MNIST-style: no preprocessing.")] = False,
    save_preprocessed: Annotated[str | None, typer.Option(metavar="DIR",
                                                          help="Write what the network saw into DIR.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image and line.")] = False,
) -> None:
    """Read digits from image files.

    Each image is brought into MNIST's convention first (see README).
    """
    from .predict import predict_paths

    code = predict_paths(images, checkpoint, top_k=top_k, raw=raw, as_json=as_json,
                         save_preprocessed=save_preprocessed)
    raise typer.Exit(code)


@app.command(cls=PlainHelp)
def serve(
    checkpoint: Annotated[str | None, typer.Argument(
        metavar="CHECKPOINT_OR_RUN", help="Checkpoint or run folder (default: best of the latest run).")] = None,
    port: Annotated[int, typer.Option(min=0, max=65535, metavar="PORT",
                                      help="Port to listen on (0: any free one).")] = 8000,
    host: Annotated[str, typer.Option(metavar="ADDRESS", help="Address to listen on; anything but 127.0.0.1 or "
                                                              "localhost lets other machines in.")] = "127.0.0.1",
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in the web browser.")] = False,
    runs: Annotated[str, typer.Option(metavar="DIR",
                                      help="Folder whose runs the page offers to choose from.")] = "runs",
) -> None:
    """Draw a digit in the browser and watch the network read it (needs nn-numba[serve]).

    Also a JSON API: POST /api/predict, GET /api/models (docs/serve.md).
    """
    from .serve import serve as run_server

    run_server(checkpoint, host=host, port=port, open_browser=open_browser, runs=runs)


@app.command(cls=PlainHelp)
def export(
    source: Annotated[str, typer.Argument(metavar="CHECKPOINT_OR_RUN",
                                          help="A checkpoint or a run folder (its best.ck), e.g. runs/latest.")],
    to: Annotated[str, typer.Option("--to", metavar="FILE",
                                    help="Output file: .onnx (needs nn-numba[export]) or .npz (NumPy).")] = "",
) -> None:
    """Write a network as ONNX or NumPy .npz, to run it elsewhere.

    Tensor names fit a torch.nn.Sequential of Linear and ReLU layers (0.weight, 0.bias, 2.weight, ...).
    """
    from .export import export as run_export

    if not to:
        raise NNError("export needs --to FILE ending in .onnx or .npz")
    out = run_export(source, to)
    print(f"wrote {out}")


@app.command(cls=PlainHelp)
def configs(
    name: Annotated[str | None, typer.Argument(metavar="NAME", help="Print this shipped config.")] = None,
    to: Annotated[str | None, typer.Option("--to", metavar="PATH",
                                           help="Copy it to this file or folder (never overwrites).")] = None,
) -> None:
    """The configs that ship with nn-numba: list them, print one, or copy one to start from."""
    from .shipped import copy, listing, shipped_path

    if name is None:
        if to:
            raise NNError("configs --to needs a NAME to copy, e.g. nn-numba configs default --to my.toml")
        print(listing())
    elif to:
        print(f"wrote {copy(name, to)}")
    else:
        print(shipped_path(name).read_text(encoding="utf-8"), end="")


@app.command(cls=PlainHelp)
def sweep(
    sweep_file: Annotated[str, typer.Argument(metavar="SWEEP_FILE", help="A sweep file, e.g. "
                                              "configs/no-augment.sweep.toml (docs/sweep.md).")],
    trials: Annotated[int | None, typer.Option(min=1, metavar="N", help="End when the study has this many "
                                                                        "trials (default: the file's).")] = None,
    workers: Annotated[int, typer.Option(min=1, metavar="N", help="Trials run at once on this machine; they "
                                                                  "share its cores.")] = 1,
    storage: Annotated[str | None, typer.Option(metavar="URL", help="Where the study lives: an SQL URL "
                                                                    "(postgresql://USER:PASSWORD@HOST/DB) or a "
                                                                    "journal file (*.log) that other machines "
                                                                    "reach too (default: SWEEP/study.db).")] = None,
    name: Annotated[str | None, typer.Option(metavar="NAME", help="The study's name (default: the file's).")] = None,
    out: Annotated[str, typer.Option(metavar="DIR", help="Where sweep folders go.")] = "sweeps",
    data_dir: DataDir = None,
) -> None:
    """Search hyperparameters with Optuna (needs nn-numba[sweep]).

    Each trial is a run folder under SWEEP/runs/; the same command again continues the study.
    """
    from .runs import check_run_name
    from .sweep import sweep as run_sweep

    if name is not None:
        check_run_name(name)
    run_sweep(sweep_file, trials=trials, workers=workers, storage_url=storage, name=name, out=out,
              data_dir=data_dir)


@app.command(cls=PlainHelp)
def download(
    dir: Annotated[str | None, typer.Option("--dir", metavar="DIR",
                                            help="Where to put the files (default: the cache).")] = None,
) -> None:
    """Download MNIST and verify its SHA-256 sums."""
    from .data import download_command

    download_command(dir)


@app.command(cls=PlainHelp)
def report(
    runs: Annotated[list[str] | None, typer.Argument(metavar="RUN",
                                                     help="Run folders (default: the latest in runs/).")] = None,
    out: Annotated[str | None, typer.Option(metavar="DIR",
                                            help="Write into DIR/<run-name>/ (default: RUN/report/).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Plots and a report.md of runs (needs nn-numba[plot]).

    Curves, confusion matrix, worst mistakes, the applied lr schedule, augmented samples.
    """
    from .report import report as make_report

    make_report(runs, out=out, data_dir=data_dir)


@app.command(cls=PlainHelp)
def bench(
    threads: Annotated[str, typer.Option(metavar="LIST", help="Thread counts to test, comma-separated.")] = "1,2",
    batches: Annotated[str, typer.Option(metavar="LIST",
                                         help="Batch sizes of the epoch runs, comma-separated.")] = "32,64,256,1024",
    kernel_batch: Annotated[int, typer.Option(metavar="N", help="Batch size of the per-kernel table.")] = 256,
    quick: Annotated[bool, typer.Option("--quick", help="A short run (under 30 s): first thread count, "
                                                        "batches 64 and 256, shorter passes.")] = False,
    data: Annotated[str, typer.Option(metavar="mnist|random",
                                      help="mnist: the training images, if on this machine (the first layer "
                                           "skips their zero pixels); random: dense pixels.")] = "mnist",
    passes: Annotated[int | None, typer.Option(metavar="N",
                                               help="Timed epoch passes per side and batch size (default 3, "
                                                    "2 with --quick); more give steadier minima on a "
                                                    "busy machine.")] = None,
    as_json: Json = False,
) -> None:
    """Speed of kernels and epochs against NumPy/BLAS.

    Also inference, JIT cost and the C++ port when built. MNIST's images when present, else random.
    """
    import os

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: measurements run in child processes
    from .bench import bench as run_bench

    run_bench(threads, batches, quick=quick, as_json=as_json, kernel_batch=kernel_batch, data=data, passes=passes)


def _ctrl_c(signum, frame) -> None:
    raise CtrlC


def main() -> None:
    for stream in (sys.stdout, sys.stderr):  # what printable() lets through but the encoding cannot take
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        old = signal.signal(signal.SIGINT, _ctrl_c)
    except ValueError:  # not the main thread: leave Ctrl-C to whoever runs it
        old = None
    try:
        app()  # standalone: click prints usage errors and exits 2 by itself
    except CtrlC:
        print("nn-numba: error: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except NNError as e:
        print(f"nn-numba: error: {printable(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except MemoryError:  # configs and readers cap their sizes; this is the machine itself running out
        print("nn-numba: error: out of memory; use a smaller model or batch_size", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a file problem no module anticipated: still one line that names the file
        print(f"nn-numba: error: {printable(e.filename or 'I/O')}: {printable(e.strerror or e)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if old is not None:  # main() called in-process (tests): give Ctrl-C back
            signal.signal(signal.SIGINT, old)


if __name__ == "__main__":
    main()
