"""`nn-numba bench --quick --json`: it runs and reports sane numbers. No timing is asserted (shared machine)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, mnist_dir
from test_cpp import nn_cpp  # noqa: F401  (the fixture that builds cpp/build/nn-cpp)

from nn_numba import bench
from nn_numba.config import load_config
from nn_numba.rng import n_val


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "nn_numba.cli", "bench", "--quick", "--json", "--threads", "1",
                        "--batches", "256", "--kernel-batch", "64", "--passes", "3"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_header_names_the_machine_and_versions(report):
    assert report["machine"]["cpu"] and report["machine"]["cores"] >= 1
    assert report["data"].startswith(("MNIST training images", "random"))  # says what it trained on
    if os.environ.get("NN_NUMBA_DATA"):  # CI points it at the real files: the bench must use them
        assert report["data"].startswith("MNIST training images")
    info = report["threads"]["1"]["info"]
    assert info["numba_threads"] == 1 and info["openblas_threads"] == "1"
    assert info["threading_layer"] in ("omp", "tbb", "workqueue")
    assert info["numpy"] and info["numba"] and info["blas"]


def test_kernel_rows_are_complete_and_positive(report):
    k = report["threads"]["1"]["kernels"]
    assert k["batch"] == 64
    names = [r["name"] for r in k["rows"]]
    for want in ("fwd1", "fwd2", "fwd3", "softmax", "bwd dA2", "bwd dA1", "dW1", "dW2", "dW3", "sgd update"):
        assert any(n.startswith(want) for n in names), want
    for r in k["rows"]:
        assert positive(r["numba_s"]) and positive(r["numpy_s"]), r
        assert r["ratio"] == pytest.approx(r["numba_s"] / r["numpy_s"])
        rate = r.get("gflops", r.get("gbps"))
        assert positive(rate) and rate < 10_000, r  # GFLOP/s beyond 10 TFLOP/s would mean a wrong FLOP count


def test_epoch_rows(report):
    t = report["threads"]["1"]
    assert positive(t["gemm2048_gflops"])
    assert t["gemm_samples"] == 1 + len(t["epochs"])  # sampled at the start and before each batch size
    assert 0 < t["gemm2048_gflops_min"] <= t["gemm2048_gflops"]  # the limit is the fastest sample
    assert t["gemm_limited_epoch_s"] == pytest.approx(70.44e9 / (t["gemm2048_gflops"] * 1e9))
    (e,) = t["epochs"]
    assert e["gemm_fraction"] == pytest.approx(t["gemm_limited_epoch_s"] / e["numba_s"])
    assert e["batch"] == 256
    assert report["reps"] == 3  # --passes overrides --quick's 2
    for key in ("numba_s", "numba_median_s", "numpy_s", "numpy_median_s", "ratio", "numba_samples_per_s",
                "numba_gflops", "gemm_fraction"):
        assert positive(e[key]), key
    assert e["numba_s"] <= e["numba_median_s"] and e["numpy_s"] <= e["numpy_median_s"]
    assert e["numba_samples_per_s"] == pytest.approx(60_000 / e["numba_s"])
    # both trainers start from He-initialised weights (loss ln 10 = 2.3) and train a few passes with SGD
    assert 0 < e["numba_loss"] < 4 and 0 < e["numpy_loss"] < 4


def test_actual_flop_limit_counts_the_lit_pixels_of_the_data(report):
    """The actual-FLOP limit of the epoch rows: the lit pixels of the 60,000 images the bench trains on,
    counted here again, at the same GEMM rate as the dense limit."""
    t = report["threads"]["1"]
    X, _, what = bench.load_data("mnist")
    assert report["data"] == what
    lit = int(np.count_nonzero(X))
    # per image: forward and dW of layer 1 over its lit pixels, forward, dW and dX of 250x250 and 250x10
    want = 2 * (2 * 250 * lit + 60_000 * 3 * (250 * 250 + 250 * 10))
    assert t["info"]["actual_flop_per_epoch"] == pytest.approx(want, rel=1e-12)
    assert t["actual_limited_epoch_s"] == pytest.approx(want / (t["gemm2048_gflops"] * 1e9))
    (e,) = t["epochs"]
    assert e["actual_fraction"] == pytest.approx(t["actual_limited_epoch_s"] / e["numba_s"])
    if what.startswith("MNIST"):  # 19 % of the pixels lit: less than half the dense FLOPs
        assert 0.3 < t["actual_limited_epoch_s"] / t["gemm_limited_epoch_s"] < 0.6
        assert e["actual_fraction"] < e["gemm_fraction"]


def test_actual_flop_of_a_small_known_batch():
    X = np.zeros((3, 784), np.uint8)
    X[0, [0, 5, 783]] = 255  # 3 lit pixels
    X[1, 100:110] = 1  # 10
    lit = [3, 10, 0]
    macs = 0  # multiply-adds, product by product
    for n in lit:
        macs += n * 250 + n * 250  # layer 1: forward and weight gradient over lit pixels only
        macs += 3 * 250 * 250 + 3 * 250 * 10  # layers 2 and 3: forward, input and weight gradient
    assert bench.actual_flop(X) == 2 * macs
    assert bench.actual_flop(np.ones((7, 784), np.uint8)) == 7 * bench.FLOP_PER_SAMPLE  # all lit: dense


def test_vector_width_is_named(report):
    i = report["threads"]["1"]["info"]
    assert i["vector_lanes"] in (8, 16) and i["host_lanes"] in (8, 16)
    assert i["vector_lanes"] <= i["host_lanes"]
    assert f"{i['vector_lanes']}-lane vectors" in bench.table(report)


def test_default_recipe_epoch_beside_its_plain_epoch(report):
    rc = report["threads"]["1"]["recipe"]
    if not report["data"].startswith("MNIST"):
        assert rc is None  # the recipe trains on MNIST's files
        return
    cfg = load_config("default")
    assert rc["samples"] == 60_000 - n_val(60_000, cfg.data.val_split)  # its training images
    assert rc["batch"] == cfg.train.batch_size and f"batch {rc['batch']};" in bench.table(report)
    for key in ("augmented_s", "augmented_median_s", "plain_s", "plain_median_s"):
        assert positive(rc[key]), key
    assert rc["augment_overhead"] == pytest.approx(rc["augmented_s"] / rc["plain_s"] - 1)
    assert "default recipe" in bench.table(report)


def test_inference_and_jit(report):
    inf = report["threads"]["1"]["inference"]
    for key in ("batch1000_samples_per_s", "batch1000_gflops", "batch1_latency_us"):
        assert positive(inf[key]["numba"]) and positive(inf[key]["numpy"])
    warm = report["jit"]["warm"]
    assert positive(warm["process_s"]) and positive(warm["first_step_s"])
    assert warm["process_s"] >= warm["import_s"]


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(bench.NNError, match="--threads"):
        bench.bench(threads="one")
    with pytest.raises(bench.NNError, match="cores"):
        bench.bench(threads=str((os.cpu_count() or 1) + 1))
    with pytest.raises(bench.NNError, match="--passes"):
        bench.bench(passes=0)


def test_batches_larger_than_an_epoch_are_refused_before_any_worker_starts(monkeypatch):
    """A batch can hold at most the epoch's 60,000 samples; a larger one would size buffers for it."""
    def run(*args, **kwargs):
        raise AssertionError("the bench started its workers")

    monkeypatch.setattr(bench, "run", run)
    for kwargs in ({"batches": "64,60001"}, {"batches": "100000000"}, {"kernel_batch": 60_001}):
        with pytest.raises(bench.NNError, match=r"out of range \[1, 60000\]"):
            bench.bench(**kwargs)


