"""`nn-numba predict`: read a picture of a digit, turn it into what MNIST looks like, classify it.

MNIST digits are white ink on black, the ink's bounding box scaled (aspect kept) so that its longer side
is 20 px, anti-aliased, then placed in a 28x28 frame so that the ink's centre of mass is at pixel
(row 14, col 14). A network trained on MNIST only works on inputs that look like that, so `preprocess`
reproduces this convention for an arbitrary picture:

1. read   Pillow opens the file (PNG, JPEG, BMP, GIF, WebP, TIFF ...; first frame only) and applies the
          EXIF orientation of phone photos. Files with more than MAX_PIXELS pixels are refused before
          decoding (decompression bombs: a tiny file that claims to be gigapixels). A picture whose longer
          side exceeds MAX_SIDE is reduced by a whole factor as it is read (JPEG: decoded at a smaller DCT
          scale; others: block averages), so the work per picture is bounded.
2. grey   transparency is composited onto white paper (if that leaves nothing, e.g. white ink on a
          transparent background, onto black instead); colour becomes luma (ITU-R 601, as Pillow's "L"),
          CIELab its lightness; 16/32-bit and float images are scaled to [0, 1] (NaN pixels: refused).
3. polarity  the median of the outermost ring of pixels is the paper. A paper brighter than the middle
          of the image's range means dark ink on light paper, which is inverted so ink is bright.
4. levels the paper level (plus 3 robust standard deviations of the ring, to swallow noise and uneven
          light) becomes 0, the brightest ink 1; everything is clipped to [0, 1]. Too little contrast
          means "the image is blank".
5. crop   to the bounding box of the pixels above INK (0.2).
6. scale  a digit written with a thin pen is first dilated so that its strokes will be about 2 px wide
          (MNIST's are; a 1-px line shrunk 20x would all but vanish). Then the longer side goes to 20 px,
          aspect ratio kept, anti-aliased (BOX = area average when shrinking, LANCZOS when enlarging), and
          the peak is stretched back to 1 (MNIST strokes are saturated).
7. centre paste into a 28x28 black frame, shifted by a whole number of pixels (the fractional shift
          rounded, as MNIST did) so that the ink's centre of mass lands within half a pixel of (14, 14).

`raw=True` skips 2-7 for images that are already MNIST-style: 28x28, white ink on black.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from nn_numba.errors import NNError, printable

MAX_PIXELS = 50_000_000  # 50 megapixels: larger than a phone photo, small enough to decode safely
MAX_SIDE = 1024  # pictures are reduced to this longer side on reading: 50x the 20-px box MNIST uses
INK = 0.2  # after levels, pixels above this count as ink for the bounding box
BOX = 20  # MNIST: longer side of the ink's bounding box
SIZE = 28  # MNIST frame
# stroke widths in px at the 20-px scale: thinner than MIN_STROKE is thickened to about STROKE. Tuned on
# MNIST digits redrawn with a pen a third as wide (85 % -> 91 % same answer as on the original); MNIST's
# own thinnest digits (5 % are under ~1.2 px) are mostly left alone.
MIN_STROKE, STROKE = 1.0, 1.8
MIN_CONTRAST = 0.05  # ink and paper closer than this (in [0, 1]) = nothing written
BLANK = ("no ink found: the image is blank{}; use a picture of one digit written clearly darker (or lighter) "
         "than its paper, filling a good part of the frame")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageError(NNError):
    """An input picture that cannot be used; the message starts with the file's name."""


# ---------------------------------------------------------------------------------------------------
# preprocessing


def load_image(path: str | os.PathLike, max_pixels: int | None = None, reduce: bool = True) -> Image.Image:
    """Open the picture at `path` (first frame, reduced to MAX_SIDE unless reduce=False, EXIF orientation
    applied), refusing huge and non-images."""
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file")
    if p.is_dir():
        raise ImageError(f"{p}: is a folder, not an image")
    if not p.is_file():
        raise ImageError(f"{p}: not a regular file (a FIFO or device?), not an image")
    if p.stat().st_size == 0:
        raise ImageError(f"{p}: empty file (0 bytes): not an image")
    return open_image(p, str(p), max_pixels, reduce)


