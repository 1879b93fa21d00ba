"""The two vector widths of simd.py: 16 lanes (AVX-512) and 8 (AVX2), chosen at import from the CPU or by
NN_NUMBA_LANES. This process tests the width it compiled for (tests/test_simd.py, tests/test_kernels.py);
here a subprocess runs the float64-reference tests under the other width, so both paths are checked on
any host (a 16-lane build on a host without AVX-512 is slower, not wrong)."""

import os
import subprocess
import sys

from conftest import ROOT

from nn_numba import simd

_SHOW = "from nn_numba import simd, jitcache; print(simd.W, simd.host_lanes(), jitcache.key())"


def _lanes(value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NN_NUMBA_LANES"}
    if value is not None:
        env["NN_NUMBA_LANES"] = value
    return subprocess.run([sys.executable, "-c", _SHOW], env=env, capture_output=True, text=True, cwd=ROOT)


def test_width_follows_the_cpu_unless_overridden():
    default, host, key = _lanes(None).stdout.split()
    assert default == host and host in ("8", "16")
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else None
    if flags is not None:
        assert (host == "16") == ("avx512f" in flags)  # what lscpu shows
    w8, w16 = _lanes("8").stdout.split(), _lanes(" 16 ").stdout.split()
    assert w8[:2] == ["8", host] and w16[:2] == ["16", host]
    assert w8[2] != w16[2]  # each width compiles into a kernel cache folder of its own
    assert key == (w16 if host == "16" else w8)[2]


def test_a_bad_width_is_one_line():
    r = subprocess.run([sys.executable, "-m", "nn_numba.cli", "predict", "nothing.png"], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "NN_NUMBA_LANES": "12"})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["nn-numba: error: NN_NUMBA_LANES='12': give 8 or 16 (float32 lanes "
                                             "per vector), or unset it"]


def test_the_other_width_against_the_reference():
    """All of test_simd.py, the kernels' float64-reference tests (products, sparse first layer, two training
    steps of each optimiser, the same bits at any thread count) and the warp's (against the float64
    reference, and training's pass against the plain one bit for bit) compiled for the width this process
    does not use."""
    other = "8" if simd.W == 16 else "16"
    pick = ("test_simd.py or linear or sparse or nonzeros or thread_count or float64_reference or listed_pass or "
            "(train_step_against_reference and (sizes0 or sizes2))")  # 784-250-250-10 at B 64, 784-30-20-17-10 at 5
    files = ["tests/test_simd.py", "tests/test_kernels.py", "tests/test_augment.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rA", *files, "-k", pick]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "NN_NUMBA_LANES": other},
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    ran = {line.split()[1].split("::")[0] for line in r.stdout.splitlines() if line.startswith("PASSED ")}
    assert ran == set(files), ran
    assert " deselected" in r.stdout
