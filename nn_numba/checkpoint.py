"""Checkpoint files, format version 1 (the contract is docs/checkpoint-format.md).

    offset 0   "NNCK"  u32 version=1  u32 header_bytes  u32 dtype=1  u32 activation=1  u32 L
    offset 24  u32 sizes[L+1]                               n0 n1 ... nL
    offset H   f32 W_1 (n1 x n0), B_1 (n1), W_2, B_2, ...  row-major, little-endian
    offset P   sections: char tag[4]  u32 flags=0  u64 n  payload[n]   ("META" json, "OPTM" optimizer)
    offset S-4 u32 crc32 of bytes 0..S-5

`save` writes atomically (temp file + fsync + rename), `load` checks everything the doc lists before it
trusts a single number. It opens regular files only (a FIFO or /dev/zero is refused at once), reads the
header before the payload it promises, and allocates the file's size once: the arrays it returns are views
into that one buffer.
"""

import ctypes
import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import NNError
from .files import NotAFileError, open_regular, write_atomic
from .optim import KINDS, SLOTS

MAGIC = b"NNCK"
VERSION = 1
DTYPE_F32 = 1
ACT_RELU = 1
MAX_LAYERS = 64
MAX_SIZE = 1_000_000
_HEAD = 24 + 4 * (MAX_LAYERS + 1)  # the longest header: read before anything it promises


class CheckpointError(NNError):
    """A checkpoint that cannot be read or written; the message names the file."""


class _Truncated(CheckpointError):
    """The layout runs past the end of the file (reported instead of a checksum mismatch)."""


@dataclass
class OptimState:
    kind: str  # "sgd" | "momentum" | "adam"
    step: int  # optimizer steps taken
    slots: list[list[np.ndarray]]  # slot-major; inside a slot W1, B1, W2, B2, ... (parameter shapes)


@dataclass
class Checkpoint:
    sizes: list[int]  # n0 .. nL
    weights: list[np.ndarray]  # W_l float32 (n_l, n_{l-1})
    biases: list[np.ndarray]  # B_l float32 (n_l,)
    meta: dict = field(default_factory=dict)  # the META section (JSON object)
    optim: OptimState | None = None  # the OPTM section


def arch(sizes: Sequence[int]) -> str:
    return "-".join(str(n) for n in sizes)


def shapes(sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """Parameter shapes in file order, which is also the order of the flat array in memory
    (kernels.layer_views): W1, B1, W2, B2, ..."""
    out: list[tuple[int, ...]] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        out += [(n_out, n_in), (n_out,)]
    return out


def _names(sizes: Sequence[int]) -> list[str]:
    return [f"{p}{i}" for i in range(1, len(sizes)) for p in "WB"]


# ----------------------------------------------------------------------------------------------------
# writing


def _f32(a: np.ndarray, shape: tuple[int, ...], what: str, path: Path) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype="<f4")  # little-endian bytes on any host
    if a.shape != shape:
        raise CheckpointError(f"cannot save {path}: {what} has shape {a.shape}, expected {shape}")
    if not np.isfinite(a).all():
        raise CheckpointError(f"cannot save {path}: NaN/Inf in {what} (training diverged?); not saved")
    return a


def _json_default(o):
    if isinstance(o, np.generic | np.ndarray):  # np.float32 metrics and the like
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _chunks(path: Path, ck: Checkpoint) -> list[bytes | np.ndarray]:
    """Validate `ck` and return the file's pieces (without the CRC) in order."""
    sizes = [int(n) for n in ck.sizes]
    L = len(sizes) - 1
    if not 1 <= L <= MAX_LAYERS or not all(1 <= n <= MAX_SIZE for n in sizes):
        raise CheckpointError(f"cannot save {path}: bad sizes {arch(sizes)} (1..{MAX_LAYERS} layers, "
                              f"widths 1..{MAX_SIZE})")
    if len(ck.weights) != L or len(ck.biases) != L:
        raise CheckpointError(f"cannot save {path}: {len(ck.weights)} weights and {len(ck.biases)} "
                              f"biases for {L} layers")
    layout, names = shapes(sizes), _names(sizes)
    params = [p for wb in zip(ck.weights, ck.biases, strict=True) for p in wb]
    out: list[bytes | np.ndarray] = [struct.pack(f"<4s5I{L + 1}I", MAGIC, VERSION, 24 + 4 * (L + 1),
                                                 DTYPE_F32, ACT_RELU, L, *sizes)]
    out += [_f32(p, s, n, path) for p, s, n in zip(params, layout, names, strict=True)]

    def section(tag: bytes, payload: list[bytes | np.ndarray]) -> None:
        out.append(struct.pack("<4sIQ", tag, 0, sum(len(memoryview(p).cast("B")) for p in payload)))
        out.extend(payload)

    if not isinstance(ck.meta, dict):
        raise CheckpointError(f"cannot save {path}: meta must be a dict, got {type(ck.meta).__name__}")
    if ck.meta:
        try:  # strict JSON (no NaN) so that any JSON parser, e.g. the C++ one, can read it
            js = json.dumps(ck.meta, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                            default=_json_default).encode()  # UnicodeEncodeError: a lone surrogate
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"cannot save {path}: meta is not valid JSON ({e})") from None
        section(b"META", [js])
    if (o := ck.optim) is not None:
        if o.kind not in SLOTS or len(o.slots) != SLOTS[o.kind] or not 0 <= int(o.step) < 2**64:
            raise CheckpointError(f"cannot save {path}: bad optimizer state (kind {o.kind!r}, "
                                  f"{len(o.slots)} slots, step {o.step})")
        arrays = []
        for s, slot in enumerate(o.slots):
            if len(slot) != len(layout):
                raise CheckpointError(f"cannot save {path}: optimizer slot {s} has {len(slot)} arrays, "
                                      f"expected {len(layout)}")
            for a, sh, n in zip(slot, layout, names, strict=True):
                arrays.append(_f32(a, sh, f"optimizer slot {s} {n}", path))
        section(b"OPTM", [struct.pack("<IIQ", KINDS.index(o.kind), len(o.slots), int(o.step)), *arrays])
    return out


