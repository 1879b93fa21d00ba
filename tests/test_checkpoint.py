"""Checkpoint format v1: round trips, the example file, an independent reader, every bad-file error,
fuzzing, and crash safety of `save` (docs/checkpoint-format.md is the contract)."""

import errno
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nn_numba import checkpoint as ckmod
from nn_numba import files
from nn_numba.checkpoint import Checkpoint, CheckpointError, OptimState, describe, load, save
from nn_numba.errors import NNError

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"


def random_ck(sizes, seed=0, kind=None, meta=None, bits=False) -> Checkpoint:
    """Random parameters; with bits=True any finite float32 bit pattern (-0.0, subnormals, 3e38...)."""
    rng = np.random.default_rng(seed)

    def arr(shape):
        if not bits:
            return rng.standard_normal(shape).astype(np.float32)
        a = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32).view(np.float32)
        return np.where(np.isfinite(a), a, np.float32(-0.0)).astype(np.float32)

    shapes = ckmod.shapes(sizes)
    params = [arr(s) for s in shapes]
    optim = None
    if kind is not None:
        optim = OptimState(kind, 1000 + seed, [[arr(s) for s in shapes] for _ in range(ckmod.SLOTS[kind])])
    return Checkpoint(list(sizes), params[0::2], params[1::2], meta or {}, optim)


def assert_same(a: Checkpoint, b: Checkpoint) -> None:
    """Bit-identical parameters and optimizer state, equal meta."""
    assert a.sizes == b.sizes and a.meta == b.meta
    pa, pb = a.weights + a.biases, b.weights + b.biases
    if a.optim is not None or b.optim is not None:
        assert a.optim.kind == b.optim.kind and a.optim.step == b.optim.step
        assert len(a.optim.slots) == len(b.optim.slots)
        pa += [x for s in a.optim.slots for x in s]
        pb += [x for s in b.optim.slots for x in s]
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb, strict=True):
        assert x.shape == y.shape and x.tobytes() == y.tobytes()


def recrc(b: bytes) -> bytes:
    """Fix the trailing CRC so a deliberately malformed body gets past the checksum."""
    b = bytes(b[:-4])
    return b + struct.pack("<I", zlib.crc32(b))


def raw(sizes, params=None, sections=(), version=1, header_bytes=None, dtype=1, act=1, L=None) -> bytes:
    """A file assembled by hand (struct only), with any header field overridden and a valid CRC."""
    L = len(sizes) - 1 if L is None else L
    hb = 24 + 4 * len(sizes) if header_bytes is None else header_bytes
    if params is None:
        params = [np.full(s, 0.5, np.float32) for s in ckmod.shapes(sizes)]
    b = struct.pack(f"<4s5I{len(sizes)}I", b"NNCK", version, hb, dtype, act, L, *sizes)
    b += b"".join(np.asarray(p, "<f4").tobytes() for p in params)
    for tag, payload in sections:
        b += struct.pack("<4sIQ", tag, 0, len(payload)) + payload
    return b + struct.pack("<I", zlib.crc32(b))


def load_bytes(tmp: Path, b: bytes, **kw) -> Checkpoint:
    p = tmp / "x.ck"
    p.write_bytes(b)
    return load(p, **kw)


