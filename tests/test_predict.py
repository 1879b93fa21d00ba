"""`nn-numba predict`: preprocessing into MNIST's convention, bad inputs, and the user-style check.

The user-style test turns real MNIST test digits into pictures a user would take (dark ink on paper,
enlarged, off-centre, noisy, colour, transparent, JPEG) and checks the network gives the same answer on
them as on the original 28x28 digits. Its model is a float32 softmax regression trained here in about a
second (>= 90 % on MNIST), so the test does not depend on the trainer.
"""

import gzip
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import nn_numba.predict as P
from nn_numba.errors import NNError

# ---------------------------------------------------------------------------------------------------
# helpers


def idx(folder, name: str) -> np.ndarray:
    """An IDX file read directly (gzip + numpy), independent of nn_numba.data."""
    raw = gzip.open(folder / name).read()
    return np.frombuffer(raw, np.uint8, offset=16 if "images" in name else 8)


class Softmax:
    """A linear softmax classifier in float32, with the predict_proba API of nn_numba.model.MLP."""

    def __init__(self, W: np.ndarray, b: np.ndarray):
        self.W, self.b = W, b  # (784, 10), (10,)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = X @ self.W + self.b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="session")
def mnist_test(mnist_path):
    X = idx(mnist_path, "t10k-images-idx3-ubyte.gz").reshape(-1, 28, 28)
    y = idx(mnist_path, "t10k-labels-idx1-ubyte.gz")
    return X, y


@pytest.fixture(scope="session")
def model(mnist_path, mnist_test):
    X = idx(mnist_path, "train-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / np.float32(255)
    y = idx(mnist_path, "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(0)
    W, b, lr = np.zeros((784, 10), np.float32), np.zeros(10, np.float32), np.float32(0.5 / 100)
    for _ in range(3):  # 3 epochs of minibatch SGD, batch 100: ~92 % on the test set
        perm = rng.permutation(len(X))
        for s in range(0, len(X), 100):
            i = perm[s : s + 100]
            d = Softmax(W, b).predict_proba(X[i])
            d[np.arange(len(i)), y[i]] -= 1
            W -= lr * (X[i].T @ d)
            b -= lr * d.sum(axis=0)
    m = Softmax(W, b)
    Xt, yt = mnist_test
    acc = (m.predict_proba(Xt.reshape(-1, 784).astype(np.float32) / 255).argmax(1) == yt).mean()
    assert acc >= 0.90, f"test model too weak: {acc:.3f}"
    return m


def save(im: Image.Image, path, **kw):
    im.save(path, **kw)
    return str(path)


def shape_img(h=120, w=90, ink=0, paper=255, box=(30, 20, 90, 50)) -> np.ndarray:
    """uint8 (h, w) paper with an asymmetric 'L'-shaped stroke inside box = (top, left, bottom, right)."""
    a = np.full((h, w), paper, np.uint8)
    top, left, bottom, right = box
    a[top:bottom, left : left + 8] = ink  # vertical bar
    a[bottom - 8 : bottom, left:right] = ink  # foot
    return a


def com(x: np.ndarray) -> tuple[float, float]:
    """Centre of mass (row, col) in float64, pixel centres at integer coordinates."""
    a = x.reshape(28, 28).astype(np.float64)
    r, c = np.indices(a.shape)
    return float((a * r).sum() / a.sum()), float((a * c).sum() / a.sum())


# ---------------------------------------------------------------------------------------------------
# each step on synthetic images


def test_polarity_dark_on_light_equals_light_on_dark(tmp_path):
    dark = save(Image.fromarray(shape_img(ink=0, paper=255)), tmp_path / "dark.png")
    light = save(Image.fromarray(shape_img(ink=255, paper=0)), tmp_path / "light.png")
    grey = save(Image.fromarray(shape_img(ink=60, paper=200)), tmp_path / "grey.png")  # photographed paper
    x = P.preprocess(dark)
    assert x.dtype == np.float32 and x.shape == (784,)
    assert 0 <= x.min() and x.max() == 1
    np.testing.assert_array_equal(x, P.preprocess(light))
    np.testing.assert_allclose(x, P.preprocess(grey), atol=1e-5)
    # the ink is bright: the corners of the frame are background
    assert x.reshape(28, 28)[[0, 0, -1, -1], [0, -1, 0, -1]].max() == 0


def test_photographed_paper_becomes_black(tmp_path):
    # grey paper, light falling off across the page, sensor noise: the background must come out 0, not grey
    a = shape_img(h=300, w=240, box=(60, 50, 250, 150))
    clean = P.preprocess(save(Image.fromarray(a), tmp_path / "clean.png"))
    rng = np.random.default_rng(0)
    photo = a * 0.6 + 50 + np.linspace(0, 40, a.shape[1])[None, :] + rng.normal(0, 10, a.shape)
    x = P.preprocess(save(Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)), tmp_path / "photo.png"))
    assert np.abs(x - clean).mean() < 0.04
    assert (x[clean == 0] > 0.05).sum() < 40  # only a 1-px fringe where the shaded ink moved the centre


