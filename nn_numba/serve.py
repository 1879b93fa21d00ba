"""`nn-numba serve`: a local page to draw a digit on and watch the network read it, and its JSON API.

The page (nn_numba/static/) and the API are a Starlette app served by uvicorn, the optional extra
`nn-numba[serve]`. A request's picture goes through the same steps as `nn-numba predict`: predict.look
(open, grey, levels, crop, scale, centre), the model's predict_proba and predict.warnings_for.

API (docs/serve.md):
    GET  /api/models   the checkpoints on offer: the one given on the command line and every runs/*/best.ck
    POST /api/predict  a picture as a multipart form field `image`, a JSON {"image": "data:image/png;base64,..."}
                       or a raw image/* body; optional `model` (an id from /api/models) as a form field,
                       JSON key or query parameter. Returns digit, probabilities, warnings and the 28x28 input.
Every bad request gets a 4xx answer {"error": "..."}; the server keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import threading
import webbrowser
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import describe, load
from .errors import CtrlC, NNError
from .model import MLP
from .predict import SIZE, ImageError, classify, look, open_image, png_bytes, warnings_for

MAX_BODY = 10 * 1024 * 1024  # bytes of one request: a phone photo fits
MAX_PIXELS = 24_000_000  # pixels of one picture: larger ones are refused before decoding
STATIC = Path(__file__).parent / "static"


@dataclass
class Entry:
    """One checkpoint on offer: `id` is what the page sends back, never a path the client chooses."""

    id: str
    path: Path
    info: dict[str, Any]
    model: MLP | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Models:
    """The checkpoints a server offers, each loaded once and shared by all requests.

    A model's forward pass reuses its buffers, so one lock per model serialises its use; one image takes
    well under a millisecond.
    """

    def __init__(self, default: Path | None, runs: Path):
        self.default, self.runs = default, runs
        self.entries: dict[str, Entry] = {}
        self.guard = threading.Lock()
        if default is not None:
            self.first = self.add(default).id
            self.get(self.first)  # a damaged default fails now, with its message, not at the first request
        self.scan()
        if default is None:
            if not self.entries:
                raise NNError(f"no trained model found in {runs}/: run `nn-numba train default` "
                              "first, or give one: `nn-numba serve CHECKPOINT_OR_RUN`")
            self.first = next(iter(self.entries))

    def add(self, path: Path) -> Entry:
        inside = path.name == "best.ck" and path.parent.parent.resolve() == self.runs.resolve()
        key = path.parent.name if inside else str(path)
        with self.guard:
            if key not in self.entries:
                self.entries[key] = Entry(key, path, describe(path))
            return self.entries[key]

    def scan(self) -> None:
        """Add every RUNS/*/best.ck not yet on offer (newest run first); damaged files are left out."""
        if not self.runs.is_dir():
            return
        for ck in sorted(self.runs.glob("*/best.ck"), reverse=True):
            if ck.parent.is_symlink():
                continue  # runs/latest: the same run again
            try:
                self.add(ck)
            except NNError:
                pass

    def listing(self) -> list[dict[str, Any]]:
        self.scan()
        out = []
        for e in self.entries.values():
            i = e.info
            out.append({"id": e.id, "path": str(e.path), "default": e.id == self.first,
                        "architecture": i.get("architecture"), "epoch": i.get("epoch"),
                        "val_acc": i.get("val_acc"), "test_acc": i.get("test_acc"), "created": i.get("created")})
        return out

    def get(self, key: str | None) -> Entry:
        e = self.entries.get(key or self.first)
        if e is None:
            raise KeyError(key)
        with e.lock:
            if e.model is None:
                ck = load(e.path)
                if ck.sizes[0] != SIZE * SIZE or ck.sizes[-1] != 10:
                    raise NNError(f"{e.path}: the network takes {ck.sizes[0]} inputs and gives {ck.sizes[-1]} "
                                  "outputs; serve needs a 784 -> 10 MNIST model")
                e.model = MLP.from_checkpoint(ck)
        return e

    def read(self, key: str | None, data: bytes, name: str) -> dict[str, Any]:
        """The answer for one picture: what `nn-numba predict --json` says of it, plus the 28x28 input."""
        e = self.get(key)
        seen = look(open_image(io.BytesIO(data), name, MAX_PIXELS), name)
        with e.lock:
            p = classify(e.model, seen.x, name)
        return {"model": e.id, "digit": int(np.argmax(p)), "probabilities": [round(float(v), 6) for v in p],
                "warnings": warnings_for(seen, p),
                "image28": "data:image/png;base64," + base64.b64encode(png_bytes(seen.x)).decode()}


