"""The data layer: real MNIST, IDX decoding and its failures, folder resolution, the downloader."""

import functools
import gzip
import hashlib
import http.server
import os
import shutil
import socket
import struct
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from nn_numba import data
from nn_numba.data import DataError, download, load_mnist, read_idx, resolve_data_dir, verify
from nn_numba.errors import NNError

NAMES = list(data.FILES)

# ------------------------------------------------------------------------------------------ helpers


def idx_images(imgs: np.ndarray, n: int | None = None, rows: int = 28, cols: int = 28) -> bytes:
    """IDX3 bytes for uint8 images (N, rows*cols); `n` overrides the count in the header (to make it lie)."""
    n = len(imgs) if n is None else n
    return struct.pack(">IIII", 0x803, n, rows, cols) + imgs.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, n: int | None = None) -> bytes:
    n = len(labels) if n is None else n
    return struct.pack(">II", 0x801, n) + labels.astype(np.uint8).tobytes()


def put(path: Path, raw: bytes, gz: bool) -> Path:
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return path


def rand_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 784), dtype=np.uint8)


def fail(path: Path, kind: str) -> str:
    """read_idx must fail with a DataError (an NNError) naming the file; return its message."""
    with pytest.raises(DataError) as e:
        read_idx(path, kind)
    msg = str(e.value)
    assert isinstance(e.value, NNError)
    assert str(path) in msg and "\n" not in msg
    return msg


# -------------------------------------------------------------------------------------- real MNIST


def test_real_mnist(mnist_path):
    m = load_mnist(str(mnist_path))
    assert m.train_x.shape == (60000, 784) and m.train_y.shape == (60000,)
    assert m.test_x.shape == (10000, 784) and m.test_y.shape == (10000,)
    assert all(a.dtype == np.uint8 for a in (m.train_x, m.train_y, m.test_x, m.test_y))
    # Published facts about MNIST (see /work/shared/mnist/README.md).
    assert np.bincount(m.train_y, minlength=10).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265,
                                                             5851, 5949]
    assert np.bincount(m.test_y, minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                                                            1009]
    assert m.train_x.mean(dtype=np.float64) == pytest.approx(33.3184, abs=5e-5)
    assert m.test_x.mean(dtype=np.float64) == pytest.approx(33.7912, abs=5e-5)
    assert m.train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the famous first digits
    assert m.train_x.max() == 255 and m.train_x.min() == 0


def test_files_match_sha256sums(mnist_path):
    sums = dict(line.split()[::-1] for line in (mnist_path / "SHA256SUMS").read_text().splitlines() if line)
    assert sums == data.FILES
    assert verify(mnist_path) == []


def test_uncompressed_files_read_and_verify(mnist_path, tmp_path):
    """A folder where someone ran gunzip: same arrays, and verify() knows the uncompressed sums."""
    for name in NAMES:
        (tmp_path / name.removesuffix(".gz")).write_bytes(gzip.decompress((mnist_path / name).read_bytes()))
    assert verify(tmp_path) == []
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        kind = "images" if "images" in name else "labels"
        a = read_idx(tmp_path / name.removesuffix(".gz"), kind)
        b = read_idx(mnist_path / name, kind)
        assert a.dtype == b.dtype and np.array_equal(a, b)
    m = load_mnist(str(tmp_path))
    assert m.train_x.shape == (60000, 784) and m.test_y.shape == (10000,)


def test_verify_reports_bad_and_missing(mnist_path, tmp_path):
    (tmp_path / NAMES[0]).symlink_to(mnist_path / NAMES[0])
    (tmp_path / NAMES[1]).write_bytes(b"not mnist")
    problems = verify(tmp_path)
    assert len(problems) == 3
    assert problems[0].startswith(NAMES[1]) and "does not match" in problems[0]
    assert problems[1] == f"{NAMES[2]}: missing" and problems[2] == f"{NAMES[3]}: missing"


# ---------------------------------------------------------------------------------------- IDX reads


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    x, y = rand_images(7), np.arange(7) % 10
    # The name says the opposite of the content: detection must go by the gzip magic, not the name.
    px = put(tmp_path / ("x" if gz else "x.gz"), idx_images(x), gz)
    py = put(tmp_path / ("y" if gz else "y.gz"), idx_labels(y), gz)
    gx, gy = read_idx(px, "images"), read_idx(py, "labels")
    assert gx.dtype == np.uint8 and gx.shape == (7, 784) and np.array_equal(gx, x)
    assert gy.dtype == np.uint8 and gy.shape == (7,) and np.array_equal(gy, y)