def error(tmp: Path, b: bytes, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        load_bytes(tmp, b, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp / "x.ck") in msg, msg
    return msg


def folder(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in d.iterdir()}


# ----------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("kind", [None, "sgd", "momentum", "adam"])
def test_round_trip_bit_identical(tmp_path, kind):
    meta = {"epoch": 3, "val_acc": 0.9812, "config": {"lr": 0.1, "sizes": [5, 7, 3]}, "name": "ünï",
            "rng": {"state": {"state": 2**127 + 12345, "inc": 2**100 + 1}}}
    ck = random_ck([5, 7, 6, 3], seed=1, kind=kind, meta=meta, bits=True)
    save(tmp_path / "a.ck", ck)
    back = load(tmp_path / "a.ck", sizes=[5, 7, 6, 3])
    assert_same(ck, back)
    for a in back.weights + back.biases + ([x for s in back.optim.slots for x in s] if kind else []):
        assert a.dtype == np.float32 and a.dtype.isnative and a.flags.c_contiguous and a.flags.writeable
        a[...] = 0  # writable for real, not a view of read-only bytes
    assert os.listdir(tmp_path) == ["a.ck"]  # no temp file left behind


def test_save_overwrites_and_accepts_numpy_meta(tmp_path):
    p = tmp_path / "m.ck"
    save(p, random_ck([3, 2], seed=1))
    ck = random_ck([3, 4, 2], seed=2, kind="adam", meta={"val_acc": np.float32(0.5), "step": np.int64(7)})
    save(p, ck)
    back = load(p)
    assert back.meta == {"val_acc": 0.5, "step": 7} and back.sizes == [3, 4, 2]


def test_float64_input_is_saved_as_float32(tmp_path):
    ck = random_ck([3, 2], seed=3)
    ck64 = Checkpoint(ck.sizes, [w.astype(np.float64) for w in ck.weights],
                      [b.astype(np.float64) for b in ck.biases])
    save(tmp_path / "a.ck", ck64)
    assert_same(ck, load(tmp_path / "a.ck"))


@pytest.mark.parametrize("bad, words", [
    (lambda c: c.weights[1].__setitem__((0, 0), np.nan), "NaN/Inf in W2"),
    (lambda c: c.biases[0].__setitem__(1, np.inf), "NaN/Inf in B1"),
    (lambda c: c.optim.slots[1][3].__setitem__(0, -np.inf), "NaN/Inf in optimizer slot 1 B2"),
    (lambda c: setattr(c, "weights", c.weights[:1]), "1 weights and 2 biases"),
    (lambda c: setattr(c, "sizes", [4, 3, 2]), "has shape"),
    (lambda c: setattr(c, "sizes", [3]), "bad sizes"),
    (lambda c: setattr(c, "meta", {"val_loss": float("nan")}), "meta is not valid JSON"),
    (lambda c: setattr(c, "meta", {"x": object()}), "meta is not valid JSON"),
    (lambda c: setattr(c.optim, "kind", "rmsprop"), "bad optimizer state"),
    (lambda c: c.optim.slots.pop(), "bad optimizer state"),
])
def test_save_refuses_bad_input_and_keeps_old_file(tmp_path, bad, words):
    p = tmp_path / "a.ck"
    save(p, random_ck([3, 4, 2], seed=1))
    before = folder(tmp_path)
    ck = random_ck([3, 4, 2], seed=2, kind="adam")
    bad(ck)
    with pytest.raises(CheckpointError, match=words):
        save(p, ck)
    assert folder(tmp_path) == before


# ----------------------------------------------------------------------------------------------------
# the example file and an independent reader


def doc_reader(buf: bytes) -> dict:
    """Written from docs/checkpoint-format.md alone: struct + zlib + numpy, no project code."""
    assert buf[:4] == b"NNCK" and struct.unpack_from("<I", buf, 4)[0] == 1
    assert zlib.crc32(buf[:-4]) == struct.unpack_from("<I", buf, len(buf) - 4)[0]
    hb, dtype, act, L = struct.unpack_from("<4I", buf, 8)
    assert (hb, dtype, act) == (24 + 4 * (L + 1), 1, 1)
    sizes = list(struct.unpack_from(f"<{L + 1}I", buf, 24))
    off, params = hb, []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        for shape in ((n_out, n_in), (n_out,)):
            n = int(np.prod(shape))
            params.append(np.frombuffer(buf, "<f4", n, off).reshape(shape))
            off += 4 * n
    out = {"sizes": sizes, "params": params, "sections": [], "meta": None, "optim": None}
    while off < len(buf) - 4:
        tag, flags, n = struct.unpack_from("<4sIQ", buf, off)
        payload = buf[off + 16:off + 16 + n]
        out["sections"].append(tag.decode())
        if tag == b"META":
            out["meta"] = json.loads(payload)
        elif tag == b"OPTM":
            kind, nslots, step = struct.unpack_from("<IIQ", payload, 0)
            flat = np.frombuffer(payload, "<f4", offset=16)
            slots, k = [], 0
            for _ in range(nslots):
                slot = []
                for p in params:
                    slot.append(flat[k:k + p.size].reshape(p.shape))
                    k += p.size
                slots.append(slot)
            assert k == flat.size
            out["optim"] = (["sgd", "momentum", "adam"][kind], step, slots)
        off += 16 + n
    assert off == len(buf) - 4
    return out


def agree(ref: dict, ck: Checkpoint) -> None:
    assert ref["sizes"] == ck.sizes
    mine = [p for wb in zip(ck.weights, ck.biases, strict=True) for p in wb]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(ref["params"], mine, strict=True))
    assert (ref["meta"] or {}) == ck.meta
    if ref["optim"] is None:
        assert ck.optim is None
    else:
        kind, step, slots = ref["optim"]
        assert (kind, step) == (ck.optim.kind, ck.optim.step)
        for s1, s2 in zip(slots, ck.optim.slots, strict=True):
            assert all(a.tobytes() == b.tobytes() for a, b in zip(s1, s2, strict=True))


