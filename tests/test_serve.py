"""`nn-numba serve`: the JSON API through Starlette's test client and a real uvicorn server, the warnings
for inputs unlike MNIST, the command line, and the page itself in a real headless Chromium.

The model is a 784-64-10 network trained here with NumPy in a few seconds (about 95 % on MNIST), saved as
an ordinary checkpoint in a runs/ folder, so these tests do not depend on the trainer.
"""

import base64
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import nn_numba.predict as P
from nn_numba.checkpoint import Checkpoint, save

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from nn_numba import serve as S  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def idx(folder: Path, name: str) -> np.ndarray:
    raw = gzip.open(folder / name).read()
    return np.frombuffer(raw, np.uint8, offset=16 if "images" in name else 8)


@pytest.fixture(scope="module")
def digits(mnist_path):
    X = idx(mnist_path, "t10k-images-idx3-ubyte.gz").reshape(-1, 28, 28)
    return X, idx(mnist_path, "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(scope="module")
def runs(mnist_path, tmp_path_factory):
    """runs/small/best.ck (784-64-10, one epoch of SGD on 30,000 images) and runs/other/best.ck (a copy)."""
    X = idx(mnist_path, "train-images-idx3-ubyte.gz").reshape(-1, 784)[:30000].astype(np.float32) / np.float32(255)
    y = idx(mnist_path, "train-labels-idx1-ubyte.gz")[:30000]
    rng = np.random.default_rng(0)
    W1 = (rng.standard_normal((64, 784)) * np.sqrt(2 / 784)).astype(np.float32)
    W2 = (rng.standard_normal((10, 64)) * np.sqrt(2 / 64)).astype(np.float32)
    b1, b2 = np.zeros(64, np.float32), np.zeros(10, np.float32)
    for s in range(0, len(X), 50):
        x, t = X[s:s + 50], y[s:s + 50]
        h = np.maximum(x @ W1.T + b1, 0)
        z = h @ W2.T + b2
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(t)), t] -= 1
        p /= len(t)
        dh = (p @ W2) * (h > 0)
        for a, g in ((W2, p.T @ h), (b2, p.sum(0)), (W1, dh.T @ x), (b1, dh.sum(0))):
            a -= np.float32(0.2) * g
    root = tmp_path_factory.mktemp("serve") / "runs"
    meta = {"epoch": 1, "val_acc": 0.95, "test_acc": 0.95}
    for name in ("small", "other"):
        (root / name).mkdir(parents=True)
        save(root / name / "best.ck", Checkpoint([784, 64, 10], [W1, W2], [b1, b2], meta | {"producer": name}))
    return root


@pytest.fixture(scope="module")
def models(runs):
    return S.Models(runs / "small" / "best.ck", runs)


@pytest.fixture(scope="module")
def client(models):
    return TestClient(S.create_app(models))


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def paper(digit: np.ndarray, scale: int = 6) -> np.ndarray:
    """An MNIST digit as dark ink on white paper, enlarged: what a user draws or photographs."""
    return np.asarray(Image.fromarray(255 - digit).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR))


def expected(models, picture: bytes) -> np.ndarray:
    """The probabilities `nn-numba predict` gives for the same picture (its own functions, from a file)."""
    model = models.get(None).model
    return model.predict_proba(P.look(P.open_image(io.BytesIO(picture), "x"), "x").x[None])[0]


# ---------------------------------------------------------------------------------------------------
# the API


def test_page_and_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and '<canvas id="pad"' in page.text
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert "http" not in page.text.replace("http-equiv", ""), "the page must load nothing from elsewhere"


def test_models_lists_the_runs_with_what_they_are(client):
    ms = client.get("/api/models").json()["models"]
    assert [m["id"] for m in ms] == ["small", "other"]
    assert [m["default"] for m in ms] == [True, False]
    assert all(m["epoch"] == 1 and m["val_acc"] == 0.95 and m["architecture"] == "784-64-10" for m in ms)