def test_read_idx_multi_member_gzip(tmp_path):
    """`cat a.gz b.gz` is a valid gzip file; the split may even fall inside the header."""
    raw = idx_images(rand_images(3))
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(raw[:10]) + gzip.compress(raw[10:1000]) + gzip.compress(raw[1000:]))
    assert np.array_equal(read_idx(p, "images"), rand_images(3))


def test_zero_items(tmp_path):
    assert read_idx(put(tmp_path / "x", idx_images(rand_images(0)), False), "images").shape == (0, 784)
    assert read_idx(put(tmp_path / "y.gz", idx_labels(np.zeros(0)), True), "labels").shape == (0,)


@pytest.mark.parametrize("gz", [False, True])
def test_wrong_magic(tmp_path, gz):
    p = put(tmp_path / "y", idx_labels(np.arange(10)), gz)
    msg = fail(p, "images")  # a labels file where images belong
    assert "bad IDX magic 0x00000801, expected 0x00000803" in msg and "re-download" in msg
    q = put(tmp_path / "x", idx_images(rand_images(2)), gz)
    assert "bad IDX magic 0x00000803, expected 0x00000801" in fail(q, "labels")


@pytest.mark.parametrize("gz", [False, True])
def test_wrong_dims(tmp_path, gz):
    imgs = np.zeros((2, 32 * 32), np.uint8)
    msg = fail(put(tmp_path / "x", idx_images(imgs, rows=32, cols=32), gz), "images")
    assert "images are 32x32, expected 28x28" in msg


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("kind", ["images", "labels"])
def test_truncated(tmp_path, gz, kind):
    raw = idx_images(rand_images(3)) if kind == "images" else idx_labels(np.arange(3))
    msg = fail(put(tmp_path / "f", raw[:-1], gz), kind)
    n = 3 * 784 if kind == "images" else 3
    assert f"truncated: the IDX header promises {n} bytes of {kind} but the file holds {n - 1};" in msg


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("kind", ["images", "labels"])
def test_trailing_bytes(tmp_path, gz, kind):
    raw = idx_images(rand_images(3)) if kind == "images" else idx_labels(np.arange(3))
    msg = fail(put(tmp_path / "f", raw + b"\0", gz), kind)
    assert "trailing bytes after the data" in msg
    assert ("more than" in msg) == gz  # a .gz is only read up to one byte past the promised size


@pytest.mark.parametrize("gz", [False, True])
def test_label_out_of_range(tmp_path, gz):
    msg = fail(put(tmp_path / "y", idx_labels(np.array([0, 9, 3, 10, 200])), gz), "labels")
    assert "label 10 at index 3 is outside 0-9" in msg


def test_corrupt_gzip(tmp_path):
    good = gzip.compress(idx_images(rand_images(4)), mtime=0)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # damage the deflate data
    assert "corrupt gzip file" in fail(put(tmp_path / "a.gz", bytes(bad), False), "images")
    bad = bytearray(good)
    bad[-8] ^= 0x01  # damage the stored CRC-32: only the check at the end can catch it
    msg = fail(put(tmp_path / "b.gz", bytes(bad), False), "images")
    assert "corrupt gzip file" in msg and "incorrect data check" in msg
    msg = fail(put(tmp_path / "c.gz", good[: len(good) - 20], False), "images")  # cut mid-stream
    assert "compressed stream ends early" in msg
    msg = fail(put(tmp_path / "d.gz", good + b"junk", False), "images")
    assert "junk after the compressed data" in msg


@pytest.mark.parametrize("gz", [False, True])
def test_lying_huge_dims_fail_fast_without_allocating(tmp_path, gz):
    """A header claiming 2**31 - 1 images (1.7 TB) over 2 real ones must fail at once, using little memory."""
    p = put(tmp_path / "x", idx_images(rand_images(2), n=2**31 - 1), gz)
    tracemalloc.start()
    t = time.perf_counter()
    try:
        msg = fail(p, "images")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t < 5.0  # "at once": a hang or a 1.7 TB read would take far longer
    assert peak < 4 << 20, f"peak {peak} bytes"
    assert f"header claims {2**31 - 1} images, more than the" in msg