def test_tiny_matches_json():
    exp = json.loads((DATA / "tiny.json").read_text())
    buf = (DATA / "tiny.ck").read_bytes()
    assert len(buf) == exp["file_bytes"] and zlib.crc32(buf[:-4]) == exp["crc32"]
    ck = load(DATA / "tiny.ck", sizes=[4, 3, 2])
    assert ck.sizes == exp["sizes"] == [4, 3, 2]
    for got, want in zip(ck.weights + ck.biases, exp["weights"] + exp["biases"], strict=True):
        assert got.tobytes() == np.array(want, np.float32).tobytes()
    assert ck.weights[0][2, 1] == 0.5  # W1[o=2, i=1] is at float index 2*4+1: the `in` index runs fastest
    assert ck.meta == exp["meta"]
    assert (ck.optim.kind, ck.optim.step) == (exp["optim"]["kind"], exp["optim"]["step"])
    for got, want in zip(ck.optim.slots[0], exp["optim"]["slots"][0], strict=True):
        assert got.tobytes() == np.array(want, np.float32).tobytes()
    info = describe(DATA / "tiny.ck")
    assert info["sections"] == exp["sections"] and info["file_bytes"] == exp["file_bytes"]


def test_make_tiny_regenerates_identical_bytes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_tiny", DATA / "make_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.make(tmp_path)
    assert (tmp_path / "tiny.ck").read_bytes() == (DATA / "tiny.ck").read_bytes()
    assert (tmp_path / "tiny.json").read_text() == (DATA / "tiny.json").read_text()


def test_independent_reader_agrees(tmp_path):
    agree(doc_reader((DATA / "tiny.ck").read_bytes()), load(DATA / "tiny.ck"))
    sizes = [784, 250, 250, 10]
    ck = random_ck(sizes, seed=4, kind="adam", meta={"epoch": 1, "producer": "nn-numba 0.1.0"})
    save(tmp_path / "big.ck", ck)
    ref = doc_reader((tmp_path / "big.ck").read_bytes())
    assert ref["sections"] == ["META", "OPTM"]
    agree(ref, load(tmp_path / "big.ck", sizes=sizes))
    agree(ref, ck)
    n = sum(w.size + b.size for w, b in zip(ck.weights, ck.biases, strict=True))
    assert n == 784 * 250 + 250 + 250 * 250 + 250 + 250 * 10 + 10


def test_describe(tmp_path):
    meta = {"epoch": 7, "step": 3000, "val_acc": 0.98, "test_acc": 0.979, "best_val_acc": 0.981,
            "producer": "nn-numba 0.1.0", "created": "2025-01-02T03:04:05+00:00", "history": [{"epoch": 1}]}
    p = tmp_path / "d.ck"
    save(p, random_ck([6, 5, 4], seed=5, kind="momentum", meta=meta))
    info = describe(p)
    assert info["architecture"] == "6-5-4" and info["sizes"] == [6, 5, 4] and info["activation"] == "relu"
    assert info["params"] == 6 * 5 + 5 + 5 * 4 + 4 and info["file_bytes"] == p.stat().st_size
    assert info["version"] == 1 and info["sections"] == ["META", "OPTM"] and info["optimizer"] == "momentum"
    for k in ("epoch", "step", "val_acc", "test_acc", "best_val_acc", "producer", "created"):
        assert info[k] == meta[k]
    with pytest.raises(CheckpointError, match="not an nn-numba checkpoint"):
        describe(DATA / "tiny.json")


def test_describe_says_nothing_of_validation_for_a_run_without_it(tmp_path):
    """A run without a validation split (the shipped default) records best_val_acc -1.0 (docs/checkpoint-
    format.md): describe reports it as not recorded, so `info` prints no line for it, not -1.0000."""
    p = tmp_path / "d.ck"
    save(p, random_ck([6, 5, 4], seed=5, kind="adam", meta={"epoch": 3, "test_acc": 0.99, "best_val_acc": -1.0}))
    info = describe(p)
    assert info["best_val_acc"] is None and info["val_acc"] is None and info["test_acc"] == 0.99
    r = subprocess.run([sys.executable, "-m", "nn_numba.cli", "info", str(p)], capture_output=True, text=True)
    assert r.returncode == 0 and "test acc: 0.9900" in r.stdout and "val acc" not in r.stdout, r.stdout