def open_image(src: str | os.PathLike | IO[bytes], name: str, max_pixels: int | None = None,
               reduce: bool = True) -> Image.Image:
    """Pillow image from a path or a binary file object; `name` is what error messages call it.

    Images of more than `max_pixels` (default MAX_PIXELS) are refused before their pixels are decoded
    (decompression bombs: a tiny file that claims to be gigapixels); larger than MAX_SIDE on a side,
    they are reduced as they are read (unless reduce=False).
    """
    cap = max_pixels or MAX_PIXELS
    limit = min(cap, Image.MAX_IMAGE_PIXELS or cap)
    try:
        with warnings.catch_warnings():
            # we check the size ourselves below, with a clearer message than Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(src)
            w, h = im.size
            if w * h > limit:
                raise _too_large(name, w, h, limit)
            turn = im.getexif().get(ExifTags.Base.Orientation)
            im = shrink(im) if reduce else im
            im.load()
            if turn in _TURNS:  # what ImageOps.exif_transpose does, on the reduced picture
                im = im.transpose(_TURNS[turn])
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image too large ({e}); refusing to decode a possible decompression bomb: "
                         f"shrink the picture first") from e
    except UnidentifiedImageError as e:
        raise ImageError(
            f"{name}: cannot identify image file: not a picture Pillow can read "
            f"(use PNG, JPEG, BMP, GIF, WebP or TIFF)"
        ) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # truncated or damaged data: Pillow recognised the format but could not decode the pixels
        raise ImageError(f"{name}: unreadable image ({e}): the file is damaged or truncated") from e
    if im.width == 0 or im.height == 0:
        raise ImageError(f"{name}: empty image (0 pixels)")
    return im


_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transposition that undoes it


def shrink(im: Image.Image) -> Image.Image:
    """Decode `im` with its longer side at most MAX_SIDE: JPEGs at a reduced DCT scale (draft), others by
    averaging whole blocks of pixels (reduce), so that everything after works on at most MAX_SIDE^2 pixels."""
    f = math.ceil(max(im.size) / MAX_SIDE)
    if f > 1 and im.format == "JPEG":
        im.draft(im.mode, (math.ceil(im.width / f), math.ceil(im.height / f)))
    im.load()
    f = math.ceil(max(im.size) / MAX_SIDE)
    if f == 1:
        return im
    if im.mode == "PA" or "transparency" in im.info:  # palette indices and colour keys cannot be averaged
        im = im.convert("RGBA")
    elif im.mode in ("1", "P"):
        im = im.convert("L")
    elif im.mode.startswith("I;16"):  # reduce() takes 32-bit integers, not 16
        im = im.convert("I")
    return im.reduce(f)


def _too_large(name: str, w: int, h: int, limit: int) -> ImageError:
    return ImageError(
        f"{name}: image too large ({w}x{h} = {w * h:,} pixels, limit {limit:,}); refusing to decode a "
        f"possible decompression bomb: shrink the picture first"
    )


def to_grey(im: Image.Image, name: str = "image") -> np.ndarray:
    """Greyscale float32 (H, W) in [0, 1]; transparency goes onto white paper (black if that is blank)."""
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im, dtype=np.float32) / np.float32(65535)
    if mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ImageError(f"{name}: holds NaN or infinite pixel values (a float image): not a picture")
        # no fixed range: 'I' is often 16-bit data, 'F' often [0, 1]; take the smallest range that fits
        top = next(t for t in (1.0, 255.0, 65535.0, max(float(a.max()), 1.0)) if a.max() <= t)
        return np.clip(a / top, 0, 1).astype(np.float32)
    if mode == "LAB":  # CIELab: its L channel is the lightness, 0-255
        return np.asarray(im.getchannel("L"), dtype=np.float32) / np.float32(255)
    try:
        return _composite(im)
    except ValueError as e:  # a mode Pillow cannot convert, e.g. "conversion from La to L not supported"
        raise ImageError(f"{name}: colour mode {mode} is not supported ({e}): save it as RGB or greyscale") \
            from None


def _composite(im: Image.Image) -> np.ndarray:
    """Grey from 8-bit colour modes, transparency composited onto paper; ValueError if Pillow cannot."""
    mode = im.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if not has_alpha:
        return np.asarray(im.convert("L"), dtype=np.float32) / np.float32(255)
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / np.float32(255)
    luma = rgba[..., 0] * 0.299 + rgba[..., 1] * 0.587 + rgba[..., 2] * 0.114
    alpha = rgba[..., 3]
    grey = alpha * luma + (1 - alpha)  # paper is white
    if np.ptp(grey) < MIN_CONTRAST and np.ptp(alpha) >= MIN_CONTRAST:
        grey = alpha * luma  # light ink on a transparent background: put it on black instead
    return grey.astype(np.float32)