def save(path: str | Path, ck: Checkpoint) -> None:
    """Write `ck` to `path` atomically (files.write_atomic): a crash leaves the old file."""
    path = Path(path)
    chunks = [memoryview(c).cast("B") for c in _chunks(path, ck)]  # validate everything before the disk
    crc = 0
    for c in chunks:
        crc = zlib.crc32(c, crc)
    write_atomic(path, [*chunks, struct.pack("<I", crc)], what="checkpoint", error=CheckpointError)


# ----------------------------------------------------------------------------------------------------
# reading


@dataclass
class _Parsed:
    sizes: list[int]
    params: list[np.ndarray]  # W1, B1, W2, B2, ... (copies)
    sections: list[tuple[str, int, int]]  # (tag, payload offset, payload length)
    buf: bytearray


def _read(path: Path) -> bytearray:
    """The whole file, once its first bytes say it is a checkpoint; at most its size on disk is allocated."""
    name = str(path)
    try:
        f, size = open_regular(path)
        with f:
            head = f.read(min(size, _HEAD))
            if head[:4] != MAGIC:
                raise CheckpointError(f"checkpoint {name}: not an nn-numba checkpoint (starts with {head[:4]!r}, "
                                      "expected b'NNCK')")
            _check_head(head, size, name)  # before reading what the header promises
            buf = bytearray(size)
            buf[:len(head)] = head
            n = len(head) + (f.readinto(memoryview(buf)[len(head):]) if size > len(head) else 0)
            if n != size or f.read(1):
                raise CheckpointError(f"checkpoint {name}: changed while being read (another program is "
                                      "writing it?); try again")
            return buf
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {name}: file not found; check the path") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {name}: is a directory, not a checkpoint file") from None
    except NotAFileError as e:
        raise CheckpointError(f"checkpoint {name}: {e.strerror}, not a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {name}: cannot read it ({e.strerror or e})") from None


def _check_head(head: bytes, S: int, name: str) -> None:
    """The version, and that a file of S bytes is long enough for what `head` (its first bytes) promises."""
    if S < 8:
        raise CheckpointError(f"checkpoint {name}: truncated ({S} bytes)")
    (version,) = struct.unpack_from("<I", head, 4)
    if version > VERSION:
        raise CheckpointError(f"checkpoint {name}: made by a newer nn-numba (format version {version}, "
                              f"this reader knows {VERSION}): upgrade nn-numba")
    if version != VERSION:
        raise CheckpointError(f"checkpoint {name}: bad header field version={version} (must be 1)")
    if S < 28:
        raise CheckpointError(f"checkpoint {name}: truncated ({S} bytes)")
    try:  # a short file is far more likely than random damage: say so, before reading it all
        _header(head, S, name)
    except _Truncated:
        raise
    except CheckpointError:
        pass  # other faults are reported after the checksum, which tells damage from a bad writer


