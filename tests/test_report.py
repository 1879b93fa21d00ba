"""`nn-numba report`: every picture is a real PNG of a sensible size, report.md links them all, the figures
it quotes agree with metrics.jsonl and with a float64 NumPy evaluation of best.ck, and the errors are one
line each (missing run, missing metrics, damaged checkpoint, missing matplotlib).

Two small real runs on real MNIST (784-32-10, 2 epochs): a constant rate without augmentation, and a
warmed-up cosine rate with shift/rotate augmentation, so both kinds of page and the overlay are made.
"""

import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import reference as ref
from PIL import Image

import nn_numba.report as R
from nn_numba import cli
from nn_numba.checkpoint import load
from nn_numba.config import from_dict, load_config
from nn_numba.data import load_mnist
from nn_numba.errors import NNError
from nn_numba.model import MLP
from nn_numba.train import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE = {"train": {"epochs": 2, "batch_size": 256}, "model": {"sizes": [784, 32, 10]}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_path):
    """Two finished runs in ROOT/runs/ and their reports in the default place (RUN/report/)."""
    root = tmp_path_factory.mktemp("report")
    out = str(root / "runs")
    plain = from_dict({**BASE, "train": {**BASE["train"], "out": out}})
    fancy = from_dict({**BASE, "train": {**BASE["train"], "out": out, "seed": 1},
                       "schedule": {"name": "cosine", "warmup_epochs": 0.5},
                       "augment": {"shift": 2, "rotate": 10.0}})
    a = train(plain, data_dir=str(mnist_path), quiet=True)
    b = train(fancy, data_dir=str(mnist_path), quiet=True)
    summaries = R.report([str(a), str(b)], data_dir=str(mnist_path), quiet=True)
    return {"root": root, "out": out, "a": a, "b": b, "summaries": summaries}


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def links(md_path):
    """Targets of every Markdown link and image in a page."""
    return re.findall(r"\]\(([^)]+)\)", md_path.read_text())


def check_png(path, min_side=300, max_side=2000):
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert min_side <= w <= max_side and min_side <= h <= max_side, f"{path}: {w}x{h}"
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100, f"{path} is (nearly) blank"


# ------------------------------------------------------------------------------------------- the pages


def test_every_file_is_a_png_of_sensible_size(runs):
    want = {runs["a"]: ["curves", "confusion", "mistakes", "lr"],
            runs["b"]: ["curves", "confusion", "mistakes", "lr", "augment"]}
    for run, names in want.items():
        rep = run / "report"
        extra = ["compare"] if run == runs["a"] else []  # the overlay goes beside the first run's report
        assert sorted(p.stem for p in rep.glob("*.png")) == sorted(names + extra)
        for name in names:
            check_png(rep / f"{name}.png")
    check_png(runs["a"] / "report" / "compare.png")


def test_no_augment_picture_without_augmentation(runs):
    assert not (runs["a"] / "report" / "augment.png").exists()
    assert "augment" not in runs["summaries"][0]["files"]
    assert "augment" in runs["summaries"][1]["files"]


def test_report_md_links_every_picture_and_they_exist(runs):
    for run in (runs["a"], runs["b"]):
        rep = run / "report"
        targets = links(rep / "report.md")
        pngs = {t for t in targets if t.endswith(".png")}
        assert pngs == {p.name for p in rep.glob("*.png")} - {"compare.png"}
        for t in targets:
            assert (rep / t).resolve().is_file(), t
        assert "compare.md" in " ".join(targets)  # each run's page points at the comparison


def test_compare_page_links_both_runs_and_the_overlay(runs):
    page = runs["a"] / "report" / "compare.md"
    assert runs["summaries"][0]["compare"] == str(page)
    targets = links(page)
    assert "compare.png" in targets
    resolved = {(page.parent / t).resolve() for t in targets}
    assert (runs["a"] / "report" / "report.md").resolve() in resolved
    assert (runs["b"] / "report" / "report.md").resolve() in resolved
    for r in resolved:
        assert r.is_file()


