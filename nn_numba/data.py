"""MNIST: find the four IDX files, download them if needed, check them, decode them to uint8 arrays.

Where the files come from (first that is set wins): the --data-dir flag, $NN_NUMBA_DATA, the config's
data_dir, then the per-user cache folder. A folder the user names is never written to; only the cache
is filled automatically. Downloads are checked against SHA-256 sums before they are put in place.
"""

import hashlib
import http.client
import os
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nn_numba.errors import NNError, printable
from nn_numba.files import NotAFileError, open_regular


class DataError(NNError):
    """The data set is missing, cannot be downloaded, or a file in it is damaged."""


# SHA-256 of the original distribution files (same bytes as /work/shared/mnist/SHA256SUMS).
FILES = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
# SHA-256 of the same files uncompressed (their MD5s match the published ones), so verify() can check a
# folder where someone ran gunzip.
RAW_FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
COUNTS = {"train": 60000, "test": 10000}  # training.md's validation split is a fraction of 60000

_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801
_GZ_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
_FIX = "delete it and re-download (nn-numba download), or point --data-dir at a good copy"


# ---------------------------------------------------------------------------------------------- IDX


def _header_len(kind: str) -> int:
    if kind == "images":
        return 16  # magic, n, rows, cols
    if kind == "labels":
        return 8  # magic, n
    raise ValueError(f"kind must be 'images' or 'labels', not {kind!r}")


MAX_ITEMS = 1_000_000  # MNIST has 60,000; EMNIST, the largest of the family, about 800,000


def _parse_header(path: Path, head: bytes, kind: str, count: int | None = None) -> int:
    """Check the IDX header in `head` (already read) against `count` items if given; return the payload
    size it promises."""
    hlen = _header_len(kind)
    if not head:
        raise DataError(f"{path}: file is empty (no IDX header); {_FIX}")
    if len(head) >= 4:
        magic = struct.unpack(">I", head[:4])[0]
        want = _IMAGES_MAGIC if kind == "images" else _LABELS_MAGIC
        if magic != want:
            raise DataError(
                f"{path}: bad IDX magic 0x{magic:08x}, expected 0x{want:08x} for an {kind} file "
                f"(wrong or damaged file); {_FIX}"
            )
    if len(head) < hlen:
        raise DataError(f"{path}: only {len(head)} bytes, too short for an IDX {kind} header; {_FIX}")
    n = struct.unpack(">I", head[4:8])[0]
    if n > MAX_ITEMS:  # refuse before inflating anything: a gzip bomb could promise 2^32 images
        raise DataError(f"{path}: header claims {n} {kind}, more than the {MAX_ITEMS} any MNIST-style file has; {_FIX}")
    if count is not None and n != count:  # the same, for the count the caller knows
        raise DataError(f"{path}: header claims {n} {kind}, expected {count} (not the original MNIST file?); "
                        f"{_FIX}")
    if kind == "labels":
        return n
    n, rows, cols = struct.unpack(">III", head[4:16])
    if (rows, cols) != (28, 28):
        raise DataError(f"{path}: images are {rows}x{cols}, expected 28x28 (not MNIST?); {_FIX}")
    return n * 784


def _size_error(path: Path, kind: str, expected: int, got: int, more: bool = False) -> DataError:
    what = "truncated" if got < expected else "trailing bytes after the data"
    got_s = f"more than {expected}" if more else str(got)
    return DataError(
        f"{path}: {what}: the IDX header promises {expected} bytes of {kind} but the file holds {got_s}; "
        + _FIX
    )


def _gunzip_capped(path: Path, f, hlen: int, kind: str, count: int | None) -> tuple[bytearray, int]:
    """Decompress `f` (a gzip stream, maybe several members) into memory, checking the IDX header as soon
    as it arrives. Output grows only as data really decompresses and stops at header + expected + 1 bytes,
    so a header that lies about its size cannot make us allocate more than the file justifies."""
    out = bytearray()
    cap = hlen  # until the header is known
    expected = None
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip wrapper; checks CRC-32 and length at member end
    buf = b""
    try:
        while True:
            if expected is None and len(out) >= hlen:
                expected = _parse_header(path, bytes(out[:hlen]), kind, count)
                cap = hlen + expected + 1
            if len(out) >= cap:
                break
            if not buf:
                buf = f.read(_CHUNK)
                if not buf:
                    break
            if d is None:  # previous member ended: only another gzip member may follow
                if len(buf) < 2:
                    buf += f.read(1)
                if buf[:2] != _GZ_MAGIC:
                    raise DataError(f"{path}: corrupt gzip file (junk after the compressed data); {_FIX}")
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += d.decompress(buf, cap - len(out))
            buf = d.unconsumed_tail
            if d.eof:
                buf = d.unused_data
                d = None
    except zlib.error as e:
        raise DataError(f"{path}: corrupt gzip file ({e}); {_FIX}") from None
    if d is not None and len(out) < cap:  # input ran out inside a member: the .gz was cut short
        raise DataError(f"{path}: corrupt gzip file (compressed stream ends early, truncated); {_FIX}")
    if expected is None:
        _parse_header(path, bytes(out), kind)  # raises: empty or too short
    return out, expected


