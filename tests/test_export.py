"""`nn-numba export`: the ONNX graph (run by onnxruntime) and the .npz (run by the README's NumPy lines) give
the same digits as `nn-numba evaluate` on all 10,000 test images, logits within 1e-5; bad input is one line
and leaves an existing file as it was."""

import errno
import json
import os
import re
import sys

import numpy as np
import pytest
from conftest import ROOT

from nn_numba.checkpoint import load
from nn_numba.config import from_dict
from nn_numba.data import load_mnist
from nn_numba.kernels import PIXEL
from nn_numba.model import MLP, evaluate
from nn_numba.train import train

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_path):
    """A run of a 784-100-50-10 network (two hidden layers: two ReLUs in the graph), one epoch."""
    out = tmp_path_factory.mktemp("export") / "runs"
    cfg = from_dict({"model": {"sizes": [784, 100, 50, 10]},
                     "train": {"epochs": 1, "batch_size": 256, "out": str(out)}})
    return train(cfg, data_dir=str(mnist_path), quiet=True)


@pytest.fixture(scope="module")
def mnist(mnist_path):
    return load_mnist(str(mnist_path))


@pytest.fixture(scope="module")
def reference(run, mnist):
    """What `nn-numba evaluate` computes for best.ck: its predictions, and the logits of the same kernels."""
    model = MLP.from_checkpoint(load(run / "best.ck"))
    _, acc, pred = evaluate(model, mnist.test_x, mnist.test_y)
    return {"acc": acc, "pred": pred, "logits": model.logits(PIXEL[mnist.test_x]),
            "proba": model.predict_proba(PIXEL[mnist.test_x])}


@pytest.fixture
def nn(nn_main):
    """nn("export", ...): the command in this process (conftest.nn_main)."""
    return nn_main


def one_line_error(code: int, err: str) -> str:
    assert code == 1
    assert err.startswith("nn-numba: error: ") and err.count("\n") == 1, err
    return err


def test_onnx_gives_the_digits_of_evaluate(run, mnist, reference, tmp_path, nn):
    to = tmp_path / "digits.onnx"
    code, out, _ = nn("export", run, "--to", to)
    assert code == 0 and str(to) in out
    onnx.checker.check_model(str(to), full_check=True)
    g = onnx.load(str(to)).graph
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*g.input, *g.output)]
    assert [v.name for v in g.output] == ["logits", "probabilities"] and dims == [["N", 784], ["N", 10], ["N", 10]]
    assert sorted(i.name for i in g.initializer) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]

    session = ort.InferenceSession(str(to), providers=["CPUExecutionProvider"])
    logits, proba = session.run(None, {"input": PIXEL[mnist.test_x]})
    assert logits.shape == (10_000, 10)
    assert (logits.argmax(axis=1) == reference["pred"]).all()
    assert np.abs(logits - reference["logits"]).max() <= 1e-5
    assert np.abs(proba - reference["proba"]).max() <= 1e-5
    one, _ = session.run(None, {"input": PIXEL[mnist.test_x[:1]]})  # the batch axis is free
    assert one.shape == (1, 10)


def test_evaluate_command_agrees(run, mnist_path, mnist, tmp_path, nn):
    """The accuracy `nn-numba evaluate` prints is that of the ONNX graph's digits."""
    to = tmp_path / "d.onnx"
    nn("export", run / "best.ck", "--to", to)
    code, out, _ = nn("evaluate", run / "best.ck", "--json", "--data-dir", mnist_path)
    assert code == 0
    logits, _ = ort.InferenceSession(str(to)).run(None, {"input": PIXEL[mnist.test_x]})
    assert json.loads(out)["accuracy"] == (logits.argmax(axis=1) == mnist.test_y).mean()


def readme_numpy_lines() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use the model elsewhere"):]
    [code] = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "np.load(" in b][:1]
    return code