def create_app(models: Models):
    """The Starlette app: the page, its assets and the API."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    async def index(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse({"models": await run_in_threadpool(models.listing)})

    async def predict(request: Request) -> JSONResponse:
        data, name, key = await picture(request)
        if not data:
            raise HTTPException(400, "the picture is empty (0 bytes)")
        try:
            return JSONResponse(await run_in_threadpool(models.read, key, data, name))
        except KeyError:
            raise HTTPException(404, f"no model {key!r}: GET /api/models lists the ids on offer") from None
        except ImageError as e:
            raise HTTPException(400, str(e)) from None

    async def error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    routes = [Route("/", index), Route("/api/models", list_models), Route("/api/predict", predict, methods=["POST"]),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    return Starlette(routes=routes, middleware=[Middleware(BodyLimit, limit=MAX_BODY)],
                     exception_handlers={HTTPException: error})


async def picture(request) -> tuple[bytes, str, str | None]:
    """(image bytes, a name for messages, model id or None) from any of the three request forms."""
    from starlette.exceptions import HTTPException

    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        async with request.form(max_files=1, max_fields=4) as form:
            f, key = form.get("image"), form.get("model")
            if f is None or isinstance(f, str):
                raise HTTPException(400, "send the picture as a file in the form field 'image'")
            return await f.read(), f.filename or "upload", key if isinstance(key, str) else None
    if kind == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "the body is not valid JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise HTTPException(400, 'send {"image": "data:image/png;base64,..."} (a data URL or plain base64)')
        key = body.get("model")
        if key is not None and not isinstance(key, str):
            raise HTTPException(400, "'model' must be a string id from /api/models")
        return decode_data_url(body["image"]), "drawing", key
    if kind.startswith("image/"):
        return await request.body(), "upload", request.query_params.get("model")
    raise HTTPException(415, "send multipart/form-data with a field 'image', JSON with 'image', or an image/* body")


def decode_data_url(s: str) -> bytes:
    from starlette.exceptions import HTTPException

    b64 = s.split(",", 1)[1] if s.startswith("data:") and "," in s else s
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, "'image' is not valid base64 picture data") from None


class BodyLimit:
    """ASGI middleware: a request body longer than `limit` bytes gets 413, whether or not it says its length."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        from starlette.exceptions import HTTPException

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = HTTPException(413, f"the request is larger than {self.limit // (1024 * 1024)} MB: send a "
                                     "smaller picture")
        length = dict(scope["headers"]).get(b"content-length", b"0")
        declared_too_big = not length.isdigit() or int(length) > self.limit
        seen = 0

        async def limited():
            nonlocal seen
            if declared_too_big:
                raise too_big
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise too_big
            return msg

        await self.app(scope, limited, send)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so that a port in use is one clear line before anything starts."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        raise NNError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port or --host)") from None
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(checkpoint: str | None, host: str = "127.0.0.1", port: int = 8000, open_browser: bool = False,
          runs: str = "runs") -> None:
    """Run the server until Ctrl-C."""
    try:
        import multipart  # noqa: F401  (Starlette's form parser)
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise NNError("serve needs the optional packages: pip install 'nn-numba[serve]'") from None

    from .runs import checkpoint_path

    path = checkpoint_path(checkpoint) if checkpoint else None  # a file, or a run folder's best.ck
    models = Models(path, Path(runs))
    sock = bind(host, port)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{sock.getsockname()[1]}/"
    if not is_loopback(host):
        print(f"warning: serving on {host}: anyone who can reach this machine can use the page and the API")
    print(f"serving {models.first} at {url}  (Ctrl-C to stop)", flush=True)
    if open_browser:
        threading.Timer(0.5, webbrowser.open, (url,)).start()
    server = uvicorn.Server(uvicorn.Config(create_app(models), log_level="warning", lifespan="off"))
    try:
        server.run(sockets=[sock])  # Ctrl-C: uvicorn finishes the requests in flight, then re-raises it
    except (KeyboardInterrupt, CtrlC):  # CtrlC: what the command's own SIGINT handler raises
        pass
    print("stopped")