def test_gzip_bomb_is_capped(tmp_path):
    """2 images promised, 64 MB of zeros delivered: decompression stops one byte past the promise."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    body = [c.compress(idx_images(rand_images(2)))] + [c.compress(zeros) for _ in range(64)] + [c.flush()]
    p = tmp_path / "bomb.gz"
    p.write_bytes(b"".join(body))
    tracemalloc.start()
    try:
        msg = fail(p, "images")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak} bytes"
    assert f"trailing bytes after the data: the IDX header promises {2 * 784} bytes" in msg


def test_empty_short_missing(tmp_path):
    for gz in (False, True):
        msg = fail(put(tmp_path / f"empty{gz}", b"", gz), "labels")
        assert "file is empty" in msg and "re-download" in msg
        msg = fail(put(tmp_path / f"short{gz}", struct.pack(">II", 0x803, 1)[:6], gz), "images")
        assert "only 6 bytes, too short for an IDX images header" in msg
    msg = fail(tmp_path / "nope.gz", "images")
    assert "file not found" in msg and "nn-numba download" in msg


# ---------------------------------------------------------------------------------------- resolving


def test_resolve_order(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("NN_NUMBA_DATA", str(tmp_path / "env"))
    cache = tmp_path / "xdg" / "nn-numba" / "mnist"
    assert data.cache_dir() == cache
    assert resolve_data_dir(str(tmp_path / "flag"), str(tmp_path / "cfg")) == (tmp_path / "flag", "flag")
    assert resolve_data_dir(None, str(tmp_path / "cfg")) == (tmp_path / "env", "env")
    monkeypatch.setenv("NN_NUMBA_DATA", "")  # empty counts as unset
    assert resolve_data_dir(None, str(tmp_path / "cfg")) == (tmp_path / "cfg", "config")
    monkeypatch.delenv("NN_NUMBA_DATA")
    assert resolve_data_dir("", str(tmp_path / "cfg")) == (tmp_path / "cfg", "config")
    assert resolve_data_dir() == (cache, "cache")


def test_resolve_relative_and_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NN_NUMBA_DATA", "../shared/mnist")  # as CI sets it
    assert resolve_data_dir() == (tmp_path / "../shared/mnist", "env")
    assert resolve_data_dir("~/d") == (tmp_path / "home" / "d", "flag")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # XDG: relative paths are ignored
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "nn-numba" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "nn-numba" / "mnist"


# ---------------------------------------------------------------------------------------- download


@pytest.fixture
def serve():
    """serve(folder) -> (base URL, list of requested paths); an HTTP server on 127.0.0.1 in a thread."""
    servers = []

    def start(folder: Path):
        hits = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=folder))
        threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True).start()  # quick shutdown
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/", hits

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def fake(tmp_path):
    """Four small fake "MNIST" files in a served folder, and the FILES dict that matches them."""
    src = tmp_path / "mirror"
    src.mkdir()
    files = {}
    for i, name in enumerate(NAMES):
        body = gzip.compress(idx_images(rand_images(3, i)) if "images" in name else idx_labels(np.arange(3)))
        (src / name).write_bytes(body)
        files[name] = hashlib.sha256(body).hexdigest()
    return src, files


def dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now: connection refused
    return f"http://127.0.0.1:{port}/"


def test_download_good(fake, serve, tmp_path):
    src, files = fake
    url, hits = serve(src)
    dest = tmp_path / "new" / "dir"
    download(dest, [url], files)
    assert sorted(p.name for p in dest.iterdir()) == sorted(NAMES)
    for name in NAMES:
        assert (dest / name).read_bytes() == (src / name).read_bytes()
    assert len(hits) == 4
    download(dest, [url], files)  # everything present: nothing fetched again
    assert len(hits) == 4


def test_download_keeps_existing_files(fake, serve, tmp_path):
    src, files = fake
    url, hits = serve(src)
    (tmp_path / NAMES[0]).write_bytes(b"mine")  # present (even if wrong): never overwritten
    (tmp_path / NAMES[1].removesuffix(".gz")).write_bytes(b"mine too")  # uncompressed twin counts
    download(tmp_path, [url], files)
    assert (tmp_path / NAMES[0]).read_bytes() == b"mine"
    assert not (tmp_path / NAMES[1]).exists()
    assert sorted(hits) == sorted("/" + n for n in NAMES[2:])


def test_download_wrong_checksum(fake, serve, tmp_path):
    src, files = fake
    url, _ = serve(src)
    files = dict(files, **{NAMES[2]: "0" * 64})
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as e:
        download(dest, [url], files)
    msg = str(e.value)
    assert f"could not download {NAMES[2]} into {dest}" in msg
    got = hashlib.sha256((src / NAMES[2]).read_bytes()).hexdigest()
    assert f"{url}{NAMES[2]} (checksum mismatch: SHA-256 {got}, expected {'0' * 64})" in msg
    assert "NN_NUMBA_DATA" in msg and "--data-dir" in msg and "\n" not in msg
    # The two files before it are in place and checked; the bad one and any .part are gone.
    assert sorted(p.name for p in dest.iterdir()) == sorted(NAMES[:2])


def test_download_bad_mirror_then_good(fake, serve, tmp_path):
    """A wrong copy on the first mirror is thrown away and the second mirror's good copy is used."""
    src, files = fake
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / NAMES[0]).write_bytes(b"garbage")
    bad_url, _ = serve(bad)
    good_url, hits = serve(src)
    dest = tmp_path / "dest"
    download(dest, [bad_url, good_url], files)
    assert (dest / NAMES[0]).read_bytes() == (src / NAMES[0]).read_bytes()
    assert hits == ["/" + NAMES[0]]
    assert sorted(p.name for p in dest.iterdir()) == sorted(NAMES)