def test_readme_numpy_lines_give_the_same_digits(run, mnist, reference, tmp_path, monkeypatch, nn):
    code = readme_numpy_lines()
    assert len(code.strip().splitlines()) == 5
    monkeypatch.chdir(tmp_path)
    assert nn("export", run, "--to", "digits.npz")[0] == 0
    ns = {"x": PIXEL[mnist.test_x]}
    exec(code, ns)
    assert (ns["digits"] == reference["pred"]).all()
    assert np.abs(ns["h"] - reference["logits"]).max() <= 1e-5


def test_npz_holds_named_weights_sizes_and_meta(run, tmp_path):
    from nn_numba.export import write

    ck = load(run / "best.ck")
    write(ck, tmp_path / "m.npz")
    f = np.load(tmp_path / "m.npz", allow_pickle=False)
    # the state_dict keys of torch.nn.Sequential(Linear, ReLU, Linear, ReLU, Linear)
    assert sorted(f.files) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight", "meta", "sizes"]
    assert f["sizes"].tolist() == [784, 100, 50, 10]
    for l, (W, b) in enumerate(zip(ck.weights, ck.biases)):
        assert f[f"{2 * l}.weight"].dtype == np.float32 and (f[f"{2 * l}.weight"] == W).all()
        assert (f[f"{2 * l}.bias"] == b).all()
    assert json.loads(str(f["meta"])) == ck.meta and ck.meta["epoch"] == 1


def test_a_run_folder_means_its_best_checkpoint(run, tmp_path):
    from nn_numba.export import export

    export(run, tmp_path / "a.npz")
    export(run / "best.ck", tmp_path / "b.npz")
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert all((a[k] == b[k]).all() for k in a.files)


# ------------------------------------------------------------------------------------------- errors


def damaged(run, tmp_path):
    bad = tmp_path / "bad.ck"
    data = bytearray((run / "best.ck").read_bytes())
    data[5000] ^= 0x40  # one bit of a weight: the CRC no longer matches
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("ext", [".onnx", ".npz"])
def test_damaged_checkpoint_is_one_line_and_keeps_the_old_file(run, tmp_path, ext, nn):
    to = tmp_path / f"old{ext}"
    to.write_bytes(b"the previous export")
    code, _, err = nn("export", damaged(run, tmp_path), "--to", to)
    assert "checksum mismatch" in one_line_error(code, err)
    assert to.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ck", f"old{ext}"]  # no temp file left


@pytest.mark.parametrize("to", ["m.pt", "m", "m.onnx.tmp"])
def test_unknown_extension_is_one_line(run, tmp_path, to, nn):
    code, _, err = nn("export", run, "--to", tmp_path / to)
    assert ".onnx (ONNX) or .npz (NumPy)" in one_line_error(code, err)
    assert not (tmp_path / to).exists()


def test_missing_onnx_package_is_one_line(run, tmp_path, monkeypatch, nn):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    code, _, err = nn("export", run, "--to", tmp_path / "m.onnx")
    assert "pip install 'nn-numba[export]'" in one_line_error(code, err)
    assert nn("export", run, "--to", tmp_path / "m.npz")[0] == 0


def test_folder_without_best_and_missing_to_are_one_line(tmp_path, nn):
    code, _, err = nn("export", tmp_path, "--to", tmp_path / "m.npz")
    assert "without best.ck" in one_line_error(code, err)
    code, _, err = nn("export", tmp_path)
    assert "--to" in one_line_error(code, err)


def test_a_failed_write_keeps_the_old_file(run, tmp_path, monkeypatch, nn):
    """The disk fills up while the export is written: the previous file stays whole, no temp file is left."""
    to = tmp_path / "old.npz"
    to.write_bytes(b"the previous export")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = nn("export", run, "--to", to)
    assert "No space left on device" in one_line_error(code, err)
    assert to.read_bytes() == b"the previous export" and [p.name for p in tmp_path.iterdir()] == ["old.npz"]
