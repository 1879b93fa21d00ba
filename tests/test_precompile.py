"""Compiling from an empty kernel cache: `train` records its kernels and compiles them in parallel processes
(precompile.py); the commands that do not train compile none of the training kernels."""

import os
import subprocess
import sys

import numpy as np
from conftest import ROOT
from numba import njit
from PIL import Image

from nn_numba import kernels, precompile
from nn_numba.checkpoint import save
from nn_numba.config import load_config
from nn_numba.model import MLP
from nn_numba.train import warm_plan

SHARED = {"gather", "linear_forward", "softmax_xent"}  # the kernels inference calls too


def _training_kernels() -> set[str]:
    """The kernels of a training step, augmented or not, that inference has no use for."""
    plans = [warm_plan(load_config(ROOT / "configs" / f"{c}.toml")) for c in ("default", "no-augment")]
    return {e[1] for plan in plans for e in plan} - SHARED


def _cached(cache) -> set[str]:
    """The functions with compiled code in a NUMBA_CACHE_DIR (their index files, module.function-line...)."""
    return {p.name.split("-")[0].split(".")[-1] for p in cache.rglob("*.nbi")}


def test_the_plan_is_the_step_s_kernels_and_recording_compiles_nothing():
    before = {k: len(f.overloads) for k, f in vars(kernels).items() if hasattr(f, "overloads")}
    plan = warm_plan(load_config(ROOT / "configs" / "no-augment.toml"))
    names = [e[1] for e in plan]
    assert {"gather_nonzeros", "nonzero_blocks", "sparse_forward", "linear_forward", "softmax_xent",
            "linear_backward_input", "linear_backward_weight", "sparse_backward_weight"} <= set(names)
    assert names.count("linear_forward") == 1  # one specialisation for every hidden layer
    assert before == {k: len(f.overloads) for k, f in vars(kernels).items() if hasattr(f, "overloads")}


def test_a_worker_compiles_its_claims_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    loss = np.zeros(3, np.float32)
    plan = precompile.record(lambda: kernels.total(loss))
    assert [e[:2] for e in plan] == [("nn_numba.kernels", "total")]
    job = precompile.Job(plan, workers=1)
    job.close(kill=False)  # waits for the worker, which took everything: this process compiled nothing
    assert _cached(tmp_path) == {"total"}
    assert not job.claims.exists()


def test_a_worker_compiles_a_parallel_kernel_that_asks_for_the_thread_count(tmp_path, monkeypatch):
    """A worker is a fresh process whose threading layer nothing has loaded yet: the kernels that ask how many
    threads their loop gets (`simd.threads`) must still compile there. A worker that dies leaves its
    kernels, and those it had not claimed, to the command itself, which then compiles them one by one."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    dY, W = np.zeros((7, 10), np.float32), np.zeros((10, 250), np.float32)
    A, dX = np.zeros((7, 250), np.float32), np.zeros((7, 250), np.float32)
    plan = precompile.record(lambda: kernels.linear_backward_input(dY, W, A, dX))
    job = precompile.Job(plan, workers=1)
    job.close(kill=False)
    assert "linear_backward_input" in _cached(tmp_path)


def test_join_goes_on_when_a_worker_died(tmp_path, monkeypatch):
    """join waits for each worker's word that its kernels are saved; a worker that died says nothing, and
    this process then compiles what it had not claimed yet."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    loss = np.zeros(3, np.float32)
    plan = precompile.record(lambda: kernels.total(loss))
    with precompile.Job(plan, workers=1) as job:
        job.procs[0].kill()  # before it could claim anything: it takes tenths of a second to start
        job.join()  # returns: the dead worker's stdout is at its end
        assert not job.claims.exists()
    assert plan[0][2] in kernels.total.overloads  # compiled (or loaded) here


def test_commands_that_do_not_train_compile_no_training_kernel(tmp_path, mnist_path):
    cache = tmp_path / "cache"
    ck = tmp_path / "m.ck"
    save(ck, MLP.init([784, 32, 10], np.random.default_rng(0)).to_checkpoint({}))
    img = tmp_path / "digit.png"
    Image.fromarray((np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8)).save(img)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    for args in (["info", ck], ["evaluate", ck, "--data-dir", mnist_path], ["predict", img, "--checkpoint", ck],
                 ["export", ck, "--to", tmp_path / "m.npz"]):
        r = subprocess.run([sys.executable, "-m", "nn_numba.cli", *map(str, args)], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    compiled = _cached(cache)
    assert SHARED - {"gather"} <= compiled  # evaluate and predict ran their kernels
    assert not compiled & _training_kernels()


def test_a_claim_covers_every_specialisation_of_a_kernel(tmp_path):
    """Two specialisations of one kernel are compiled by the process that claims it, never one each by two
    processes (Numba's cache index could then name one's compiled file for the other's types)."""
    from numba import typeof

    sigs = [(typeof(np.zeros(3, np.float32)),), (typeof(np.zeros(3, np.float64)),)]
    plan = [("nn_numba.kernels", "total", s) for s in sigs]
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir(), theirs.mkdir()
    (theirs / "0").touch()  # another process holds the kernel: this one compiles neither specialisation
    before = set(kernels.total.overloads)
    precompile.compile_claimed(plan, theirs)
    assert set(kernels.total.overloads) == before
    precompile.compile_claimed(plan, mine)
    assert sorted(p.name for p in mine.iterdir()) == ["0"] and {s for (s,) in sigs} <= {
        a for (a,) in kernels.total.overloads}


@njit
def _shared_helper(x):
    # the larger part of each caller's compile: Numba compiles it with the first caller and loads it from
    # the kernel cache for the next one, so the plan's order counts it once, for the costliest caller
    y = x + 1
    y = y * 2 - x
    y = y * y + 3
    y = y - x * 5
    return y * y - y


@njit
def _calls_it(x):  # the costliest kernel: the helper and this
    return _shared_helper(x) * 2 + 1


@njit
def _calls_it_too(x):
    return _shared_helper(x) - 1


@njit
def _alone(x):  # larger than either caller alone, smaller than either with the helper: before the second
    return x * 3 + x * 5 + x * 7 + x * 9 + x * 11


def test_the_costliest_kernels_go_first_and_a_shared_helper_counts_once():
    plan = [(__name__, f, ()) for f in ("_alone", "_calls_it_too", "_calls_it")]
    assert [e[1] for e in precompile.largest_first(plan)] == ["_calls_it", "_alone", "_calls_it_too"]