def read_idx(path: Path, kind: str, count: int | None = None) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not (told by its first bytes, not its name).

    kind "images" -> uint8 (N, 784) of 28x28 images; "labels" -> uint8 (N,) with values 0-9. With `count`
    the header must promise exactly that many, checked before any payload is read or inflated.
    Any problem raises DataError naming the file, what is wrong and what to do."""
    path = Path(path)
    hlen = _header_len(kind)
    try:
        f, size = open_regular(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; run `nn-numba download` or point --data-dir at MNIST") \
            from None
    except NotAFileError as e:
        raise DataError(f"{path}: {e.strerror}, not an IDX file; {_FIX}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror}); check the path and its permissions") from None
    with f:
        start = f.read(2)
        f.seek(0)
        if start == _GZ_MAGIC:
            out, expected = _gunzip_capped(path, f, hlen, kind, count)
            got = len(out) - hlen
            if got != expected:
                raise _size_error(path, kind, expected, got, more=got > expected)
            data = np.frombuffer(out, dtype=np.uint8, offset=hlen)
        else:
            # Plain file: the size on disk must match the header before we read a byte of payload.
            expected = _parse_header(path, f.read(hlen), kind, count)
            got = size - hlen
            if got != expected:
                raise _size_error(path, kind, expected, got)
            data = np.fromfile(f, dtype=np.uint8, count=expected)
            if data.size != expected:  # file shrank under us
                raise _size_error(path, kind, expected, data.size)
    if kind == "images":
        # Images live in memory NumPy allocated (np.fromfile's already does): NumPy asks Linux to back
        # arrays over 4 MiB with transparent huge pages, and training reads random rows of the 47 MB
        # set, whose TLB misses on 4 KiB pages cost about 40 µs per batch of 256 (docs/performance.md).
        return (data if data.flags.owndata else data.copy()).reshape(-1, 784)
    if data.size and data.max() > 9:
        i = int(np.argmax(data > 9))
        raise DataError(f"{path}: label {data[i]} at index {i} is outside 0-9 (damaged file?); {_FIX}")
    return data


# ------------------------------------------------------------------------------------------ folders


def cache_dir() -> Path:
    """The per-user cache folder: $XDG_CACHE_HOME/nn-numba/mnist, else ~/.cache/nn-numba/mnist."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # XDG says: ignore relative paths
    return base / "nn-numba" / "mnist"


def resolve_data_dir(flag: str | None = None, config_value: str | None = None) -> tuple[Path, str]:
    """Where MNIST lives and who said so ("flag" | "env" | "config" | "cache"); empty strings are unset."""
    for value, source in ((flag, "flag"), (os.environ.get("NN_NUMBA_DATA"), "env"), (config_value, "config")):
        if value:
            return Path(value).expanduser().absolute(), source
    return cache_dir(), "cache"


def _find(folder: Path, name: str) -> Path | None:
    """`name` (.gz) or its uncompressed twin in `folder`, whichever exists (the .gz first)."""
    for p in (folder / name, folder / name.removesuffix(".gz")):
        if p.is_file():
            return p
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify(folder: Path) -> list[str]:
    """Check the four files in `folder` against the known SHA-256 sums; return the problems (empty = good)."""
    folder = Path(folder)
    problems = []
    for name, sha in FILES.items():
        p = _find(folder, name)
        if p is None:
            problems.append(f"{name}: missing")
            continue
        want = sha if p.name == name else RAW_FILES[p.name]
        got = _sha256(p)
        if got != want:
            problems.append(f"{p.name}: SHA-256 {got} does not match {want}")
    return problems


# ---------------------------------------------------------------------------------------- download