def test_download_dead_404_and_silent_mirrors_then_good(fake, serve, tmp_path):
    src, files = fake
    empty = tmp_path / "empty"
    empty.mkdir()
    url404, _ = serve(empty)
    good, _ = serve(src)
    silent = socket.socket()  # accepts connections (kernel backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
    try:
        dest = tmp_path / "dest"
        download(dest, [dead_url(), url404, silent_url, good], {NAMES[0]: files[NAMES[0]]}, timeout=0.3)
        assert (dest / NAMES[0]).read_bytes() == (src / NAMES[0]).read_bytes()
        with pytest.raises(DataError) as e:
            download(dest, [dead_url(), url404, silent_url], {NAMES[1]: files[NAMES[1]]}, timeout=0.3)
    finally:
        silent.close()
    msg = str(e.value)
    assert "Connection refused" in msg and f"{url404}{NAMES[1]} (HTTP 404" in msg and "timed out" in msg
    assert "by hand" in msg
    assert [p.name for p in dest.iterdir()] == [NAMES[0]]


@pytest.mark.parametrize("source", ["flag", "env", "config"])
def test_user_folder_is_read_only(fake, serve, tmp_path, monkeypatch, source):
    src, files = fake
    url, hits = serve(src)
    monkeypatch.setattr(data, "MIRRORS", [url])
    monkeypatch.setattr(data, "FILES", files)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("NN_NUMBA_DATA", raising=False)
    given = tmp_path / "given"
    given.mkdir()
    (given / NAMES[1]).write_bytes((src / NAMES[1]).read_bytes())
    kw = {"flag": {"data_dir": str(given)}, "config": {"config_value": str(given)}}.get(source, {})
    if source == "env":
        monkeypatch.setenv("NN_NUMBA_DATA", str(given))
    with pytest.raises(DataError) as e:
        load_mnist(**kw)
    msg = str(e.value)
    assert f"MNIST folder {given}" in msg and f"nn-numba download --dir {given}" in msg
    assert all(n in msg for n in NAMES if n != NAMES[1]) and NAMES[1] not in msg
    assert [p.name for p in given.iterdir()] == [NAMES[1]]  # nothing written
    assert hits == [] and not (tmp_path / "xdg").exists()
    # A folder that does not exist is not created either.
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(str(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()


def test_cache_without_download_ok(fake, serve, tmp_path, monkeypatch):
    url, hits = serve(fake[0])
    monkeypatch.setattr(data, "MIRRORS", [url])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("NN_NUMBA_DATA", raising=False)
    with pytest.raises(DataError, match="not in the cache .* run `nn-numba download`"):
        load_mnist(download_ok=False)
    assert hits == []


def test_load_downloads_real_files_into_cache(mnist_path, serve, tmp_path, monkeypatch, capsys):
    """The genuine bytes, served locally, pass the real FILES checksums and load as MNIST."""
    url, hits = serve(mnist_path)
    monkeypatch.setattr(data, "MIRRORS", [url])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("NN_NUMBA_DATA", raising=False)
    cache = tmp_path / "xdg" / "nn-numba" / "mnist"
    m = load_mnist()
    assert sorted(hits) == sorted("/" + n for n in NAMES)
    assert sorted(p.name for p in cache.iterdir()) == sorted(NAMES)
    assert m.train_x.shape == (60000, 784) and np.bincount(m.test_y)[1] == 1135
    # `nn-numba download` on the now complete cache: verifies, fetches nothing, says where the files are.
    assert data.download_command(None) == cache
    assert str(cache) in capsys.readouterr().out and len(hits) == 4


def test_download_command_into_dir(mnist_path, serve, tmp_path, monkeypatch, capsys):
    url, _ = serve(mnist_path)
    monkeypatch.setattr(data, "MIRRORS", [url])
    d = tmp_path / "d"
    assert data.download_command(str(d)) == d
    assert verify(d) == [] and str(d) in capsys.readouterr().out
    os.chmod(d / NAMES[3], 0o644)
    (d / NAMES[3]).write_bytes(b"x")  # damaged later: the command says so instead of replacing it
    with pytest.raises(DataError, match=f"{NAMES[3]}: SHA-256 .* does not match .* Delete the bad files"):
        data.download_command(str(d))
    assert (d / NAMES[3]).read_bytes() == b"x"
