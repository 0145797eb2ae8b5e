"""`rdjax serve --workdir=DIR`: an HTTP server that scores images one request at a time.

A production line sends each camera image as it comes; requests that arrive together
are batched into one Model.predict call (up to --batch_size, waiting at most
--max_wait_ms for the batch to fill), run in one worker thread so the event loop keeps
accepting. Every call pads to the same batch size (rdjax.runtime.sharding pads to it), so one
compiled program serves every batch and an image's answer is bit-identical whatever
else shares its batch: it equals ``model.predict(image, batch_size=--batch_size)``. A
padded call costs a full batch, which on CPU is as much as its images one by one: there
the default batch size is 1 (experiments/serve_load.py measures it).

Endpoints: ``POST /predict`` (the image file's bytes as the body, or a multipart form
field ``image``; ``?map=1`` adds the anomaly map as a PNG; ``?category=NAME`` decides
with a unified model's category NAME, 'global' or 'auto', else with --category, else
the model's default, and the answer names the category and threshold that decided),
``GET /health``, and ``GET /``,
a self-contained page to try an image by hand. Every refused request gets a 4xx status
(503 when busy, with Retry-After) and a one-line JSON reason; a failing model call
answers 500 to its batch and the server goes on. Memory, connections, the time a client
may take and who may call are bounded by rdjax.serve.limits. Needs the optional stack:
pip install 'rdjax[serve]' (starlette, uvicorn, python-multipart).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import importlib.util
import io
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import flags

from rdjax.errors import ConfigError, one_line
from rdjax.modes import CATEGORY_HELP
from rdjax.serve.limits import (
    MAX_HEADER_BYTES,
    ASGIApp,
    Budget,
    Guard,
    Header,
    RequestError,
    Settings,
    decode,
    error_reason,
    exposure_warning,
    image_bytes,
    probe,
    protocol,
    settings_of,
)
from rdjax.serve.limits import define_flags as define_limit_flags

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from rdjax.deploy.predictor import Model, Prediction

log = logging.getLogger(__name__)

# The import name of each package of the extra, and what pip calls it.
REQUIRED = {"starlette": "starlette", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}


def require() -> None:
    """The server stack is an optional extra: say how to install it, in one line."""
    missing = [pip for module, pip in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"rdjax serve needs {', '.join(missing)}: pip install 'rdjax[serve]'")


# ----------------------------------------------------------------------------- images in, answers out


@dataclasses.dataclass(frozen=True)
class Scored:
    """One image's share of a batch's Prediction."""

    score: float
    map: np.ndarray  # float32 (H, W) at the image's resolution
    routed: str | None = None  # its category by the router, where the batch was routed


def split(prediction: Prediction, routed: bool) -> list[Scored]:
    names = prediction.categories if routed else None
    return [
        Scored(score=float(prediction.scores[i]), map=m, routed=None if names is None else names[i])
        for i, m in enumerate(prediction.maps)
    ]


def choose(model: Model, category: str | None) -> str | None:
    """A request's category (None: the server's default), checked: a RequestError 400 for
    one the model cannot decide with."""
    if category is None:
        return model.category
    try:
        model.check_category(category)
    except ConfigError as e:
        raise RequestError(400, f"?category={category}: {one_line(e)}") from None
    return category


# The map becomes levels a band of rows at a time: the float64 temporaries of the scaling
# (several per pixel) then cost a band's pixels, not the image's.
BAND_PIXELS = 2**20


def map_levels(model: Model, amap: np.ndarray, category: str | None) -> tuple[np.ndarray, dict]:
    """The map as 8-bit levels and how to read them: calibrated, the normalized pixel scale
    of the deciding category (level / 255, the pixel threshold at 0.5); uncalibrated, the
    image's own min..max."""
    scale: Callable[[np.ndarray], np.ndarray]
    if model.calibration is not None:
        scale, info = lambda band: model.normalized_map(band, category), {"scale": "normalized", "min": 0.0, "max": 1.0}
    else:
        lo, hi = float(amap.min()), float(amap.max())
        scale, info = lambda band: (band - lo) / max(hi - lo, 1e-12), {"scale": "raw", "min": lo, "max": hi}
    levels = np.empty(amap.shape, np.uint8)
    rows = max(1, BAND_PIXELS // amap.shape[1])
    for top in range(0, amap.shape[0], rows):  # elementwise, so the bands' levels are the whole map's
        levels[top : top + rows] = np.round(np.clip(scale(amap[top : top + rows]), 0.0, 1.0) * 255.0)
    return levels, info


def answer(model: Model, scored: Scored, with_map: bool, category: str | None = None) -> dict:
    """The JSON body of a scored image, decided by ``category``'s thresholds (`choose`;
    AUTO: the category the router gave it)."""
    from PIL import Image

    from rdjax.deploy.predictor import AUTO, normalized_score

    if not np.isfinite(scored.score):  # NaN >= threshold is False: never call such an image normal
        raise RequestError(500, f"the model gave a non-finite score ({scored.score}) for this image")
    name, cal = model.thresholds(scored.routed if category == AUTO else category)
    height, width = scored.map.shape
    body: dict[str, Any] = {
        "score": scored.score,
        "normalized_score": None,
        "decision": None,
        "category": name,
        "threshold": None,
        "width": width,
        "height": height,
        "step": model.step,
    }
    if cal is not None:
        t = float(cal["image_threshold"])
        body.update(
            normalized_score=float(normalized_score(scored.score, cal)),
            decision="anomalous" if scored.score >= t else "normal",
            threshold=t,
        )
    if with_map:
        levels, info = map_levels(model, scored.map, name)
        buf = io.BytesIO()
        Image.fromarray(levels, mode="L").save(buf, format="PNG")
        body["map"] = {"png": base64.b64encode(buf.getvalue()).decode("ascii"), **info}
    return body


# ----------------------------------------------------------------------------- batching


@dataclasses.dataclass
class _Pending:
    image: np.ndarray
    arrived: float
    future: asyncio.Future
    route: bool = False  # its answer needs the router's category


class Batcher:
    """Gathers the images of concurrent requests into one predict call.

    The first waiting image opens a batch; it closes when ``batch_size`` images wait or
    ``max_wait_s`` after that image arrived. While the model runs, newcomers queue, and
    the next batch takes them at once. One call runs at a time, in its own thread.
    ``predict(images, route)`` routes the batch's images (rdjax.scoring.router) where any of its
    requests needs that.
    """

    def __init__(
        self,
        predict: Callable[[list[np.ndarray], bool], Prediction],
        batch_size: int,
        max_wait_s: float,
        max_queue: int,
    ) -> None:
        self.predict = predict
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.batches = 0  # predict calls made
        self.images = 0  # images they scored
        self._pending: collections.deque[_Pending] = collections.deque()
        self._running: list[_Pending] = []  # the batch in the model now
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rdjax-predict")
        self._task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Answer whatever still waits with 503; a model call under way finishes in its thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in [*self._running, *self._pending]:
            if not item.future.done():
                item.future.set_exception(RequestError(503, "the server is shutting down"))
        self._pending.clear()
        self._executor.shutdown(wait=False)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    async def submit(self, image: np.ndarray, route: bool = False) -> Scored:
        assert self._wakeup is not None, "Batcher.start() first"
        if len(self._pending) >= self.max_queue:
            raise RequestError(503, f"busy: {len(self._pending)} images wait for the model (--max_queue); try again")
        loop = asyncio.get_running_loop()
        item = _Pending(image, loop.time(), loop.create_future(), route)
        self._pending.append(item)
        self._wakeup.set()
        return await item.future

    async def _next_batch(self) -> list[_Pending]:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._pending[0].arrived + self.max_wait_s
        while len(self._pending) < self.batch_size and (remaining := deadline - loop.time()) > 0:
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)
        count = min(self.batch_size, len(self._pending))
        return [self._pending.popleft() for _ in range(count)]

    async def _run(self) -> None:
        while True:  # no local names the batch: its images and maps are freed with its requests
            await self._score([p for p in await self._next_batch() if not p.future.done()])

    async def _score(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        self._running = batch
        route = any(p.route for p in batch)
        results: list[Scored] | RequestError
        try:
            prediction = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.predict, [p.image for p in batch], route
            )
            results = split(prediction, route)
        except Exception as e:  # this batch fails, the server goes on
            log.exception("predict failed on a batch of %d", len(batch))
            results = RequestError(500, f"the model failed on this batch ({error_reason(e)})")
        self._running = []  # not when cancelled: stop() answers the batch in the model
        if isinstance(results, RequestError):
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(results)
            return
        self.batches += 1
        self.images += len(batch)
        for p, result in zip(batch, results):
            if not p.future.done():
                p.future.set_result(result)