def test_predict_gives_what_predict_gives(client, models, digits):
    X, y = digits
    right = 0
    for i in range(12):
        picture = png(paper(X[i]))
        r = client.post("/api/predict", files={"image": (f"{i}.png", picture, "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        want = expected(models, picture)
        np.testing.assert_allclose(body["probabilities"], want, atol=1e-6)
        assert body["digit"] == int(want.argmax()) and body["model"] == "small"
        right += body["digit"] == y[i]
        seen = Image.open(io.BytesIO(base64.b64decode(body["image28"].split(",", 1)[1])))
        assert seen.size == (28, 28)
        x = P.look(P.open_image(io.BytesIO(picture), "x"), "x").x
        np.testing.assert_array_equal(np.asarray(seen), np.rint(x.reshape(28, 28) * 255).astype(np.uint8))
    assert right >= 10


def test_the_three_request_forms_agree(client, digits):
    picture = png(paper(digits[0][3]))
    a = client.post("/api/predict", files={"image": ("d.png", picture, "image/png")}, data={"model": "other"})
    b = client.post("/api/predict", json={"image": "data:image/png;base64," + base64.b64encode(picture).decode(),
                                          "model": "other"})
    c = client.post("/api/predict?model=other", content=picture, headers={"content-type": "image/png"})
    assert a.status_code == b.status_code == c.status_code == 200
    assert a.json() == b.json() == c.json() and a.json()["model"] == "other"


def test_every_bad_request_is_a_4xx_json_error_and_the_server_goes_on(client, digits, tmp_path):
    from test_predict import huge_png

    good = png(paper(digits[0][0]))
    blank = png(np.full((60, 60), 255, np.uint8))
    bomb = Path(huge_png(tmp_path / "bomb.png")).read_bytes()
    cases = [
        (dict(files={"image": ("a.txt", b"not a picture", "text/plain")}), 400, "cannot identify image"),
        (dict(files={"image": ("e.png", b"", "image/png")}), 400, "empty"),
        (dict(files={"picture": ("d.png", good, "image/png")}), 400, "field 'image'"),
        (dict(files={"other": ("o.png", good, "image/png")}, data={"image": "text"}), 400, "field 'image'"),
        (dict(data={"image": "text"}), 415, "multipart/form-data"),
        (dict(files={"image": ("d.png", good, "image/png")}, data={"model": "nope"}), 404, "no model 'nope'"),
        (dict(files={"image": ("w.png", blank, "image/png")}), 400, "no ink found"),
        (dict(files={"image": ("bomb.png", bomb, "image/png")}), 400, "too large"),
        (dict(files={"image": ("cut.png", good[:100], "image/png")}), 400, "damaged or truncated"),
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (dict(json={"img": "x"}), 400, '{"image"'),
        (dict(json={"image": "data:image/png;base64,@@@"}), 400, "not valid base64"),
        (dict(json={"image": base64.b64encode(good).decode(), "model": 3}), 400, "'model' must be"),
        (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "multipart/form-data"),
        (dict(content=b"\0" * (S.MAX_BODY + 1), headers={"content-type": "image/png"}), 413, "larger than"),
        (dict(content=iter([b"\0" * (1 << 20)] * 11), headers={"content-type": "image/png"}), 413, "larger than"),
    ]
    for kw, status, words in cases:
        r = client.post("/api/predict", **kw)
        assert r.status_code == status, (kw.keys(), r.status_code, r.text[:200])
        assert words in r.json()["error"], r.json()
        assert "\n" not in r.json()["error"]
    wrong_method = client.get("/api/predict")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    ok = client.post("/api/predict", files={"image": ("d.png", good, "image/png")})
    assert ok.status_code == 200 and ok.json()["digit"] == 7


@pytest.fixture(scope="module")
def server(models):
    """A real uvicorn server on a free port of 127.0.0.1, in a thread of this process."""
    import uvicorn

    sock = S.bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(S.create_app(models), log_level="warning", lifespan="off"))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(100):
        if srv.started:
            break
        time.sleep(0.05)
    yield url
    srv.should_exit = True
    t.join(10)


def test_concurrent_requests_get_their_own_answers(server, models, digits):
    X, _ = digits
    pictures = [png(paper(X[i], scale=4 + i % 3)) for i in range(24)]
    want = [int(expected(models, p).argmax()) for p in pictures]

    def ask(k: int) -> int:
        req = urllib.request.Request(f"{server}/api/predict?model={'small' if k % 2 else 'other'}",
                                     data=pictures[k % 24], headers={"content-type": "image/png"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["digit"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(96)))
    assert got == [want[k % 24] for k in range(96)]


# ---------------------------------------------------------------------------------------------------
# warnings for inputs unlike MNIST


def test_two_digits_side_by_side_are_flagged(digits):
    X, y = digits
    fours, sevens = np.flatnonzero(y == 4)[:20], np.flatnonzero(y == 7)[:20]
    for a, b in zip(fours, sevens):
        pair = np.concatenate([X[a][:, 2:26], np.zeros((28, 8), np.uint8), X[b][:, 2:26]], axis=1)
        seen = P.look(Image.fromarray(255 - pair).resize((pair.shape[1] * 8, 224)), "47")
        assert P.marks(seen.x) == 2
        assert any("separate marks" in w for w in P.warnings_for(seen, np.eye(10)[0]))


def test_a_page_edge_in_the_photo_is_flagged(digits):
    photo = paper(digits[0][0]).astype(np.float32) * 0.7 + 50  # grey paper
    photo[:, :25] = 15  # the dark table beside the page's edge
    seen = P.look(Image.fromarray(photo.astype(np.uint8)), "edge")
    assert seen.edge_ink > P.EDGE_INK
    assert any("edge of the picture" in w for w in P.warnings_for(seen, np.eye(10)[0]))


def test_low_confidence_is_flagged_and_a_clear_answer_is_not(digits):
    seen = P.look(Image.fromarray(paper(digits[0][0])), "7")
    assert P.warnings_for(seen, np.eye(10)[7]) == []
    unsure = np.full(10, 0.05)
    unsure[3] = 0.55
    assert P.warnings_for(seen, unsure) == ["the network is unsure: its top answer has only 55%"]


def test_no_warnings_on_mnist_style_photographs(digits, tmp_path):
    from test_predict import user_style

    X, _ = digits
    rng = np.random.default_rng(1)
    for i in range(120):
        im, fmt = user_style(X[i], i, rng)
        path = tmp_path / f"{i}.{fmt}"
        im.save(path)
        seen = P.look(P.load_image(path), str(path))
        assert P.warnings_for(seen, np.eye(10)[0]) == [], i


def test_predict_reports_warnings_in_text_and_json(runs, digits, tmp_path, capsys):
    X, _ = digits
    pair = np.concatenate([X[0], X[1]], axis=1)
    Image.fromarray(255 - pair).resize((448, 224)).save(tmp_path / "two.png")
    Image.fromarray(paper(X[0])).save(tmp_path / "one.png")
    ck = str(runs / "small" / "best.ck")
    assert P.predict_paths([str(tmp_path / "one.png"), str(tmp_path / "two.png")], ck, as_json=True) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert recs[0]["warnings"] == [] and any("separate marks" in w for w in recs[1]["warnings"])
    P.predict_paths([str(tmp_path / "two.png")], ck)
    assert "warning: 2 separate marks" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# the command


def nn(*args, cwd=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nn_numba.cli", *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def wait_for(proc: subprocess.Popen) -> str:
    """The first line the server prints ("serving ... at URL"), or fail with what it said instead."""
    line = proc.stdout.readline()
    if line.startswith("warning:"):
        line += proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        pytest.fail(f"serve did not start: {line!r} {proc.stderr.read()!r}")
    return line


def test_serve_command_starts_warns_off_loopback_and_stops_cleanly_on_ctrl_c(runs):
    p = nn("serve", runs / "other", "--port", 0, "--host", "0.0.0.0", cwd=runs.parent)
    first = wait_for(p)
    assert first.startswith("warning: serving on 0.0.0.0") and "serving other at http://0.0.0.0:" in first
    port = int(first.rsplit(":", 1)[1].split("/")[0])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models", timeout=30) as r:
        assert [m["id"] for m in json.loads(r.read())["models"] if m["default"]] == ["other"]
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and out.strip() == "stopped" and err == ""


def test_serve_command_errors_are_one_line(runs, tmp_path):
    busy = S.bind("127.0.0.1", 0)
    cases = [
        (("serve", runs / "small", "--port", busy.getsockname()[1]), "cannot listen on 127.0.0.1:"),
        (("serve", tmp_path / "nothing.ck"), "nothing.ck"),
        (("serve",), "no trained model found"),
    ]
    for args, words in cases:
        p = nn(*args, cwd=tmp_path)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 1 and err.count("\n") == 1 and err.startswith("nn-numba: error: "), err
        assert words in err
    busy.close()


# ---------------------------------------------------------------------------------------------------
# the page in a real browser


def test_drawing_on_the_page_in_chromium(server, tmp_path):
    """Draws a 1 and then a 0 with pointer events on the canvas of the real page, reads the answers."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it")
        pytest.skip("no chromium here (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 900, "height": 760})
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('model').options.length === 2")
        box = page.locator("#pad").bounding_box()

        def draw(points):
            page.mouse.move(box["x"] + points[0][0] * box["width"], box["y"] + points[0][1] * box["height"])
            page.mouse.down()
            for x, y in points[1:]:
                page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=2)
            page.mouse.up()

        def answer() -> str:
            page.wait_for_function("document.getElementById('digit').textContent !== '–'", timeout=15000)
            return page.locator("#digit").text_content()

        draw([(0.5, 0.18 + 0.64 * k / 20) for k in range(21)])  # a vertical stroke: one
        assert answer() == "1"
        assert page.locator("#bars li.best").count() == 1
        assert page.locator("#seen").get_attribute("src").startswith("data:image/png;base64,")
        page.screenshot(path=str(tmp_path / "one.png"))
        page.keyboard.press("Escape")
        assert page.locator("#digit").text_content() == "–"
        t = np.linspace(0, 2 * np.pi, 40)
        draw(list(zip(0.5 + 0.22 * np.sin(t), 0.5 - 0.32 * np.cos(t))))  # an upright ellipse: zero
        assert answer() == "0"
        page.screenshot(path=str(tmp_path / "zero.png"))
        browser.close()
    assert (tmp_path / "one.png").stat().st_size > 0 and (tmp_path / "zero.png").stat().st_size > 0
    print(f"screenshots: {tmp_path / 'one.png'} {tmp_path / 'zero.png'}")


def test_a_model_whose_outputs_overflow_is_an_error_not_nan(runs, digits, tmp_path):
    W1, W2 = np.full((64, 784), 1e30, np.float32), np.full((10, 64), 1e30, np.float32)
    b1, b2 = np.zeros(64, np.float32), np.zeros(10, np.float32)
    save(tmp_path / "huge.ck", Checkpoint([784, 64, 10], [W1, W2], [b1, b2]))
    client = TestClient(S.create_app(S.Models(tmp_path / "huge.ck", tmp_path / "no-runs")))
    r = client.post("/api/predict", files={"image": ("d.png", png(paper(digits[0][0])), "image/png")})
    assert r.status_code == 400 and P.OVERFLOW in r.json()["error"], r.text