# ----------------------------------------------------------------------------------------------------
# every bad file has its own one-line error


TINY = (DATA / "tiny.ck").read_bytes()
TINY_P = 36 + 4 * (4 * 3 + 3 + 3 * 2 + 2)  # where the sections start


def patched(fmt: str, off: int, *vals) -> bytes:
    b = bytearray(TINY)
    struct.pack_into(fmt, b, off, *vals)
    return recrc(b)


def section_bytes(tag: bytes, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack("<4sIQ", tag, flags, len(payload)) + payload


def with_sections(*secs: bytes) -> bytes:
    return recrc(TINY[:TINY_P] + b"".join(secs) + b"\0\0\0\0")


def optm(kind, nslots, step=1, nfloats=None, value=0.0) -> bytes:
    nfloats = 23 * nslots if nfloats is None else nfloats
    floats = np.full(nfloats, value, "<f4").tobytes()
    return section_bytes(b"OPTM", struct.pack("<IIQ", kind, nslots, step) + floats)


BAD = {
    "empty": (b"", ["not an nn-numba checkpoint"]),
    "wrong magic": (b"PK\3\4" + TINY[4:], ["not an nn-numba checkpoint", "PK"]),
    "magic only": (b"NNCK", ["truncated"]),
    "newer version": (patched("<I", 4, 2), ["newer nn-numba", "version 2", "knows 1", "upgrade"]),
    "version 0": (patched("<I", 4, 0), ["bad header field version=0"]),
    "short": (TINY[:24], ["truncated", "24 bytes"]),
    "checksum": (TINY[:50] + bytes([TINY[50] ^ 1]) + TINY[51:], ["checksum mismatch", "corrupt"]),
    "bad crc only": (TINY[:-1] + bytes([TINY[-1] ^ 0x80]), ["checksum mismatch"]),
    "cut in params": (TINY[:100], ["truncated", "need at least"]),
    "cut in sections": (TINY[:400], ["truncated", "section b'OPTM'", "claims 108 bytes"]),
    "section past end": (with_sections(struct.pack("<4sIQ", b"META", 0, 100) + b"{}"),
                         ["truncated", "claims 100 bytes, only 2 left"]),
    "trailing bytes": (recrc(TINY[:-4] + b"\0" * 5 + TINY[-4:]), ["trailing bytes", "5 bytes"]),
    "dtype": (patched("<I", 12, 2), ["bad header field dtype=2"]),
    "activation": (patched("<I", 16, 3), ["bad header field activation=3"]),
    "L zero": (patched("<I", 20, 0), ["bad header field L=0"]),
    "L huge": (patched("<I", 20, 65), ["bad header field L=65"]),
    "header_bytes": (patched("<I", 8, 40), ["bad header field header_bytes=40"]),
    "size zero": (patched("<I", 28, 0), ["bad header field sizes=4-0-2"]),
    "size huge": (patched("<I", 28, 1_000_001), ["bad header field sizes=4-1000001-2"]),
    "NaN in W2": (patched("<f", 36 + 4 * 15 + 4 * 4, float("nan")), ["NaN/Inf in W2"]),
    "Inf in B1": (patched("<f", 36 + 4 * 12, float("-inf")), ["NaN/Inf in B1"]),
    "META not JSON": (with_sections(section_bytes(b"META", b"{epoch: 1}")), ["bad META JSON"]),
    "META not object": (with_sections(section_bytes(b"META", b"[1, 2]")), ["bad META JSON", "object"]),
    "META NaN": (with_sections(section_bytes(b"META", b'{"val_loss": NaN}')), ["bad META JSON", "NaN"]),
    "META not UTF-8": (with_sections(section_bytes(b"META", b'{"a": "\xff"}')), ["bad META JSON"]),
    "META twice": (with_sections(section_bytes(b"META", b"{}"), section_bytes(b"META", b"{}")),
                   ["duplicate META section"]),
    "META flags": (with_sections(section_bytes(b"META", b"{}", flags=1)), ["bad section META flags=1"]),
    "tag not ASCII": (with_sections(section_bytes(b"\xffETA", b"{}")), ["bad section tag"]),
    "OPTM kind": (with_sections(optm(3, 0)), ["bad OPTM payload", "kind 3"]),
    "OPTM slots vs kind": (with_sections(optm(2, 1)), ["bad OPTM payload", "kind 2 with 1 slots"]),
    "OPTM length": (with_sections(optm(1, 1, nfloats=22)), ["bad OPTM payload", "needs"]),
    "OPTM short": (with_sections(section_bytes(b"OPTM", b"\1\0\0\0")), ["bad OPTM payload", "4 bytes"]),
    "OPTM NaN": (with_sections(optm(1, 1, value=float("nan"))), ["bad OPTM payload", "NaN/Inf in slot 0 W1"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_errors(tmp_path, case):
    b, words = BAD[case]
    msg = error(tmp_path, b)
    for w in words:
        assert w in msg, (case, msg)
    with pytest.raises(CheckpointError):
        describe(tmp_path / "x.ck")


def test_bad_file_cases_are_valid_apart_from_their_defect(tmp_path):
    """Guards the table above: the same constructions without the defect load fine."""
    assert load_bytes(tmp_path, recrc(TINY)).meta == json.loads((DATA / "tiny.json").read_text())["meta"]
    assert load_bytes(tmp_path, with_sections(section_bytes(b"META", b'{"a": 1}'))).meta == {"a": 1}
    ck = load_bytes(tmp_path, with_sections(optm(2, 2, step=9, value=0.25)))
    assert ck.optim.kind == "adam" and ck.optim.step == 9 and float(ck.optim.slots[1][3][1]) == 0.25
    assert load_bytes(tmp_path, with_sections()).optim is None


def test_error_kinds_are_distinct_and_covered():
    """Each bad case names exactly one kind of problem, and every kind of bad file is in the table."""
    kinds = ["not an nn-numba checkpoint", "newer nn-numba", "checksum mismatch", "truncated",
             "trailing bytes", "bad header field", "NaN/Inf in", "bad META JSON", "bad OPTM payload",
             "duplicate", "bad section"]
    seen = set()
    for case, (_, words) in BAD.items():
        hits = [k for k in kinds if k in words[0]]
        assert len(hits) == 1, case
        seen |= set(hits)
    assert seen == set(kinds)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="file not found") as e:
        load(tmp_path / "nope.ck")
    assert str(tmp_path / "nope.ck") in str(e.value)
    with pytest.raises(CheckpointError, match="is a directory"):
        load(tmp_path)
    assert issubclass(CheckpointError, NNError)


def test_architecture_mismatch(tmp_path):
    save(tmp_path / "a.ck", random_ck([784, 100, 10], seed=6))
    with pytest.raises(CheckpointError) as e:
        load(tmp_path / "a.ck", sizes=(784, 250, 250, 10))
    assert "architecture mismatch: has sizes 784-100-10, expected 784-250-250-10" in str(e.value)
    assert load(tmp_path / "a.ck", sizes=[784, 100, 10]).sizes == [784, 100, 10]


def test_unknown_section_is_skipped(tmp_path):
    b = with_sections(section_bytes(b"XTRA", b"\1\2\3", flags=7), section_bytes(b"META", b'{"epoch": 4}'))
    ck = load_bytes(tmp_path, b)
    assert ck.meta == {"epoch": 4} and ck.optim is None
    assert describe(tmp_path / "x.ck")["sections"] == ["XTRA", "META"]


def test_huge_header_does_not_allocate(tmp_path):
    """A header claiming 10^6 x 10^6 floats (4 TB) with a valid CRC: refused before any allocation."""
    b = raw([1_000_000, 1_000_000], params=[np.zeros(4, np.float32)],
            sections=[(b"OPTM", struct.pack("<IIQ", 2, 2, 0))])
    tracemalloc.start()
    try:
        msg = error(tmp_path, b)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "truncated" in msg and "1000000-1000000" in msg
    assert peak < 1_000_000
    # and a huge section length
    msg = error(tmp_path, with_sections(struct.pack("<4sIQ", b"META", 0, 2**64 - 1)))
    assert "truncated" in msg


# ----------------------------------------------------------------------------------------------------
# fuzzing: only CheckpointError, and never wrong weights

SMALL = random_ck([3, 4, 2], seed=7, kind="adam", meta={"epoch": 1, "val_acc": 0.5})
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> tuple[Path, bytes]:
    d = tmp_path_factory.mktemp("fuzz")
    save(d / "s.ck", SMALL)
    return d, (d / "s.ck").read_bytes()


def raises_or_same(d: Path, b: bytes) -> None:
    try:
        ck = load_bytes(d, b)
    except CheckpointError:
        return
    assert_same(SMALL, ck)


def sane(d: Path, b: bytes) -> None:
    """Whatever loads is self-consistent: shapes follow sizes, float32, finite."""
    try:
        ck = load_bytes(d, b)
    except CheckpointError:
        return
    for w, b_, n_in, n_out in zip(ck.weights, ck.biases, ck.sizes[:-1], ck.sizes[1:], strict=True):
        assert w.shape == (n_out, n_in) and b_.shape == (n_out,) and w.dtype == np.float32
        assert np.isfinite(w).all() and np.isfinite(b_).all()
    assert isinstance(ck.meta, dict)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=6))
def test_fuzz_flipped_bytes(small_file, flips):
    d, good = small_file
    b = bytearray(good)
    for i, x in flips:
        b[i % len(b)] ^= x
    raises_or_same(d, bytes(b))


@FUZZ
@given(n=st.integers(0, 10**6))
def test_fuzz_truncated(small_file, n):
    d, good = small_file
    b = good[:n % len(good)]
    msg = error(d, b)
    assert "truncated" in msg or "not an nn-numba" in msg or "checksum" in msg


@FUZZ
@given(junk=st.binary(max_size=400))
def test_fuzz_random_bytes(small_file, junk):
    d, _ = small_file
    error(d, junk)
    # the same junk behind a valid magic/version and with a valid CRC reaches the structural checks
    sane(d, recrc(b"NNCK\1\0\0\0" + junk + b"\0\0\0\0"))


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4))
def test_fuzz_flipped_then_recrc(small_file, flips):
    """Damage that the CRC cannot see (re-checksummed): still only CheckpointError or a sane result."""
    d, good = small_file
    b = bytearray(good)
    for i, x in flips:
        b[i % (len(b) - 4)] ^= x
    sane(d, recrc(bytes(b)))