def test_quoted_figures_agree_with_metrics(runs):
    for run, s in zip((runs["a"], runs["b"]), runs["summaries"]):
        hist = metrics(run)
        best = max(hist, key=lambda r: r["val_acc"])  # the first best, as train.py keeps it
        assert s["best_epoch"] == best["epoch"]
        assert s["best_test_acc"] == best["test_acc"]
        # best.ck evaluated again on the real test set gives the accuracy recorded for that epoch
        assert s["best_ck_test_acc"] == best["test_acc"]
        assert load(run / "best.ck").meta["epoch"] == best["epoch"]
        wall = sum(r["seconds"] for r in hist)
        assert math.isclose(s["wall_seconds"], wall)
        assert math.isclose(s["samples_per_s"], sum(r["samples_per_s"] * r["seconds"] for r in hist) / wall)
        md = (run / "report" / "report.md").read_text()
        assert f"best epoch on validation | {best['epoch']} ({100 * best['val_acc']:.2f}% validation)" in md
        assert f"{100 * best['test_acc']:.2f}%" in md
        assert f"{s['samples_per_s']:,.0f} images/s" in md
        assert (run / "config.toml").read_text().strip() in md


def test_confusion_and_confidence_match_a_float64_reference(runs, mnist_path):
    mnist = load_mnist(str(mnist_path))
    ck = load(runs["b"] / "best.ck")
    y = mnist.test_y.astype(np.int64)
    acc, pred, proba, conf = R.predict_test_set(MLP.from_checkpoint(ck), mnist.test_x, y)
    P = ref.softmax(ref.forward(ck.weights, ck.biases, mnist.test_x / 255.0)[-1])
    np.testing.assert_allclose(proba, P, atol=1e-5)
    top2 = np.sort(P, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4  # float32 vs float64 may swap near-ties only
    assert clear.mean() > 0.99
    assert (pred[clear] == P.argmax(axis=1)[clear]).all()
    want = np.zeros((10, 10), np.int64)
    for t, p in zip(y, pred):
        want[t, p] += 1
    assert (conf == want).all()
    assert (conf.sum(axis=1) == np.bincount(y, minlength=10)).all()
    assert acc == np.trace(conf) / len(y) == runs["summaries"][1]["best_ck_test_acc"]


def test_lr_schedule_matches_the_docs_and_the_record(runs):
    run = runs["b"]
    cfg = load_config(run / "config.toml")
    lr = R.schedule(cfg)
    spe = math.ceil((60000 - 6000) / 256)
    assert R.steps_per_epoch(cfg) == spe and len(lr) == 2 * spe
    # docs/training.md in float64: linear warm-up over half an epoch, then cosine to 0
    want = [ref.lr_at(s, spe, 2, 1e-3, "cosine", warmup_epochs=0.5) for s in range(2 * spe)]
    np.testing.assert_allclose(lr, want, rtol=1e-12, atol=1e-18)
    hist = metrics(run)
    np.testing.assert_allclose([r["lr"] for r in hist], lr[[r["step"] - 1 for r in hist]], rtol=1e-12)
    assert runs["summaries"][1]["lr_gap"] < 1e-12
    assert "They agree." in (run / "report" / "report.md").read_text()


def test_worst_mistakes_are_wrong_and_most_confident_first():
    y = np.array([0, 1, 2, 3, 4, 5])
    pred = np.array([0, 2, 2, 1, 9, 7])
    proba = np.full((6, 10), 0.01)
    proba[[1, 3, 4, 5], [2, 1, 9, 7]] = [0.6, 0.9, 0.6, 0.3]
    assert R.worst_mistakes(y, pred, proba, 10).tolist() == [3, 1, 4, 5]  # ties by index
    assert R.worst_mistakes(y, pred, proba, 2).tolist() == [3, 1]
    assert R.worst_mistakes(y, y, proba, 5).tolist() == []


# ------------------------------------------------------------------------------------------- the command


def test_cli_two_runs_into_out(runs, mnist_path, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    monkeypatch.setattr(sys, "argv", ["nn-numba", "report", str(runs["a"]), str(runs["b"]),
                                      "--out", str(out), "--data-dir", str(mnist_path)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0
    for run in (runs["a"], runs["b"]):
        assert (out / run.name / "report.md").is_file()
        check_png(out / run.name / "curves.png")
    check_png(out / "compare.png")
    targets = links(out / "report.md")
    assert f"{runs['a'].name}/report.md" in targets and f"{runs['b'].name}/report.md" in targets
    assert str(out / "report.md") in capsys.readouterr().out


def test_default_is_the_latest_run(runs, mnist_path, tmp_path, monkeypatch):
    seen = []  # the drawing itself is checked above: here only which run is chosen, and where it goes
    monkeypatch.setattr(R, "report_run", lambda run, mnist, dest: seen.append((run.path, dest)) or {})
    R.report(None, out=str(tmp_path), data_dir=str(mnist_path), runs_root=runs["out"], quiet=True)
    assert seen == [(runs["b"], tmp_path / runs["b"].name)]  # OUT/latest points at the newer run


def test_same_run_name_twice_gets_two_folders(runs, tmp_path):
    other = tmp_path / "elsewhere" / runs["a"].name
    shutil.copytree(runs["a"], other, ignore=shutil.ignore_patterns("report"))
    dests = R.destinations([R.load_run(runs["a"]), R.load_run(other)], str(tmp_path / "o"))
    assert [d.name for d in dests] == [runs["a"].name, runs["a"].name + "-2"]


# ------------------------------------------------------------------------------------------- errors


def one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(NNError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def copy_run(runs, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(runs["a"], dst, ignore=shutil.ignore_patterns("report"))
    return dst


def test_missing_run_folder(tmp_path):
    msg = one_line_error(R.report, [str(tmp_path / "nope")], quiet=True)
    assert "nope" in msg and "does not exist" in msg


def test_no_runs_at_all(tmp_path):
    assert "nn-numba train" in one_line_error(R.report, None, runs_root=str(tmp_path), quiet=True)


def test_missing_metrics(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    (run / "metrics.jsonl").unlink()
    assert "metrics.jsonl" in one_line_error(R.report, [str(run)], quiet=True)
    assert not (run / "report").exists()


def test_damaged_metrics_line(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "st\n')
    msg = one_line_error(R.report, [str(run)], quiet=True)
    assert "metrics.jsonl" in msg and "line 3" in msg


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_checkpoint(runs, tmp_path, damage):
    run = copy_run(runs, tmp_path)
    ck = run / "best.ck"
    raw = bytearray(ck.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF
    ck.write_bytes(bytes(raw))
    # the good run first: nothing is written when any run named is broken
    msg = one_line_error(R.report, [str(runs["a"]), str(run)], out=str(tmp_path / "o"), quiet=True)
    assert "best.ck" in msg
    assert not (tmp_path / "o").exists()


def test_a_file_instead_of_a_run(runs):
    assert "not a run folder" in one_line_error(R.report, [str(runs["a"] / "best.ck")], quiet=True)


def test_missing_matplotlib_is_one_clear_line(runs, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    msg = one_line_error(R.report, [str(runs["a"])], quiet=True)
    assert "matplotlib" in msg and "pip install 'nn-numba[plot]'" in msg
    monkeypatch.setattr(sys, "argv", ["nn-numba", "report", str(runs["a"])])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'nn-numba[plot]'" in err and "Traceback" not in err


def test_the_package_never_imports_matplotlib():
    import pkgutil

    import nn_numba

    mods = [f"nn_numba.{m.name}" for m in pkgutil.iter_modules(nn_numba.__path__)]
    code = (f"import sys, importlib\nfor m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "report" in " ".join(mods) and out.strip() == "[]"


def test_a_comparison_draws_held_out_accuracy_never_the_augmented_training_figure(tmp_path):
    """compare.png draws validation accuracy, and for a run trained without a validation split (the shipped
    default) its test accuracy: its training accuracy is a running mean over distorted digits."""
    row = {"epoch": 1, "train_loss": 0.5, "train_acc": 0.7, "test_acc": 0.8}
    with_val = R.Run(tmp_path, load_config("no-augment"), [row | {"val_acc": 0.9}], None)
    without = R.Run(tmp_path, load_config("default"), [row], None)
    assert (R.compared(with_val), R.compared(without)) == ("val_acc", "test_acc")
    R.plot_compare([with_val, without], tmp_path / "compare.png")
    check_png(tmp_path / "compare.png")