def test_crop_bounding_box():
    g = shape_img(box=(30, 20, 90, 50)).astype(np.float32) / 255
    a = P.crop(P.normalise(g))
    assert a.shape == (60, 30)  # rows 30..89, cols 20..49
    assert a[:, :8].min() == 1 and a[-8:, :].min() == 1 and a[:-8, 8:].max() == 0


@pytest.mark.parametrize("hw, want", [((60, 30), (20, 10)), ((15, 60), (5, 20)), ((4, 2), (20, 10)),
                                      ((200, 3), (20, 1)), ((20, 20), (20, 20))])
def test_scale_keeps_aspect_longer_side_20(hw, want):
    a = np.ones(hw, np.float32)
    s = P.scale(a)
    assert s.shape == want and s.dtype == np.float32
    assert s.max() == pytest.approx(1) and s.min() >= 0


def test_scale_is_area_average_when_shrinking():
    # an 80x80 one-pixel checkerboard shrinks by 4: each output pixel is a 4x4 block mean = half its ink
    a = (np.indices((80, 80)).sum(0) % 2).astype(np.float32)
    a[:, :40] *= 0.5  # left half fainter: 0.25 vs 0.5 after averaging, then the peak is stretched to 1
    s = P.scale(a)
    np.testing.assert_allclose(s[:, :10], 0.5, atol=1e-6)
    np.testing.assert_allclose(s[:, 10:], 1.0, atol=1e-6)