# ----------------------------------------------------------------------------------------------------
# crash safety of save


class FlakyFile:
    """Passes writes through until `budget` bytes, then fails like a full disk."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, b):
        self.budget -= len(b)
        if self.budget < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def fail_on(exc):
    def f(*a, **k):
        raise exc
    return f


@pytest.mark.parametrize("how", ["disk full", "fsync", "replace", "interrupt", "permission"])
def test_failed_save_keeps_old_file(tmp_path, monkeypatch, how):
    p = tmp_path / "model.ck"
    old = random_ck([20, 30, 10], seed=8, kind="momentum", meta={"epoch": 1})
    save(p, old)
    save(tmp_path / "other.ck", random_ck([2, 2], seed=9))
    before = folder(tmp_path)
    real_open = open
    if how == "disk full":
        monkeypatch.setattr(files, "open", lambda f, m: FlakyFile(real_open(f, m), 1000), raising=False)
    elif how == "fsync":
        monkeypatch.setattr(os, "fsync", fail_on(OSError(errno.EIO, "Input/output error")))
    elif how == "replace":
        monkeypatch.setattr(os, "replace", fail_on(OSError(errno.EXDEV, "Invalid cross-device link")))
    elif how == "interrupt":
        monkeypatch.setattr(os, "fsync", fail_on(KeyboardInterrupt()))
    else:
        monkeypatch.setattr(files, "open", fail_on(PermissionError(errno.EACCES, "Permission denied")),
                            raising=False)
    new = random_ck([20, 30, 10], seed=10, kind="adam", meta={"epoch": 2})
    if how == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            save(p, new)
    else:
        with pytest.raises(CheckpointError) as e:
            save(p, new)
        msg = str(e.value)
        assert str(p) in msg and "cannot save" in msg and "\n" not in msg
    monkeypatch.undo()
    assert folder(tmp_path) == before  # old file intact, temp file removed, nothing else touched
    assert_same(old, load(p))


def test_file_size_limit_in_subprocess(tmp_path):
    """A real write failure (EFBIG from RLIMIT_FSIZE, like a full disk) mid-save."""
    p = tmp_path / "model.ck"
    save(p, random_ck([30, 20, 10], seed=11))
    before = folder(tmp_path)
    code = f"""