def _header(buf: bytes, S: int, name: str) -> tuple[list[int], int]:
    """Sizes n0..nL and the offset P where the parameters end, for a file of S bytes starting with `buf`
    (at least min(S, _HEAD) bytes)."""
    header_bytes, dtype, act, L = struct.unpack_from("<4I", buf, 8)
    if dtype != DTYPE_F32:
        raise CheckpointError(f"checkpoint {name}: bad header field dtype={dtype} (version 1 knows 1 = f32)")
    if act != ACT_RELU:
        raise CheckpointError(f"checkpoint {name}: bad header field activation={act} (version 1 knows "
                              "1 = ReLU)")
    if not 1 <= L <= MAX_LAYERS:
        raise CheckpointError(f"checkpoint {name}: bad header field L={L} (must be 1..{MAX_LAYERS})")
    H = 24 + 4 * (L + 1)
    if header_bytes != H:
        raise CheckpointError(f"checkpoint {name}: bad header field header_bytes={header_bytes} "
                              f"(L={L} needs {H})")
    if S < H + 4:
        raise _Truncated(f"checkpoint {name}: truncated ({S} bytes, the header alone needs {H + 4})")
    sizes = list(struct.unpack_from(f"<{L + 1}I", buf, 24))
    if not all(1 <= n <= MAX_SIZE for n in sizes):
        raise CheckpointError(f"checkpoint {name}: bad header field sizes={arch(sizes)} "
                              f"(each must be 1..{MAX_SIZE})")
    P = H + 4 * sum(math.prod(s) for s in shapes(sizes))  # Python ints: cannot overflow
    if P + 4 > S:
        raise _Truncated(f"checkpoint {name}: truncated ({S} bytes, sizes {arch(sizes)} need at least "
                         f"{P + 4}); the save or copy was interrupted")
    return sizes, P


def _layout(buf: bytearray, name: str) -> tuple[list[int], int, list[tuple[str, int, int]]]:
    """Check the header and that parameters + sections tile the file; no arrays are made here."""
    S = len(buf)
    sizes, P = _header(buf, S, name)
    off, sections = P, []
    while off < S - 4:
        if off + 16 > S - 4:
            raise CheckpointError(f"checkpoint {name}: trailing bytes ({S - 4 - off} bytes after the "
                                  "last section, too few for a section header)")
        tag, flags, n = struct.unpack_from("<4sIQ", buf, off)
        if off + 16 + n > S - 4:
            raise _Truncated(f"checkpoint {name}: truncated (section {tag!r} at byte {off} claims {n} "
                             f"bytes, only {S - 4 - off - 16} left)")
        try:
            t = tag.decode("ascii")
        except UnicodeDecodeError:
            raise CheckpointError(f"checkpoint {name}: bad section tag {tag!r} at byte {off} (must be "
                                  "four ASCII characters)") from None
        if t in ("META", "OPTM"):
            if flags != 0:
                raise CheckpointError(f"checkpoint {name}: bad section {t} flags={flags} (version 1 needs 0)")
            if any(s[0] == t for s in sections):
                raise CheckpointError(f"checkpoint {name}: duplicate {t} section")
        sections.append((t, off + 16, n))
        off += 16 + n
    return sizes, P, sections


def _parse(path: Path) -> _Parsed:
    buf, name = _read(path), str(path)  # magic, version and length already checked
    stored, crc = struct.unpack_from("<I", buf, len(buf) - 4)[0], zlib.crc32(memoryview(buf)[:-4])
    if stored != crc:
        try:  # a short file is far more likely than random damage: say so
            _layout(buf, name)
        except _Truncated:
            raise
        except CheckpointError:
            pass
        raise CheckpointError(f"checkpoint {name}: corrupt (checksum mismatch: stored {stored:08x}, "
                              f"computed {crc:08x}); use a backup or an earlier checkpoint")
    sizes, P, sections = _layout(buf, name)
    params, off = [], 24 + 4 * len(sizes)
    for shape, what in zip(shapes(sizes), _names(sizes), strict=True):
        a = _array(buf, off, shape)
        if not _finite(a):
            raise CheckpointError(f"checkpoint {name}: NaN/Inf in {what} (saved from a diverged run); "
                                  "use an earlier checkpoint")
        params.append(a)
        off += 4 * a.size
    assert off == P
    return _Parsed(sizes, params, sections, buf)


def _array(buf: bytearray, off: int, shape: tuple[int, ...]) -> np.ndarray:
    """The little-endian floats at buf[off:] as a writable, native float32, C-contiguous array: a view
    into buf (aligned when buf's address + off is a multiple of 4), a copy only on a big-endian host."""
    a = np.frombuffer(buf, "<f4", math.prod(shape), off).reshape(shape)
    return a if a.dtype.isnative else a.astype(np.float32)


def _finite(a: np.ndarray, chunk: int = 1 << 16) -> bool:
    """No NaN/Inf in `a`, checked in pieces so the check needs no array as large as `a`."""
    flat = a.reshape(-1)
    return all(np.isfinite(flat[i:i + chunk]).all() for i in range(0, flat.size, chunk))