# ----------------------------------------------------------------------------- the application


def _flag(value: str | None, name: str) -> bool:
    """A query switch: absent, 0, false or no is off; present alone, 1, true or yes is on."""
    if value is None or value.lower() in ("0", "false", "no"):
        return False
    if value.lower() in ("", "1", "true", "yes"):
        return True
    raise RequestError(400, f"?{name}={value}: use {name}=1 or {name}=0")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rdjax serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>
body{font-family:sans-serif;margin:1.5em;color:#222;max-width:60em}
#drop{display:block;border:2px dashed #999;border-radius:8px;padding:2em;text-align:center}
#drop.over{border-color:#36c;background:#eef4ff}
#decision{display:inline-block;padding:.15em .6em;border-radius:4px;color:#fff;background:#666;font-weight:bold}
#decision.ng{background:#be1e1e}#decision.ok{background:#1e823c}
#overlay{min-width:256px;max-width:100%;image-rendering:pixelated;margin-top:.5em}
.muted{color:#666;font-size:90%}
</style></head><body>
<h1>rdjax serve</h1>
<p id="model" class="muted"></p>
<label id="drop">Drop an image here, or choose one: <input type="file" id="file" accept="image/*,.tif,.tiff"></label>
<p id="status"></p>
<div id="result" hidden>
<p><span id="decision"></span> score <b id="score"></b>, normalized <b id="normalized"></b>
<span id="size" class="muted"></span></p>
<img id="overlay" alt="the anomaly map over the image">
<p id="legend" class="muted"></p>
</div>
<canvas id="work" hidden></canvas>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
// A server started with a token: open the page as /#token=TOKEN (a fragment is never sent).
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const auth = token ? {"Authorization": "Bearer " + token} : {};
const clamp = (x) => Math.max(0, Math.min(1, x));
const band = (v, k) => clamp(1.5 - Math.abs(4 * v - k));
const jet = (v) => [band(v, 3), band(v, 2), band(v, 1)];
const loadImage = (src) => new Promise((ok, fail) => {
  const img = new Image();
  img.onload = () => ok(img);
  img.onerror = () => fail(new Error("cannot decode"));
  img.src = src;
});

async function overlay(file, data) {
  const w = data.width, h = data.height, canvas = $("work");
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  ctx.drawImage(await loadImage("data:image/png;base64," + data.map.png), 0, 0);
  const heat = ctx.getImageData(0, 0, w, h).data;
  let base = null;
  const url = URL.createObjectURL(file);
  try {
    ctx.clearRect(0, 0, w, h);
    ctx.drawImage(await loadImage(url), 0, 0, w, h);
    base = ctx.getImageData(0, 0, w, h).data;
  } catch (e) {
    base = null;  // a format this browser cannot show (TIFF): the heat map alone
  } finally {
    URL.revokeObjectURL(url);
  }
  const out = ctx.createImageData(w, h);
  for (let i = 0; i < heat.length; i += 4) {
    const rgb = jet(heat[i] / 255);
    for (let k = 0; k < 3; k++) {
      out.data[i + k] = Math.round(base ? 0.5 * base[i + k] + 127.5 * rgb[k] : 255 * rgb[k]);
    }
    out.data[i + 3] = 255;
  }
  ctx.putImageData(out, 0, 0);
  $("overlay").src = canvas.toDataURL("image/png");
  return base !== null;
}

async function score(file) {
  $("result").hidden = true;
  $("status").textContent = "scoring " + file.name + " ...";
  let resp, data;
  try {
    resp = await fetch("predict?map=1", {method: "POST", body: file,
      headers: {...auth, "Content-Type": file.type || "application/octet-stream"}});
    data = await resp.json();
  } catch (e) {
    $("status").textContent = "error: " + e.message;
    return;
  }
  if (!resp.ok) {
    $("status").textContent = "error " + resp.status + ": " + data.error;
    return;
  }
  const d = $("decision");
  d.className = data.decision === "anomalous" ? "ng" : data.decision === "normal" ? "ok" : "";
  d.textContent = data.decision === null ? "no threshold" : data.decision === "anomalous" ? "NG" : "OK";
  $("score").textContent = data.score.toFixed(6);
  $("normalized").textContent = data.normalized_score === null ? "n/a" : data.normalized_score.toFixed(3);
  $("size").textContent = "(" + data.width + " x " + data.height + " px)";
  $("legend").textContent = "The anomaly map over the image, blue (low) to red (high): " +
    (data.map.scale === "normalized" ? "green, the middle, is the pixel threshold." : "this image's own range.");
  const shown = await overlay(file, data);
  $("status").textContent = file.name + (shown ? "" : " (the browser cannot show this format: heat map only)");
  $("result").hidden = false;
}

$("file").addEventListener("change", (e) => { if (e.target.files.length) score(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) score(e.dataTransfer.files[0]);
});
fetch("health", {headers: auth}).then((r) => r.json()).then((h) => {
  const threshold = h.image_threshold === null ? "uncalibrated (no decisions)" :
    "image threshold " + h.image_threshold.toPrecision(4);
  $("model").textContent = "model step " + h.step + ", image size " + h.image_size + " px, " + threshold;
});
</script>
</body></html>
"""


def create_app(model: Model, settings: Settings | None = None) -> ASGIApp:
    """The ASGI application behind its access checks (serve_limits.Guard); the batcher
    starts and stops with it (its lifespan). ``settings`` None: the defaults."""
    settings = settings or Settings()
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    from rdjax.deploy.predictor import AUTO, GLOBAL

    def predict_batch(images: list[np.ndarray], route: bool) -> Prediction:
        category = AUTO if route else (GLOBAL if model.categories else None)
        return model.predict(images, batch_size=settings.batch_size, category=category)

    batcher = Batcher(
        predict_batch,
        settings.batch_size,
        settings.max_wait_ms / 1000,
        settings.max_queue,
    )
    # What requests hold is bounded by the budget they lease from, not by the queue or by
    # these threads: admitted images may wait for the model, decoded, however many there are.
    budget = Budget(settings.max_memory)
    workers = anyio.CapacityLimiter(os.cpu_count() or 1)

    async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=workers)

    async def predict(request: Request) -> Response:
        with_map = _flag(request.query_params.get("map"), "map")
        category = choose(model, request.query_params.get("category"))
        with budget.lease() as lease:
            data = await image_bytes(request, settings, lease)
            header: Header = await in_thread(probe, data, settings.max_pixels)
            lease.grow(header.memory, f"a {header.width}x{header.height} {header.mode} image")
            # Decoded only now, and named nowhere here: the batcher drops it with its batch.
            scored = await batcher.submit(await in_thread(decode, data), route=category == AUTO)
            return JSONResponse(await in_thread(answer, model, scored, with_map, category))

    async def health(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "model": model.workdir.name,  # its folder's name: where it lies is the server's business
                "step": model.step,
                "image_size": model.image_size,
                "image_threshold": model.image_threshold,
                "category": model.decided_by if model.calibration is not None else None,
                "categories": model.categories,
                "router": model.router is not None,
                "resize": model.resize.mode,
                "batch_size": settings.batch_size,
                "max_wait_ms": settings.max_wait_ms,
                "max_bytes": settings.max_bytes,
                "max_pixels": settings.max_pixels,
                "max_queue": settings.max_queue,
                "max_memory": settings.max_memory,
                "max_connections": settings.max_connections,
                "header_timeout_s": settings.header_timeout_s,
                "body_timeout_s": settings.body_timeout_s,
                "keep_alive_s": settings.keep_alive_s,
                "memory_in_use": budget.used,
                "waiting": batcher.waiting,
                "batches": batcher.batches,
                "images": batcher.images,
            }
        )

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def refused(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestError)
        return JSONResponse({"error": error.reason}, error.status, error.headers)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        return JSONResponse({"error": " ".join(str(error.detail).split())}, error.status_code, error.headers)

    async def internal_error(request: Request, error: Exception) -> Response:  # uvicorn logs the traceback too
        return JSONResponse({"error": f"internal error ({error_reason(error)})"}, 500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/predict", predict, methods=["POST"]),
        ],
        exception_handlers={RequestError: refused, HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    hosts = frozenset(h.lower() for h in (*settings.allow_hosts, socket.gethostname()))
    return Guard(app, settings.token, frozenset(settings.allow_origins), hosts)


# ----------------------------------------------------------------------------- running it


def warm_up(model: Model, batch_size: int) -> None:
    """Compile the one program every batch uses before the first request waits for it."""
    model.predict(np.zeros((model.image_size, model.image_size, 3), np.uint8), batch_size=batch_size)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), bound before the model loads so that a
    taken port fails at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def server(model: Model, settings: Settings, **options: Any) -> uvicorn.Server:
    """A uvicorn server of ``model`` with the connection limits of ``settings``: h11
    (the parser whose limits are set here), its header size, the idle keep-alive
    timeout, and serve_limits.protocol's connection cap and header deadline."""
    import uvicorn

    config = uvicorn.Config(
        create_app(model, settings),
        http=protocol(settings.max_connections, settings.header_timeout_s),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_keep_alive=settings.keep_alive_s,
        access_log=False,
        **options,
    )
    return uvicorn.Server(config)


@contextlib.contextmanager
def running(model: Model, host: str = "127.0.0.1", port: int = 0, settings: Settings | None = None) -> Iterator[str]:
    """Serve ``model`` from a background thread (port 0: a free port); yields the base URL
    once requests are answered, and stops the server (in-flight requests finish) on exit.
    ``settings`` None: the defaults."""
    require()
    settings = settings or Settings()
    warm_up(model, settings.batch_size)
    sock = listen(host, port)
    url = url_of(sock)
    uvicorn_server = server(model, settings, log_config=None)
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, name="rdjax-serve", daemon=True)
    thread.start()
    try:
        while not uvicorn_server.started:
            if not thread.is_alive():
                raise RuntimeError(f"the server at {url} did not start (its error is logged above)")
            time.sleep(0.01)
        yield url
    finally:
        uvicorn_server.should_exit = True
        thread.join()
        sock.close()


# ----------------------------------------------------------------------------- the command


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    defaults = Settings()
    flags.DEFINE_string("workdir", None, "A trained rdjax workdir (or --package).", flag_values=fv)
    flags.DEFINE_string("package", None, "A model package folder (or --workdir).", flag_values=fv)
    flags.DEFINE_string(
        "host",
        "127.0.0.1",
        "Address to listen on; 0.0.0.0 for every interface (plain HTTP; set a token, and a warning is printed).",
        flag_values=fv,
    )
    flags.DEFINE_integer("port", 8000, "Port to listen on.", lower_bound=0, upper_bound=65535, flag_values=fv)
    flags.DEFINE_integer(
        "batch_size",
        None,
        "Images per model call, each call padded to it (so it costs a full batch). Default: 1 on CPU, where a "
        f"batch costs as much as its images one by one, else {defaults.batch_size}.",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_float(
        "max_wait_ms",
        defaults.max_wait_ms,
        "How long a request waits for others to share its batch.",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_integer("max_bytes", defaults.max_bytes, "Largest request body.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer(
        "max_pixels", defaults.max_pixels, "Largest image, width x height.", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_integer(
        "max_queue",
        defaults.max_queue,
        "Images waiting for the model beyond which a request is refused with 503 (at least --batch_size); "
        "it bounds latency, --max_memory bounds memory.",
        lower_bound=1,
        flag_values=fv,
    )
    define_limit_flags(fv, defaults)
    flags.DEFINE_string("dtype", None, "Compute dtype (float32 or bfloat16); default: the model's own.", flag_values=fv)
    flags.DEFINE_string("category", None, CATEGORY_HELP, flag_values=fv)
    flags.mark_flags_as_mutual_exclusive(["workdir", "package"], required=True, flag_values=fv)


def default_batch_size() -> int:
    """1 on CPU: a padded batch there costs its full size in compute, so batching gains
    nothing and a lone request would pay for the whole batch (docs/usage.md, measured)."""
    import jax

    return 1 if jax.default_backend() == "cpu" else Settings().batch_size


def main(fv: flags.FlagValues, args: Sequence[str]) -> None:
    require()
    from rdjax.deploy import predictor as inference

    batch_size = fv.batch_size or default_batch_size()
    settings = settings_of(fv, batch_size)
    sock = listen(fv.host, fv.port)
    warning = exposure_warning(sock.getsockname()[0], sock.getsockname()[1], settings.token)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    path = fv.workdir or fv.package
    model = inference.load(path, dtype=fv.dtype, category=fv.category)
    if model.calibration is None:
        print(f"warning: {path} has no calibration.json: answers carry no decisions", file=sys.stderr)
    warm_up(model, settings.batch_size)
    decides = f", thresholds of {model.decided_by}" if model.calibration is not None else ""
    print(f"rdjax serve: {path} (step {model.step}, batch size {batch_size}{decides}) at {url_of(sock)}/  "
          "(Ctrl-C stops)", flush=True)  # fmt: skip
    # uvicorn shuts down gracefully on Ctrl-C, then raises it again for the caller: done, not an error.
    with contextlib.suppress(KeyboardInterrupt):
        server(model, settings, log_level="warning").run(sockets=[sock])
    print("rdjax serve: stopped", flush=True)
