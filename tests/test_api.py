"""The Python API: docs/api.md's walk-through runs as written, and the API agrees with the commands."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

import nn_numba
from nn_numba import cli
from nn_numba.errors import NNError

DOC = ROOT / "docs" / "api.md"


def doc_blocks() -> list[str]:
    """The ```python blocks of docs/api.md, in order (a block marked ```python torch needs PyTorch: skipped)."""
    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.S | re.M)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory, mnist_path):
    """The namespace after running every block of docs/api.md in an empty folder, as a notebook would."""
    folder = tmp_path_factory.mktemp("walkthrough")
    mp = pytest.MonkeyPatch()
    mp.chdir(folder)
    mp.setenv("NN_NUMBA_DATA", str(mnist_path))
    ns: dict = {}
    try:
        for code in doc_blocks():
            exec(compile(code, str(DOC), "exec"), ns)
    finally:
        mp.undo()
    ns["folder"] = folder
    return ns


def test_the_walkthrough_runs(walkthrough):
    assert len(doc_blocks()) >= 8
    run = walkthrough["folder"] / walkthrough["run"]
    assert (run / "best.ck").is_file() and (walkthrough["folder"] / "digits.onnx").is_file()
    assert walkthrough["net"].sizes == [784, 250, 250, 10] and walkthrough["small"] == Path("runs/small")
    assert (walkthrough["folder"] / "runs" / "small" / "best.ck").is_file()


def test_fit_takes_a_name_with_overrides(walkthrough):
    cfg = (walkthrough["folder"] / walkthrough["run"] / "config.toml").read_text()
    assert "weight_decay = 0.0001" in cfg  # no-augment.toml's
    assert "epochs = 1" in cfg and "batch_size = 256" in cfg  # the overrides
    assert 'sizes = [784, 64, 10]' in (walkthrough["folder"] / walkthrough["small"] / "config.toml").read_text()


def test_read_metrics_is_the_file(walkthrough):
    run = walkthrough["folder"] / walkthrough["run"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert walkthrough["rows"] == rows and len(rows) == 1


def test_predict_files_is_the_predict_command(walkthrough, monkeypatch, capsys):
    """Same preprocessing, same probabilities as `nn-numba predict --json` (which rounds to 6 places)."""
    folder = walkthrough["folder"]
    monkeypatch.chdir(folder)
    net = walkthrough["net"]
    mnist = walkthrough["mnist"]
    from PIL import Image

    for i in (1, 2):  # one small and one large, light-on-dark and dark-on-light
        img = mnist.test_x[i].reshape(28, 28)
        Image.fromarray(img if i == 1 else 255 - img).resize((28 * 5 * i,) * 2).save(f"d{i}.png")
    monkeypatch.setattr(sys, "argv", ["nn-numba", "predict", "d1.png", "d2.png", "digit.png", "--json",
                                      "--checkpoint", str(net.path)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0
    cli_rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    preds = net.predict_files(["d1.png", "d2.png", "digit.png"])
    assert [p.path for p in preds] == [r["path"] for r in cli_rows]
    assert [p.digit for p in preds] == [r["digit"] for r in cli_rows]
    for p, r in zip(preds, cli_rows):
        assert np.abs(p.probabilities - np.array(r["probabilities"])).max() <= 5e-7
    assert [p.path for p in net.predict_files(".")] == ["d1.png", "d2.png", "digit.png"]  # a folder


def test_array_shapes_and_dtypes_agree(walkthrough):
    net, x = walkthrough["net"], walkthrough["mnist"].test_x[:3]
    want = net.logits(x)
    assert np.array_equal(net.logits(x.reshape(3, 28, 28)), want)
    assert np.array_equal(net.logits(x.astype(np.float32) / 255), want)
    assert np.array_equal(net.logits(x[0].reshape(28, 28)), want[:1])
    assert np.array_equal(net.predict(x), want.argmax(axis=1))
    with pytest.raises(NNError, match=r"shape \(3, 10\)"):
        net.predict(np.zeros((3, 10), np.uint8))
    with pytest.raises(NNError, match=r"in \[0, 1\]"):
        net.predict(x.astype(np.float32))  # 0-255 as floats: a common slip


def test_load_errors_are_nnerrors(tmp_path):
    with pytest.raises(NNError, match="without best.ck"):
        nn_numba.load(tmp_path)
    with pytest.raises(NNError, match="file not found"):
        nn_numba.load(tmp_path / "none.ck")
    with pytest.raises(NNError, match="give a path or one of: default, best, no-augment, seed"):
        nn_numba.fit("defualt")
    with pytest.raises(TypeError, match="unknown override 'epoch'"):
        nn_numba.fit("seed", epoch=1)


def test_import_is_cheap_and_lazy():
    code = ("import sys, nn_numba; assert 'numpy' not in sys.modules and 'numba' not in sys.modules; "
            "assert callable(nn_numba.load) and 'numpy' in sys.modules; print(sorted(nn_numba.__all__))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with pytest.raises(AttributeError):
        nn_numba.no_such_name  # noqa: B018