def _meta(p: _Parsed, name: str) -> dict:
    for tag, off, n in p.sections:
        if tag == "META":
            try:  # strict JSON: NaN/Infinity are not JSON and a C++ reader would reject them
                meta = json.loads(p.buf[off:off + n].decode("utf-8"), parse_constant=_no_constant)
            except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: [[[[... nested
                raise CheckpointError(f"checkpoint {name}: bad META JSON ({type(e).__name__})") from None
            if not isinstance(meta, dict):
                raise CheckpointError(f"checkpoint {name}: bad META JSON (a {type(meta).__name__}, "
                                      "expected an object)")
            return meta
    return {}


def _no_constant(s: str):
    raise ValueError(f"{s} is not JSON")


def _align(buf: bytearray, off: int, n: int) -> int:
    """Where the n bytes at buf[off:] are once moved (up to 3 bytes forward) to a 4-byte aligned address.

    Sections are not padded, so OPTM's floats may start anywhere. The bytes they move over belong to the
    next section's header or the CRC, both checked and no longer needed; moving them in place keeps the
    arrays views into the one buffer (no second copy of the optimizer state)."""
    base = np.frombuffer(buf, np.uint8).ctypes.data
    k = -(base + off) % 4
    if k:
        ctypes.memmove(base + off + k, base + off, n)
    return off + k


def _optim(p: _Parsed, name: str) -> OptimState | None:
    for tag, off, n in p.sections:
        if tag != "OPTM":
            continue
        if n < 16:
            raise CheckpointError(f"checkpoint {name}: bad OPTM payload ({n} bytes, the header needs 16)")
        kind, nslots, step = struct.unpack_from("<IIQ", p.buf, off)
        if kind >= len(KINDS) or nslots != SLOTS[KINDS[kind]]:
            raise CheckpointError(f"checkpoint {name}: bad OPTM payload (kind {kind} with {nslots} slots; "
                                  "known: 0 sgd/0, 1 momentum/1, 2 adam/2)")
        layout, names = shapes(p.sizes), _names(p.sizes)
        need = 16 + nslots * 4 * sum(math.prod(s) for s in layout)
        if n != need:
            raise CheckpointError(f"checkpoint {name}: bad OPTM payload ({n} bytes, {KINDS[kind]} state for "
                                  f"{arch(p.sizes)} needs {need})")
        slots, off = [], _align(p.buf, off + 16, n - 16)
        for s in range(nslots):
            slot = []
            for shape, what in zip(layout, names, strict=True):
                a = _array(p.buf, off, shape)
                if not _finite(a):
                    raise CheckpointError(f"checkpoint {name}: bad OPTM payload (NaN/Inf in slot {s} {what})")
                slot.append(a)
                off += 4 * a.size
            slots.append(slot)
        return OptimState(KINDS[kind], step, slots)
    return None


def load(path: str | Path, sizes: Sequence[int] | None = None) -> Checkpoint:
    """Read and fully check a checkpoint; if `sizes` is given the architecture must match it."""
    path = Path(path)
    p = _parse(path)
    meta, optim = _meta(p, str(path)), _optim(p, str(path))
    if sizes is not None and list(sizes) != p.sizes:
        raise CheckpointError(f"checkpoint {path}: architecture mismatch: has sizes {arch(p.sizes)}, "
                              f"expected {arch(sizes)}")
    return Checkpoint(p.sizes, p.params[0::2], p.params[1::2], meta, optim)


def _trained_with(meta: dict) -> str | None:
    """The optimiser named in META's config, if any."""
    optim = meta.get("config", {}).get("optim") if isinstance(meta.get("config"), dict) else None
    return optim.get("name") if isinstance(optim, dict) and isinstance(optim.get("name"), str) else None


def describe(path: str | Path) -> dict:
    """A summary for `nn-numba info` (the file is fully checked first)."""
    path = Path(path)
    p = _parse(path)
    meta, optim = _meta(p, str(path)), _optim(p, str(path))
    info = {
        "path": str(path),
        "version": VERSION,
        "architecture": arch(p.sizes),
        "sizes": p.sizes,
        "activation": "relu",
        "params": sum(a.size for a in p.params),
        "file_bytes": len(p.buf),
        "sections": [t for t, _, _ in p.sections],
        "optimizer": optim.kind if optim is not None else _trained_with(meta),
        "optimizer_state": optim is not None,  # best.ck has none: it holds the weights only
    }
    for k in ("epoch", "step", "val_acc", "test_acc", "best_val_acc", "producer", "created"):
        info[k] = meta.get(k)
    if isinstance(info["best_val_acc"], int | float) and info["best_val_acc"] < 0:
        info["best_val_acc"] = None  # -1.0: no validation epoch yet, or no validation split (not recorded)
    return info