def _why(e: Exception) -> str:
    """A short reason for a failed fetch: 'HTTP 404 Not Found', 'Connection refused', 'timed out', ..."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    r = getattr(e, "reason", None) or e
    return getattr(r, "strerror", None) or str(r) or type(r).__name__


def _fetch(url: str, part: Path, sha: str, timeout: float) -> None:
    """Stream `url` into `part`, hashing as we go; raise OSError-ish on any failure (caller cleans up)."""
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=part.name.removesuffix(".part"),
                  disable=None, leave=False) as bar:  # disable=None: no bar when stderr is not a terminal
            while chunk := r.read(1 << 16):
                f.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    got = h.hexdigest()
    if got != sha:
        raise ValueError(f"checksum mismatch: SHA-256 {got}, expected {sha}")


def download(folder: Path, mirrors: Sequence[str] = MIRRORS, files: Mapping[str, str] = FILES,
             timeout: float = 30) -> None:
    """Fetch each file of `files` missing from `folder`, trying `mirrors` in turn.

    Each file goes to NAME.part and is renamed into place only after its SHA-256 matches, so a broken or
    interrupted download never leaves a file that looks complete."""
    folder = Path(folder)
    missing = [n for n in files if _find(folder, n) is None]
    if not missing:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{folder}: cannot create the data folder ({e.strerror}); use --dir DIR") from None
    for name in missing:
        dest, part = folder / name, folder / (name + ".part")
        tried = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            try:
                _fetch(url, part, files[name], timeout)
            except (OSError, http.client.HTTPException, ValueError) as e:
                part.unlink(missing_ok=True)
                tried.append(f"{url} ({_why(e)})")
                continue
            except BaseException:  # Ctrl-C etc.: leave no half file behind
                part.unlink(missing_ok=True)
                raise
            os.replace(part, dest)
            break
        else:
            still = ", ".join(n for n in files if _find(folder, n) is None)
            raise DataError(
                f"could not download {name} into {folder}: tried " + "; ".join(tried) + ". "
                f"Get {still} by hand (from any MNIST mirror; SHA-256 sums are in "
                f"nn_numba/data.py), put them in {folder}, or set NN_NUMBA_DATA / --data-dir to a folder "
                "that holds them"
            )


def download_command(dir: str | None = None) -> Path:
    """`nn-numba download [--dir DIR]`: fetch what is missing into DIR (or the cache), verify, report."""
    folder = Path(dir).expanduser().absolute() if dir else cache_dir()
    download(folder, MIRRORS, FILES)
    problems = verify(folder)
    if problems:
        raise DataError(
            f"{folder}: " + "; ".join(problems) + ". Delete the bad files and run `nn-numba download` again"
        )
    print(printable(f"MNIST ready in {folder} (all four files match their SHA-256 sums)"))
    return folder


# ------------------------------------------------------------------------------------------ loading


@dataclass
class MNIST:
    train_x: np.ndarray  # (60000, 784) uint8
    train_y: np.ndarray  # (60000,) uint8
    test_x: np.ndarray  # (10000, 784) uint8
    test_y: np.ndarray  # (10000,) uint8


def load_mnist(data_dir: str | None = None, config_value: str | None = None,
               download_ok: bool = True) -> MNIST:
    """Find (and, for the cache folder only, download) MNIST and decode it."""
    folder, source = resolve_data_dir(data_dir, config_value)
    missing = [n for n in FILES if _find(folder, n) is None]
    if missing:
        said = {"flag": "--data-dir", "env": "NN_NUMBA_DATA", "config": "the config's data.dir"}
        undo = {"flag": "leave out --data-dir", "env": "unset NN_NUMBA_DATA", "config": "remove data.dir"}
        if source != "cache":  # the user's folder: read-only for us
            where = "does not exist" if not folder.is_dir() else "lacks " + ", ".join(missing)
            raise DataError(
                f"MNIST folder {folder} (from {said[source]}) {where}; put the files there with "
                f"`nn-numba download --dir {folder}`, or {undo[source]} to use the cache {cache_dir()}"
            )
        if not download_ok:
            raise DataError(f"MNIST is not in the cache {folder} (missing {', '.join(missing)}); "
                            "run `nn-numba download` or point --data-dir at a folder holding it")
        download(folder, MIRRORS, FILES)  # module globals, looked up now (tests swap them)
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte.gz"), "images", COUNTS[split])
        y = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte.gz"), "labels", COUNTS[split])
        arrays[split] = (x, y)
    return MNIST(*arrays["train"], *arrays["test"])