def test_kernel_rates_count_flops():
    # fwd1 at B=10 in 1 ms: 2 * 10 * 784 * 250 FLOP
    assert bench._kernel_rate("fwd1 lin+bias+relu", 10, 1e-3)["gflops"] == pytest.approx(2 * 10 * 784 * 250 / 1e6)
    assert bench._kernel_rate("dW3 + db3", 10, 1e-3)["gflops"] == pytest.approx(2 * 10 * 250 * 10 / 1e6)
    # 784-250-250-10: forward and dW of all three layers, dX of the last two; 2 FLOP per multiply-add
    assert bench.FLOP_PER_SAMPLE == 2 * (2 * (784 * 250 + 250 * 250 + 250 * 10) + 250 * 250 + 250 * 10) == 1_174_000
    assert bench.FLOP_PER_SAMPLE * bench.N_TRAIN == pytest.approx(70.44e9)


def test_data_is_mnist_when_present_else_random_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("NN_NUMBA_DATA", str(tmp_path / "nowhere"))
    X, y, what = bench.load_data("mnist")
    assert what.startswith("random") and "MNIST not found" in what
    assert X.shape == (60_000, 784) and X.min() > 0 and y.shape == (60_000,)  # no zero pixel: the dense path
    _, _, what = bench.load_data("random")
    assert what == "random (uniform pixels, none 0)"


def test_epoch_passes_alternate_sides_and_thread_counts(monkeypatch):
    """The timed passes of a round go Numba 1T, NumPy 1T, Numba 2T, NumPy 2T, so that a drift of the host
    between the phases of a run cannot favour one thread count; each thread count gets its own rows."""
    log = []
    fake_children(monkeypatch, log)
    res = bench.run([1, 2], [64], cpp=False, passes=2)
    epochs = [("numba", 1), ("numpy", 1), ("numba", 2), ("numpy", 2)] * 2
    recipe = [("recipe", T, aug) for T in (1, 2) for aug in (True, False)] * 2
    assert log == epochs + [("warm-up", 1)] * 2 + [("warm-up", 2)] * 2 + recipe
    for T in ("1", "2"):
        (row,) = res["threads"][T]["epochs"]
        assert row["numba_s"] == pytest.approx(0.5 + 0.1 * int(T))
        assert row["ratio"] == pytest.approx((0.5 + 0.1 * int(T)) / (1.5 + 0.1 * int(T)))
        assert res["threads"][T]["gemm_samples"] == 2
        rc = res["threads"][T]["recipe"]
        assert rc["augmented_s"] == 2.0 and rc["plain_s"] == 1.0 and rc["augment_overhead"] == pytest.approx(1.0)


