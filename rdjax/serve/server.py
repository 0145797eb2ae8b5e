"""`rdjax serve --workdir=DIR`: an HTTP server that scores images one request at a time.

A production line sends each camera image as it comes; requests that arrive together
are batched into one Predictor.predict call (up to --batch_size, waiting at most
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
may take and who may call are bounded by rdjax.serve.limits and rdjax.serve.guard. Needs the optional stack:
pip install 'rdjax[serve]' (starlette, uvicorn, python-multipart).
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import flags

from rdjax.errors import ConfigError
from rdjax.modes import CATEGORY_HELP
from rdjax.serve.app import create_app
from rdjax.serve.guard import exposure_warning, protocol
from rdjax.serve.limits import MAX_HEADER_BYTES, Settings, settings_of
from rdjax.serve.limits import define_flags as define_limit_flags

if TYPE_CHECKING:
    import uvicorn

    from rdjax.deploy.predictor import Predictor

# The import name of each package of the extra, and what pip calls it.
REQUIRED = {"starlette": "starlette", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}


def require() -> None:
    """The server stack is an optional extra: say how to install it, in one line."""
    missing = [pip for module, pip in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"rdjax serve needs {', '.join(missing)}: pip install 'rdjax[serve]'")


# ----------------------------------------------------------------------------- running it


def warm_up(model: Predictor, batch_size: int) -> None:
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


def server(model: Predictor, settings: Settings, **options: Any) -> uvicorn.Server:
    """A uvicorn server of ``model`` with the connection limits of ``settings``: h11
    (the parser whose limits are set here), its header size, the idle keep-alive
    timeout, and rdjax.serve.guard.protocol's connection cap and header deadline."""
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
def running(
    model: Predictor, host: str = "127.0.0.1", port: int = 0, settings: Settings | None = None
) -> Iterator[str]:
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
    from rdjax.deploy import predictor

    batch_size = fv.batch_size or default_batch_size()
    settings = settings_of(fv, batch_size)
    sock = listen(fv.host, fv.port)
    warning = exposure_warning(sock.getsockname()[0], sock.getsockname()[1], settings.token)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    path = fv.workdir or fv.package
    model = predictor.load(path, dtype=fv.dtype, category=fv.category)
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