def border(a: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels of a 2-D array, flattened."""
    if a.shape[0] <= 2 or a.shape[1] <= 2:
        return a.ravel()
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])


def normalise(g: np.ndarray, name: str = "image") -> np.ndarray:
    """Bright ink on a 0 background: invert dark-on-light (judged by the border), then stretch the levels."""
    ring = border(g)
    lo, hi = float(g.min()), float(g.max())
    if hi - lo < MIN_CONTRAST:
        raise ImageError(f"{name}: " + BLANK.format(f" (all pixels within {hi - lo:.3f})"))
    if float(np.median(ring)) > (lo + hi) / 2:  # light paper, dark ink
        g = 1 - g
        ring = 1 - ring
    paper = float(np.median(ring))
    spread = 1.4826 * float(np.median(np.abs(ring - paper)))  # robust std of the paper: noise, shading
    top = float(g.max())
    if top - paper < MIN_CONTRAST:
        raise ImageError(f"{name}: " + BLANK.format(" (ink as bright as the paper)"))
    floor = min(paper + 3 * spread, paper + 0.5 * (top - paper))
    return np.clip((g - floor) / (top - floor), 0, 1).astype(np.float32)


def crop(a: np.ndarray, name: str = "image") -> np.ndarray:
    """Cut `a` to the bounding box of the pixels above INK."""
    rows = np.flatnonzero((a > INK).any(axis=1))
    cols = np.flatnonzero((a > INK).any(axis=0))
    if rows.size == 0:
        raise ImageError(f"{name}: " + BLANK.format(""))
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def stroke_width(a: np.ndarray) -> float:
    """Mean stroke width in pixels of the ink (a > 0.5): 2 * area / perimeter, exact for long straight strokes."""
    ink = (a > 0.5).astype(np.int8)
    area = int(ink.sum())
    edges = int(np.abs(np.diff(ink, axis=0, prepend=0, append=0)).sum())
    edges += int(np.abs(np.diff(ink, axis=1, prepend=0, append=0)).sum())
    return 2 * area / edges if edges else 0.0


def max_filter(a: np.ndarray, size: int) -> np.ndarray:
    """Grey dilation by a size x size square (size odd), separable: 2 * size array-wide maxima."""
    r = size // 2
    p = np.pad(a, r)
    h, w = a.shape
    rows = p[: h + 2 * r, r : r + w].copy()
    for k in range(size):  # vertical pass over the padded rows
        np.maximum(rows[r : r + h], p[k : k + h, r : r + w], out=rows[r : r + h])
    rows = rows[r : r + h]
    p = np.pad(rows, ((0, 0), (r, r)))
    out = rows.copy()
    for k in range(size):  # horizontal pass
        np.maximum(out, p[:, k : k + w], out=out)
    return out


def thicken(a: np.ndarray, box: int = BOX) -> np.ndarray:
    """Dilate a thin-pen digit so its strokes will be about STROKE px wide once scaled to `box` (as in MNIST).

    Only for strokes thinner than MIN_STROKE px at the final scale: MNIST's own digits are left alone.
    """
    f = max(a.shape) / box  # input pixels per output pixel
    w = stroke_width(a) / f
    if f < 2 or w >= MIN_STROKE:
        return a
    size = 2 * round((STROKE - w) * f / 2) + 1
    return crop(max_filter(a, size))


def scale(a: np.ndarray, box: int = BOX) -> np.ndarray:
    """Resize so the longer side is `box` px, aspect ratio kept (shorter side at least 1); peak back to 1."""
    h, w = a.shape
    f = box / max(h, w)
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    # BOX averages exactly the covered area when shrinking (no ringing); LANCZOS is smooth when enlarging
    flt = Image.Resampling.BOX if f < 1 else Image.Resampling.LANCZOS
    out = np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((nw, nh), flt), dtype=np.float32)
    out = np.clip(out, 0, None)
    return np.clip(out / out.max(), 0, 1) if out.max() > 0 else out


def centre(a: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Paste `a` into a black size x size frame, centre of mass at (size/2, size/2) by a whole-pixel shift."""
    h, w = a.shape
    m = float(a.sum(dtype=np.float64))
    cy = float((a.sum(axis=1, dtype=np.float64) * np.arange(h)).sum() / m)
    cx = float((a.sum(axis=0, dtype=np.float64) * np.arange(w)).sum() / m)
    # round half up (not to even) so a symmetric digit always moves the same way; keep the box in the frame
    top = min(max(math.floor(size / 2 - cy + 0.5), 0), size - h)
    left = min(max(math.floor(size / 2 - cx + 0.5), 0), size - w)
    out = np.zeros((size, size), np.float32)
    out[top : top + h, left : left + w] = a
    return out


@dataclass
class Seen:
    """What the network is shown for one picture, and what the warnings about it look at."""

    x: np.ndarray  # (784,) float32 in [0, 1], MNIST convention
    edge_ink: float  # share of the picture's outermost ring of pixels that is ink (0 with raw)


def look(im: Image.Image, name: str, raw: bool = False) -> Seen:
    """Steps 2-7 above on an opened picture; `name` is what error messages call it."""
    g = to_grey(im, name)
    if raw:
        if g.shape != (SIZE, SIZE):
            raise ImageError(
                f"{name}: --raw needs a {SIZE}x{SIZE} MNIST-style image, got {g.shape[1]}x{g.shape[0]}: "
                f"drop --raw to preprocess it"
            )
        return Seen(g.reshape(-1).astype(np.float32), 0.0)
    a = normalise(g, name)
    edge = float((border(a) > INK).mean())
    return Seen(centre(scale(thicken(crop(a, name)))).reshape(-1), edge)


def preprocess(path: str | os.PathLike, raw: bool = False) -> np.ndarray:
    """The network's input for the picture at `path`: float32 (784,) in [0, 1], MNIST convention.

    With raw=True the picture must already be 28x28 white-on-black and is only converted to grey.
    """
    return see(path, raw).x


def see(path: str | os.PathLike, raw: bool = False) -> Seen:
    """look() at the picture at `path`; with --raw it is not reduced, so its size is checked as in the file."""
    return look(load_image(path, reduce=not raw), str(path), raw)


# ---------------------------------------------------------------------------------------------------
# inputs unlike MNIST: each MNIST image is one digit, whole, with a margin; a network trained on them
# still answers for anything else, so these rules say when its answer deserves less trust.

MARK_INK = 0.3  # a pixel of the 28x28 input above this (or next to one) is ink, for counting marks
MARK_SHARE = 0.1  # a group of touching ink pixels holding this share of the ink is a mark of its own
EDGE_INK = 0.02  # ink on more than this share of the picture's outer ring: the picture cuts through ink
UNSURE = 0.6  # a top probability below this is worth saying


def marks(x: np.ndarray) -> int:
    """How many separate marks the 28x28 input holds: groups of 8-connected ink pixels (> MARK_INK) with
    at least MARK_SHARE of the ink each. MNIST digits are one mark; "47" written apart is two."""
    img = np.asarray(x, np.float32).reshape(SIZE, SIZE)
    ink = max_filter(img, 3) > MARK_INK  # grown by a pixel: a stroke broken by a pixel stays one mark
    total = float(img[ink].sum())
    seen = np.zeros_like(ink)
    count = 0
    for start in zip(*np.nonzero(ink)):
        if seen[start]:
            continue
        seen[start] = True
        stack, mass = [start], 0.0
        while stack:
            r, c = stack.pop()
            mass += float(img[r, c])
            for rr in range(max(r - 1, 0), min(r + 2, SIZE)):
                for cc in range(max(c - 1, 0), min(c + 2, SIZE)):
                    if ink[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
        count += mass >= MARK_SHARE * total
    return count


def warnings_for(seen: Seen, probs: np.ndarray) -> list[str]:
    """Plain-language notes on why an answer may be wrong: the rules above, in a fixed order."""
    out = []
    n = marks(seen.x)
    if n > 1:
        out.append(f"{n} separate marks: the network reads one digit at a time; write one digit per picture")
    if seen.edge_ink > EDGE_INK:
        out.append("ink touches the edge of the picture: the digit may be cut off, or the picture shows more "
                   "than the digit (a page edge, a shadow); crop to the digit with a margin around it")
    top = float(np.max(probs))
    if top < UNSURE:
        out.append(f"the network is unsure: its top answer has only {100 * top:.0f}%")
    return out


def png_bytes(x: np.ndarray) -> bytes:
    """What the network saw (784 floats in [0, 1]) as a 28x28 grey PNG, readable by `predict --raw`."""
    img = np.clip(np.rint(np.asarray(x, np.float32).reshape(SIZE, SIZE) * 255), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def save_preprocessed(x: np.ndarray, path: str | os.PathLike) -> Path:
    """Write png_bytes(x) to `path`."""
    p = Path(path)
    p.write_bytes(png_bytes(x))
    return p


def free_name(folder: Path, stem: str, taken: set[Path]) -> Path:
    """folder/STEM.28x28.png, or STEM.28x28-2.png ... : never overwrite a file (it may be an input)."""
    p, n = folder / f"{stem}.28x28.png", 1
    while p.exists() or p in taken:
        n += 1
        p = folder / f"{stem}.28x28-{n}.png"
    return p


# ---------------------------------------------------------------------------------------------------
# prediction


def expand(paths: list[str]) -> Iterator[tuple[str, Path | None, str | None]]:
    """(shown name, file or None, error or None) for each input; a folder becomes its images, sorted.
    One folder is listed at a time (its names only), as the images are needed."""
    for s in paths:
        p = Path(s)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            if not files:
                yield s, None, f"{s}: no images in this folder (looked for {', '.join(IMAGE_EXTS)})"
            yield from ((str(f), f, None) for f in files)
        else:
            yield s, p, None


OVERFLOW = ("the network's outputs overflow (NaN/Inf): its weights are far too large for a trained model; "
            "use another checkpoint")


def classify(model, x: np.ndarray, name: str) -> np.ndarray:
    """The 10 digit probabilities `model` gives the preprocessed picture x (784,)."""
    p = np.asarray(model.predict_proba(x[None].astype(np.float32)), dtype=np.float32)
    if p.shape != (1, 10):
        raise NNError(f"the model gives outputs of shape {p.shape[1:]}, expected 10 digit classes")
    if not np.isfinite(p).all():
        raise ImageError(f"{name}: {OVERFLOW}")
    return p[0]


def predict_images(
    paths: list[str],
    model,
    top_k: int = 3,
    raw: bool = False,
    as_json: bool = False,
    save_preprocessed_dir: str | None = None,
    out=None,
    err=None,
) -> int:
    """Classify every picture with `model` (anything with predict_proba (N, 784) -> (N, 10)); exit code.

    Each picture is read, classified and printed before the next is read: the output streams and the
    memory is that of one picture."""
    out, err = out or sys.stdout, err or sys.stderr
    if not 1 <= top_k <= 10:
        raise NNError(f"--top-k must be between 1 and 10, got {top_k}")
    save_dir = Path(save_preprocessed_dir) if save_preprocessed_dir else None
    if save_dir is not None:
        if save_dir.exists() and not save_dir.is_dir():
            raise NNError(f"--save-preprocessed {save_dir}: exists and is not a folder")
        save_dir.mkdir(parents=True, exist_ok=True)

    saved: set[Path] = set()
    failed = False
    for name, f, e in expand(paths):
        try:
            if e is not None:
                raise ImageError(e)
            v = see(f, raw)
            p = classify(model, v.x, name)
        except ImageError as ex:
            print(f"nn-numba: error: {printable(ex)}", file=err, flush=True)
            failed = True
            continue
        order = np.argsort(-p, kind="stable")[:top_k]
        rec = {
            "path": name,
            "digit": int(order[0]),
            "probability": round(float(p[order[0]]), 6),
            "top_k": [{"digit": int(d), "probability": round(float(p[d]), 6)} for d in order],
            "probabilities": [round(float(q), 6) for q in p],
            "warnings": warnings_for(v, p),
        }
        if save_dir is not None:
            dst = free_name(save_dir, f.stem, saved)
            saved.add(dst)
            rec["preprocessed"] = str(save_preprocessed(v.x, dst))
        if as_json:
            print(json.dumps(rec), file=out, flush=True)
        else:
            alts = "  ".join(f"{t['digit']} {100 * t['probability']:5.1f}%" for t in rec["top_k"])
            line = f"{name}: {rec['digit']} ({100 * rec['probability']:.1f}%)   top {top_k}: {alts}"
            if "preprocessed" in rec:
                line += f"   saved {rec['preprocessed']}"
            if rec["warnings"]:
                line += "   warning: " + "; ".join(rec["warnings"])
            print(printable(line), file=out, flush=True)
    return 1 if failed else 0


def predict_paths(
    paths: list[str],
    checkpoint: str | None,
    top_k: int = 3,
    raw: bool = False,
    as_json: bool = False,
    save_preprocessed: str | None = None,
) -> int:
    """`nn-numba predict`: classify each picture (folders: every image inside); 0 if all worked, else 1.

    Checkpoint problems (missing, corrupt, no trained model) raise NNError: nothing can be predicted.
    A bad picture prints `nn-numba: error: PATH: ...` on stderr and the others are still predicted.
    """
    from nn_numba.checkpoint import load  # here, so preprocessing works without the model code
    from nn_numba.model import MLP
    from nn_numba.runs import checkpoint_path

    ck_path = checkpoint_path(checkpoint, name_one="pass --checkpoint FILE or RUN")
    ck = load(ck_path)
    if ck.sizes[0] != SIZE * SIZE or ck.sizes[-1] != 10:
        raise NNError(f"checkpoint {ck_path}: network takes {ck.sizes[0]} inputs and gives {ck.sizes[-1]} "
                      f"outputs; predict needs a 784 -> 10 MNIST model")
    model = MLP.from_checkpoint(ck)
    return predict_images(paths, model, top_k, raw, as_json, save_preprocessed)