def fake_children(monkeypatch, log):
    """Numba and NumPy workers that answer instantly; their epoch passes go into `log`."""

    class FakeChild:
        def __init__(self, kind, threads, data):
            self.kind, self.threads = kind, threads

        def ask(self, op, **args):
            if op == "epoch" and args.get("reps"):
                log.append((self.kind, self.threads))
                return {"times": [0.5 + 0.1 * self.threads + (self.kind == "numpy")], "loss": 1.0}
            info = {"data": "MNIST training images (fake)", "data_dir": "/mnist", "numba": "0", "numpy": "0",
                    "threading_layer": "omp", "numba_threads": self.threads, "blas": "fake",
                    "openblas_threads": "1", "openblas_coretype": None, "vector_lanes": 8, "host_lanes": 8,
                    "actual_flop_per_epoch": 30e9}
            if op == "recipe":
                log.append(("recipe", self.threads, args["augment"]) if args["reps"] else ("warm-up", self.threads))
                return {"times": [1.0 + args["augment"]] * args["reps"], "samples": 54_000, "batch": 256}
            return {"info": info,
                    "gemm": {"gflops": 100.0 * self.threads}, "kernels": {"fwd2 lin+bias+relu": 1e-3},
                    "epoch": {"times": [], "loss": 1.0},
                    "infer": {"batch1000_s_per_10k": 0.1, "batch1_s": 1e-5}}[op]

        def close(self):
            pass

    monkeypatch.setattr(bench, "Child", FakeChild)
    monkeypatch.setattr(bench, "jit_cost", lambda cold: {"warm": {"process_s": 1.0, "import_s": 0.5,
                                                                  "first_step_s": 0.1}})


def test_cpp_column_runs_beside_numba_on_the_same_data(monkeypatch):
    """Each round runs a C++ epoch right after the Numba and NumPy passes of the same thread count, on the
    folder the Numba side trained from; the row keeps the fastest C++ pass and its ratio to Numba's."""
    log = []
    fake_children(monkeypatch, log)
    calls = []

    def fake_cpp(B, threads, timeout, data_dir=None):
        log.append(("cpp", threads))
        calls.append((B, data_dir))
        return {"seconds_per_epoch": 0.3 + 0.1 * len(calls), "samples_per_s": 1.0, "optimizer": "sgd", "data": "mnist"}

    monkeypatch.setattr(bench, "cpp_epoch", fake_cpp)
    res = bench.run([1, 2], [64], passes=2)
    epochs = [e for e in log if e[0] in ("numba", "numpy", "cpp")]
    assert epochs == [("numba", 1), ("numpy", 1), ("cpp", 1), ("numba", 2), ("numpy", 2), ("cpp", 2)] * 2
    assert calls == [(64, "/mnist")] * 4
    for T, first in (("1", 0.4), ("2", 0.5)):  # passes 1 and 3 for one thread, 2 and 4 for two
        (row,) = res["threads"][T]["epochs"]
        c = row["cpp"]
        assert c["seconds_per_epoch"] == pytest.approx(first) and c["passes"] == 2
        assert c["median_s"] == pytest.approx(first + 0.1)
        assert c["ratio"] == pytest.approx(first / row["numba_s"])
    text = bench.table(res)
    assert "C++/numba" in text and f"{0.4 / res['threads']['1']['epochs'][0]['numba_s']:9.2f}" in text


def test_cpp_column_reports_a_failed_run(monkeypatch):
    fake_children(monkeypatch, [])
    monkeypatch.setattr(bench, "cpp_epoch", lambda *a, **k: {"seconds_per_epoch": None, "note": "failed: boom"})
    res = bench.run([1], [64], passes=2)
    assert res["threads"]["1"]["epochs"][0]["cpp"] == {"seconds_per_epoch": None, "note": "failed: boom"}
    assert bench.table(res)  # renders "-" for the missing column


@pytest.mark.usefixtures("nn_cpp")
def test_cpp_epoch_trains_on_mnist():
    """The real `nn-cpp bench` behind the column: one SGD epoch on MNIST's training images."""
    c = bench.cpp_epoch(64, 1, timeout=600, data_dir=str(mnist_dir()))
    assert c["data"] == "mnist" and c["optimizer"] == "sgd", c
    assert positive(c["seconds_per_epoch"])
    assert c["samples_per_s"] == pytest.approx(60_000 / c["seconds_per_epoch"], rel=1e-4)
    assert 0 < c["loss"] < 1.0  # one epoch of SGD on MNIST: well below ln 10 = 2.3