import resource, signal, sys
import numpy as np
from nn_numba.checkpoint import Checkpoint, CheckpointError, save
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
ck = Checkpoint([784, 250, 10], [np.ones((250, 784), np.float32), np.ones((10, 250), np.float32)],
                [np.ones(250, np.float32), np.ones(10, np.float32)])
try:
    save({str(p)!r}, ck)
except CheckpointError as e:
    print(e)
    sys.exit(0)
sys.exit(3)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "cannot save checkpoint" in r.stdout and "File too large" in r.stdout
    assert folder(tmp_path) == before


CHILD = """
import sys
import numpy as np
from nn_numba.checkpoint import Checkpoint, OptimState, save
sizes = [784, 1000, 1000, 10]  # ~14 MB with momentum: each save takes a while
W = [np.zeros((o, i), np.float32) for i, o in zip(sizes[:-1], sizes[1:])]
B = [np.zeros(o, np.float32) for o in sizes[1:]]
V = [np.zeros_like(a) for wb in zip(W, B) for a in wb]
i = 0
while True:
    i += 1
    for a in W + B + V:
        a.fill(i)
    save(sys.argv[1], Checkpoint(sizes, W, B, {"i": i}, OptimState("momentum", i, [V])))
"""


def consistent_version(ck: Checkpoint) -> int:
    i = ck.meta["i"]
    arrays = ck.weights + ck.biases + ck.optim.slots[0]
    assert ck.optim.step == i and all((a == i).all() for a in arrays)
    return i


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.6])
def test_sigkill_during_save_keeps_a_complete_checkpoint(tmp_path, delay):
    p = tmp_path / "model.ck"
    sizes = [784, 1000, 1000, 10]
    params = [np.zeros(s, np.float32) for s in ckmod.shapes(sizes)]
    old = Checkpoint(sizes, params[0::2], params[1::2], {"i": 0},
                     OptimState("momentum", 0, [[np.zeros_like(a) for a in params]]))
    save(p, old)
    full = p.stat().st_size
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(p)], stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    seen_partial = False
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            tmps = list(tmp_path.glob("model.ck.tmp-*"))
            try:
                size = tmps[0].stat().st_size if tmps else 0
            except FileNotFoundError:
                size = 0
            if 0 < size < full:  # the first save is half-way through its write
                seen_partial = True
                break
            time.sleep(0.0005)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        _, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, err.decode()
    assert seen_partial, "never caught the child mid-save"
    i = consistent_version(load(p, sizes))  # the final name always holds a complete checkpoint
    if delay == 0.0:
        assert i == 0  # killed during the first save: the old version is intact
    assert [f.name for f in tmp_path.glob("*.ck")] == ["model.ck"]  # a temp file never looks like one
    stray = [f for f in tmp_path.iterdir() if f != p]
    assert len(stray) <= 1 and all(f.name.startswith("model.ck.tmp-") for f in stray)
    for f in stray:  # a stray temp file is either incomplete (refused) or a complete later version
        try:
            consistent_version(load(f))
        except CheckpointError:
            pass


def test_save_into_missing_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    before = folder(tmp_path)
    with pytest.raises(CheckpointError, match="the folder does not exist") as e:
        save(tmp_path / "no" / "such" / "model.ck", random_ck([2, 2]))
    assert str(tmp_path / "no" / "such" / "model.ck") in str(e.value)
    assert folder(tmp_path) == before
    with pytest.raises(CheckpointError, match="cannot save checkpoint"):
        save(tmp_path / "keep.txt" / "model.ck", random_ck([2, 2]))  # the "folder" is a file
    assert folder(tmp_path) == before


def test_save_over_a_directory(tmp_path):
    (tmp_path / "model.ck").mkdir()
    (tmp_path / "model.ck" / "inside").write_text("x")
    with pytest.raises(CheckpointError, match="cannot save checkpoint"):
        save(tmp_path / "model.ck", random_ck([2, 2]))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model.ck"]
    assert (tmp_path / "model.ck" / "inside").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_save_into_read_only_folder(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    save(d / "model.ck", random_ck([2, 2], seed=1))
    before = folder(d)
    d.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="Permission denied"):
            save(d / "model.ck", random_ck([2, 2], seed=2))
    finally:
        d.chmod(0o755)
    assert folder(d) == before