def test_thin_pen_strokes_are_thickened(tmp_path):
    # a 1-px "7" on a 400x400 page would be ~0.07 px wide at 28x28: it is dilated to MNIST's ~2 px first
    a = np.full((400, 400), 255, np.uint8)
    a[50, 100:300] = 0
    for r in range(50, 350):
        a[r, 300 - (r - 50) // 3] = 0
    x = P.preprocess(save(Image.fromarray(a), tmp_path / "seven.png")).reshape(28, 28)
    assert P.stroke_width(a < 128) < 1.2  # the staircase of the slanted stroke counts extra edges
    assert 1.2 <= P.stroke_width(x) <= 3.5
    assert (x > 0.5).sum() >= 40  # 300 px of line -> about 2 px x 20 px of strong ink, not a faint trace
    # strokes that are already thick enough are left as they are
    thick = P.crop(P.normalise(shape_img().astype(np.float32) / 255))
    assert P.thicken(thick) is thick


def test_max_filter_matches_brute_force():
    a = np.random.default_rng(0).random((23, 31)).astype(np.float32)
    for size in (1, 3, 7):
        r = size // 2
        want = np.array([[a[max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1].max() for j in range(31)]
                         for i in range(23)])
        np.testing.assert_array_equal(P.max_filter(a, size), want)


def test_centre_of_mass_at_14_14(tmp_path):
    rng = np.random.default_rng(3)
    exact = 0
    for k in range(40):
        h, w = int(rng.integers(10, 200)), int(rng.integers(10, 200))
        a = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 6))):  # a few random blobs, some far from the box centre
            t, c = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
            bh, bw = int(rng.integers(2, h // 2 + 3)), int(rng.integers(2, w // 2 + 3))
            a[t : t + bh, c : c + bw] = rng.integers(128, 256)
        x = P.preprocess(save(Image.fromarray(a), tmp_path / f"{k}.png")).reshape(28, 28)
        cy, cx = com(x)
        rows, cols = np.flatnonzero(x.any(1)), np.flatnonzero(x.any(0))
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 == 20  # longer side 20
        # within half a pixel, unless the shift had to stop where the box meets the frame's edge
        assert abs(cy - 14) <= 0.5 or rows[0] == 0 or rows[-1] == 27, (k, cy)
        assert abs(cx - 14) <= 0.5 or cols[0] == 0 or cols[-1] == 27, (k, cx)
        exact += abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    assert exact >= 30


def test_centre_of_mass_on_real_digits_round_trip(tmp_path, mnist_test):
    # an MNIST digit already follows the convention: preprocessing it again changes almost nothing
    X, _ = mnist_test
    diffs = []
    for i in range(100):
        x = P.preprocess(save(Image.fromarray(X[i]), tmp_path / f"{i}.png"))
        cy, cx = com(x)
        assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5, (i, cy, cx)
        diffs.append(np.abs(x - X[i].reshape(-1) / 255).mean())
    assert np.median(diffs) < 0.03, np.median(diffs)


def test_transparent_background_opaque_ink(tmp_path):
    ref = P.preprocess(save(Image.fromarray(shape_img()), tmp_path / "ref.png"))
    mask = shape_img(ink=255, paper=0)
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (*mask.shape, 4), dtype=np.uint8)  # garbage colour under alpha 0
    rgba[..., 3] = mask
    rgba[mask == 255, :3] = 0  # opaque black ink
    x = P.preprocess(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    np.testing.assert_allclose(x, ref, atol=1e-5)
    rgba[mask == 255, :3] = 255  # opaque white ink on transparent: white paper would hide it -> black paper
    x = P.preprocess(save(Image.fromarray(rgba, "RGBA"), tmp_path / "b.png"))
    np.testing.assert_allclose(x, ref, atol=1e-5)
    la = Image.fromarray(np.stack([np.zeros_like(mask), mask], -1), "LA")  # grey + alpha
    np.testing.assert_allclose(P.preprocess(save(la, tmp_path / "c.png")), ref, atol=1e-5)


def test_palette_rgb_16bit_bilevel_and_formats(tmp_path):
    a = shape_img()
    ref = P.preprocess(save(Image.fromarray(a), tmp_path / "ref.png"))
    im = Image.fromarray(a)
    cases = {
        "p.png": im.convert("P"),
        "p.gif": im.convert("P"),
        "rgb.png": im.convert("RGB"),
        "one.png": im.convert("1"),
        "rgb.bmp": im.convert("RGB"),
        "rgb.tif": im.convert("RGB"),
        "rgb.webp": im.convert("RGB"),
        "i16.png": Image.fromarray(a.astype(np.uint16) * 257),  # 16-bit grey PNG
    }
    for name, img in cases.items():
        path = save(img, tmp_path / name, **({"lossless": True} if name.endswith("webp") else {}))
        np.testing.assert_allclose(P.preprocess(path), ref, atol=1e-5, err_msg=name)
    i16 = Image.open(tmp_path / "i16.png")
    assert i16.mode.startswith("I")
    np.testing.assert_allclose(P.to_grey(i16), a / 255, atol=1e-6)  # 16-bit range scaled to [0, 1]
    # coloured ink on coloured paper: blue on yellow is still dark on light
    rgb = np.zeros((*a.shape, 3), np.uint8)
    rgb[a == 255] = (250, 230, 120)
    rgb[a == 0] = (20, 40, 160)
    x = P.preprocess(save(Image.fromarray(rgb, "RGB"), tmp_path / "colour.png"))
    np.testing.assert_allclose(x, ref, atol=1e-5)
    # a palette image whose transparent index is the background
    pal = im.convert("P")
    pal.info["transparency"] = pal.getpixel((0, 0))
    np.testing.assert_allclose(P.preprocess(save(pal, tmp_path / "pt.png")), ref, atol=1e-5)


def test_raw_and_saved_preprocessed_round_trip(tmp_path, mnist_test):
    X, _ = mnist_test
    path = save(Image.fromarray(X[0]), tmp_path / "d.png")
    np.testing.assert_array_equal(P.preprocess(path, raw=True), X[0].reshape(-1).astype(np.float32) / 255)
    big = Image.fromarray(255 - np.kron(X[1], np.ones((5, 5), np.uint8)))
    x = P.preprocess(save(big, tmp_path / "big.png"))
    out = P.save_preprocessed(x, tmp_path / "seen.png")
    np.testing.assert_allclose(P.preprocess(out, raw=True), x, atol=0.5 / 255 + 1e-7)
    with pytest.raises(P.ImageError, match=r"big\.png: --raw needs a 28x28 .* got 140x140"):
        P.preprocess(tmp_path / "big.png", raw=True)


# ---------------------------------------------------------------------------------------------------
# bad inputs


def huge_png(path, w=100_000, h=100_000):
    """A 60-byte PNG whose header claims w x h pixels (the pixel data is a stub)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return str(path)


def test_bad_inputs(tmp_path, monkeypatch):
    (tmp_path / "notes.png").write_text("this is not a picture\n")
    (tmp_path / "empty.png").write_bytes(b"")
    good = tmp_path / "good.png"
    Image.fromarray(shape_img()).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:120])  # header fine, pixels cut off
    Image.new("L", (50, 40), 255).save(tmp_path / "white.png")
    Image.new("RGB", (50, 40), (90, 90, 90)).save(tmp_path / "grey.jpg", quality=85)
    huge = huge_png(tmp_path / "huge.png")
    cases = [
        ("notes.png", r"notes\.png: cannot identify image"),
        ("empty.png", r"empty\.png: empty file"),
        ("missing.png", r"missing\.png: no such file"),
        ("cut.png", r"cut\.png: unreadable image"),
        ("white.png", r"white\.png: no ink found: the image is blank"),
        ("grey.jpg", r"grey\.jpg: no ink found: the image is blank"),
        ("huge.png", r"huge\.png: image too large"),
    ]
    for name, msg in cases:
        with pytest.raises(P.ImageError, match=msg) as e:
            P.preprocess(tmp_path / name)
        assert "\n" not in str(e.value) and isinstance(e.value, NNError)
    # our own limit, checked from the header before decoding
    monkeypatch.setattr(P, "MAX_PIXELS", 90 * 120 - 1)
    with pytest.raises(P.ImageError, match=r"good\.png: image too large \(90x120 = 10,800 pixels, limit"):
        P.preprocess(good)
    assert huge.endswith("huge.png")


def test_bad_images_do_not_stop_the_others(tmp_path, capsys, mnist_test, model):
    X, _ = mnist_test
    d = tmp_path / "in"
    d.mkdir()
    for i in (3, 1, 2):
        Image.fromarray(255 - X[i]).resize((112, 112), Image.Resampling.BILINEAR).save(d / f"{i}.png")
    (d / "readme.txt").write_text("not an image, and not an image extension: skipped")
    (d / "0_bad.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    paths = [str(tmp_path / "missing.jpg"), str(d), str(tmp_path / "empty")]
    rc = P.predict_images(paths, model, top_k=3, as_json=True)
    out, err = capsys.readouterr()
    assert rc == 1
    errs = err.strip().split("\n")
    assert len(errs) == 3 and all(e.startswith("nn-numba: error: ") for e in errs)
    assert "missing.jpg: no such file" in errs[0] and "0_bad.png: cannot identify image" in errs[1]
    assert "empty: no images in this folder" in errs[2]
    recs = [json.loads(line) for line in out.strip().split("\n")]
    assert [r["path"] for r in recs] == [str(d / f"{i}.png") for i in (1, 2, 3)]  # sorted, bad one skipped
    want = model.predict_proba(np.stack([P.preprocess(d / f"{i}.png") for i in (1, 2, 3)]))
    for r, p in zip(recs, want, strict=True):
        assert r["digit"] == int(p.argmax())
        assert len(r["probabilities"]) == 10 and sum(r["probabilities"]) == pytest.approx(1, abs=1e-5)
        np.testing.assert_allclose(r["probabilities"], p, atol=1e-6)
        assert [t["digit"] for t in r["top_k"]] == list(np.argsort(-p, kind="stable")[:3])
        assert r["probability"] == r["top_k"][0]["probability"]
    # all good -> 0, text output, one line per image with the top-k
    rc = P.predict_images([str(d / "1.png"), str(d / "2.png")], model, top_k=2)
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    lines = out.strip().split("\n")
    assert len(lines) == 2 and lines[0].startswith(f"{d / '1.png'}: ") and "top 2:" in lines[0]
    with pytest.raises(NNError, match="--top-k must be between 1 and 10"):
        P.predict_images([str(d)], model, top_k=11)


def test_save_preprocessed_never_overwrites(tmp_path, capsys, mnist_test, model):
    X, _ = mnist_test
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    Image.fromarray(255 - X[0]).save(a / "7.png")
    Image.fromarray(255 - X[1]).save(b / "7.png")
    out = tmp_path / "seen"
    out.mkdir()
    (out / "7.28x28.png").write_bytes(b"precious")
    rc = P.predict_images([str(a / "7.png"), str(b / "7.png")], model, as_json=True,
                          save_preprocessed_dir=str(out))
    recs = [json.loads(line) for line in capsys.readouterr().out.strip().split("\n")]
    assert rc == 0 and (out / "7.28x28.png").read_bytes() == b"precious"
    assert [r["preprocessed"] for r in recs] == [str(out / "7.28x28-2.png"), str(out / "7.28x28-3.png")]
    for r, src in zip(recs, (a / "7.png", b / "7.png"), strict=True):
        seen = P.preprocess(r["preprocessed"], raw=True)
        np.testing.assert_allclose(seen, P.preprocess(src), atol=0.5 / 255 + 1e-7)


def test_default_checkpoint(tmp_path):
    from nn_numba.runs import checkpoint_path

    runs = tmp_path / "runs"
    msg = (r"no trained model found .*: run `nn-numba train default` first, or give a checkpoint "
           "or run folder")
    with pytest.raises(NNError, match=msg):
        checkpoint_path(None, runs)
    run = runs / "2024-01-01_120000"
    run.mkdir(parents=True)
    (runs / "latest").symlink_to(run.name)
    with pytest.raises(NNError, match="no trained model found"):  # run exists, best.ck not yet
        checkpoint_path(None, runs)
    (run / "best.ck").write_bytes(b"x")
    assert checkpoint_path(None, runs) == (run / "best.ck").resolve()
    (runs / "latest").unlink()
    (runs / "latest").write_text(run.name + "\n")  # a text file naming the run
    assert checkpoint_path(None, runs) == run / "best.ck"


# ---------------------------------------------------------------------------------------------------
# the user-style test


def user_style(digit: np.ndarray, k: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """An MNIST digit as a user would photograph or draw it: dark ink on light paper, enlarged, off-centre.

    k picks the kind: k % 5 for the five kinds below, k < 0 for a thin pen.
    """
    s = int(rng.integers(4, 11))
    big = Image.fromarray(255 - digit).resize((28 * s, 28 * s), Image.Resampling.BILINEAR)
    W, H = 28 * s + int(rng.integers(20, 200)), 28 * s + int(rng.integers(20, 200))
    canvas = Image.new("L", (W, H), 255)
    canvas.paste(big, (int(rng.integers(0, W - 28 * s + 1)), int(rng.integers(0, H - 28 * s + 1))))
    c = np.asarray(canvas, np.float32)
    kind = k % 5 if k >= 0 else 5
    if kind == 0:  # photographed: grey paper, uneven light, sensor noise
        light = np.linspace(0, 25, W, dtype=np.float32)[None, :]
        c = c * 0.7 + 40 + light + rng.normal(0, 6, c.shape)
        return Image.fromarray(np.clip(c, 0, 255).astype(np.uint8)), "png"
    if kind == 1:  # RGB, warm paper tint
        return Image.fromarray(np.stack([c, c * 0.95, c * 0.85], -1).astype(np.uint8), "RGB"), "png"
    if kind == 2:  # RGBA: transparent background, opaque dark-blue ink
        rgba = np.stack([np.full_like(c, 20), np.full_like(c, 30), np.full_like(c, 90), 255 - c], -1)
        return Image.fromarray(rgba.astype(np.uint8), "RGBA"), "png"
    if kind == 3:  # JPEG quality 85
        return Image.fromarray(np.stack([c] * 3, -1).astype(np.uint8), "RGB"), "jpeg"
    if kind == 4:
        return Image.fromarray(c.astype(np.uint8)).convert("P"), "gif"  # palette
    # a thin pen: the strokes eroded to a third or less of their width
    thin = P.max_filter(np.where(c > 127, 255, 0).astype(np.uint8), s | 1)  # paper grows over the ink
    return Image.fromarray(thin), "png"


def test_user_style_digits_agree_with_mnist(tmp_path, mnist_test, model):
    X, y = mnist_test
    n = 300
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        im, fmt = user_style(X[i], i, rng)
        paths.append(save(im, tmp_path / f"{i}.{fmt}", **({"quality": 85} if fmt == "jpeg" else {})))
    xs = np.stack([P.preprocess(p) for p in paths])
    want = model.predict_proba(X[:n].reshape(n, 784).astype(np.float32) / 255).argmax(1)
    got = model.predict_proba(xs).argmax(1)
    agree = (got == want).mean()
    assert agree >= 0.97, f"only {agree:.1%} agree; disagreeing: {np.flatnonzero(got != want)[:20]}"
    # and the digits are mostly right (the test model is ~92 % on MNIST)
    assert (got == y[:n]).mean() >= 0.85


# ---------------------------------------------------------------------------------------------------
# the whole command through a real checkpoint file


def test_predict_paths_with_checkpoint(tmp_path, capsys, monkeypatch, mnist_test, model):
    from nn_numba.checkpoint import Checkpoint
    from nn_numba.checkpoint import save as save_ck

    X, _ = mnist_test
    # the softmax model as a 1-layer checkpoint (784 -> 10, W stored out x in)
    ck = tmp_path / "runs" / "run1" / "best.ck"
    ck.parent.mkdir(parents=True)
    save_ck(ck, Checkpoint([784, 10], [np.ascontiguousarray(model.W.T)], [model.b.copy()]))
    rng = np.random.default_rng(5)
    paths = [save(user_style(X[i], i, rng)[0], tmp_path / f"{i}.png") for i in range(6)]
    rc = P.predict_paths(paths + [str(tmp_path / "nope.png")], str(ck), top_k=2, as_json=True)
    out, err = capsys.readouterr()
    assert rc == 1 and err.startswith(f"nn-numba: error: {tmp_path / 'nope.png'}: no such file")
    recs = [json.loads(line) for line in out.strip().split("\n")]
    want = model.predict_proba(np.stack([P.preprocess(p) for p in paths]))
    assert [r["path"] for r in recs] == paths
    np.testing.assert_allclose([r["probabilities"] for r in recs], want, atol=1e-5)
    assert [r["digit"] for r in recs] == list(want.argmax(1))
    # no --checkpoint: runs/latest of the working folder, or a clear error before reading any image
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "latest").symlink_to("run1")
    assert P.predict_paths(paths[:2], None, top_k=1) == 0
    assert len(capsys.readouterr().out.strip().split("\n")) == 2
    (tmp_path / "runs" / "latest").unlink()
    with pytest.raises(NNError, match="no trained model found"):
        P.predict_paths(paths, None)
    # a checkpoint that is not an MNIST classifier
    save_ck(tmp_path / "tiny.ck", Checkpoint([4, 2], [np.zeros((2, 4), np.float32)], [np.zeros(2, np.float32)]))
    with pytest.raises(NNError, match=r"tiny\.ck: network takes 4 inputs and gives 2 outputs"):
        P.predict_paths(paths, str(tmp_path / "tiny.ck"))


def test_thin_pen_digits_agree_with_mnist(tmp_path, mnist_test, model):
    # the same digits drawn with a pen a third as wide: without thickening only ~85 % agree
    X, _ = mnist_test
    n = 150
    rng = np.random.default_rng(2)
    xs = np.stack([P.preprocess(save(user_style(X[i], -1, rng)[0], tmp_path / f"{i}.png")) for i in range(n)])
    want = model.predict_proba(X[:n].reshape(n, 784).astype(np.float32) / 255).argmax(1)
    agree = (model.predict_proba(xs).argmax(1) == want).mean()
    assert agree >= 0.90, f"only {agree:.1%} agree"
