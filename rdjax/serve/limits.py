"""What `rdjax serve` refuses, so that no client can exhaust its memory: its Settings and
their flags, the memory budget requests are admitted against, and reading a request's
body and its image's header. The connection cap, the header deadline and the access
checks (Host, Origin, bearer token) are rdjax.serve.guard's.

Memory: each request leases from one budget (--max_memory) what it will hold at its peak
before it holds it: its body's bytes as they arrive, then, from the image's header and
before a pixel is decoded, ``width x height x bytes_per_pixel(mode)``. A request that
does not fit in what is left is answered 503 with Retry-After at once (it never waits,
so a small request is admitted whenever the budget has room for it, whatever large ones
came first); one that could never fit is 413. The lease ends when the answer is built.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import threading
from typing import TYPE_CHECKING

import numpy as np
from absl import flags

from rdjax.data.preprocess import FORMATS  # the one list of formats rdjax decodes, on every path
from rdjax.errors import ConfigError, one_line

if TYPE_CHECKING:
    from starlette.requests import Request

log = logging.getLogger(__name__)

MiB = 2**20
# Bytes one request holds per pixel at its peak, measured by experiments/serve_memory.py
# (docs/usage.md: 15.5 for RGB, 27.0 for 16-bit), with a margin. 8-bit images: while
# Predictor.predict resizes the map back to the image, the decoded image (3 B/px) and PIL's
# float map with its numpy copy (4 + 4 + 4 B/px while tobytes joins) are alive together,
# and decoding alone peaks at PIL's 4 B/px RGB buffer plus the 3 B/px array it becomes
# (twice while joined).
BYTES_PER_PIXEL = 20
# 16- and 32-bit grayscale (PNG, TIFF) is scaled to 8 bits through float64
# (rdjax.data.preprocess.to_rgb): the 8 B/px array and two 8 B/px temporaries on top.
WIDE_BYTES_PER_PIXEL = 36
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I")
RETRY_AFTER_S = 1  # what a 503 tells the client to wait: about one large image's time
TOKEN_ENV = "RDJAX_SERVE_TOKEN"
MAX_HEADER_BYTES = 16 * 2**10  # h11's default, set explicitly: larger request headers are a 400


class RequestError(Exception):
    """A request answered with ``status`` and a one-line JSON reason (503: with Retry-After)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = " ".join(reason.split())

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else {}


def default_max_memory() -> int:
    """A quarter of the machine's memory, at most 2 GiB: the model, the OS and whatever
    else runs on a line PC keep the rest, and 2 GiB admits the largest default image
    (50 Mpx x BYTES_PER_PIXEL = 1 GB) with room for small ones beside it."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: the fixed cap
        return 2 * 2**30
    return min(2 * 2**30, total // 4)


def bytes_per_pixel(mode: str) -> int:
    """What a request holds per pixel of an image of PIL ``mode``, at its peak."""
    return WIDE_BYTES_PER_PIXEL if mode in WIDE_MODES else BYTES_PER_PIXEL


def mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def pillow_limit() -> int | None:
    """The most pixels Pillow opens: beyond it Image.open raises DecompressionBombError
    before the size can be read (None where it is switched off)."""
    from PIL import Image

    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


@dataclasses.dataclass(frozen=True)
class Settings:
    """How requests are batched, what a request may hold, and who may call."""

    batch_size: int = 8  # images per Predictor.predict call; every call is padded to it
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_bytes: int = 64 * 2**20  # largest request body
    max_pixels: int = 50_000_000  # largest image (width x height), checked from its header before decoding
    max_queue: int = 64  # images waiting for the model beyond this are refused with 503 (a bound on latency)
    max_memory: int = dataclasses.field(default_factory=default_max_memory)  # what admitted requests hold together
    max_connections: int = 64  # open connections beyond this are closed at once
    header_timeout_s: float = 10.0  # for a request's headers to arrive
    body_timeout_s: float = 60.0  # for a request's whole body to arrive
    keep_alive_s: int = 5  # an idle connection is closed after it
    token: str | None = dataclasses.field(default=None, repr=False)  # required as 'Authorization: Bearer TOKEN'
    allow_origins: tuple[str, ...] = ()  # browser origins other than the server's own that may post
    allow_hosts: tuple[str, ...] = ()  # Host names besides IP addresses, localhost and this machine's name

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_bytes", "max_pixels", "max_queue", "max_connections", "keep_alive_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve: {name} must be at least 1, got {getattr(self, name)}")
        if not self.max_wait_ms >= 0:
            raise ConfigError(f"serve: max_wait_ms must be at least 0, got {self.max_wait_ms}")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"serve: {name} must be more than 0, got {getattr(self, name)}")
        if self.max_queue < self.batch_size:
            raise ConfigError(f"serve: max_queue ({self.max_queue}) must hold a batch ({self.batch_size})")
        if self.max_memory <= self.max_bytes:
            raise ConfigError(
                f"serve: max_memory ({self.max_memory}) must be more than max_bytes ({self.max_bytes}): "
                "a request's body is held in memory"
            )
        limit = pillow_limit()
        if limit is not None and self.max_pixels > limit:
            raise ConfigError(f"serve: max_pixels must be at most {limit} (Pillow's own limit), got {self.max_pixels}")


class Budget:
    """The bytes all admitted requests may hold together; thread-safe."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._lock = threading.Lock()

    def lease(self) -> Lease:
        return Lease(self)


class Lease:
    """One request's share of a Budget, grown before each allocation it covers and
    returned whole when the request is done (a context manager)."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.held = 0

    def grow(self, n: int, what: str) -> None:
        """Take ``n`` more bytes for ``what``, or a RequestError: 413 if this request
        alone would exceed the budget, else 503 if the others leave too little."""
        budget = self.budget
        with budget._lock:
            if self.held + n > budget.total:
                raise RequestError(
                    413, f"{what} needs {mib(self.held + n)} of memory, more than --max_memory={mib(budget.total)}"
                )
            if budget.used + n > budget.total:
                raise RequestError(
                    503, f"busy: {what} needs {mib(n)} of memory and {mib(budget.total - budget.used)} of "
                    f"--max_memory={mib(budget.total)} is free; try again",
                )  # fmt: skip
            budget.used += n
            self.held += n

    def release(self) -> None:
        with self.budget._lock:
            self.budget.used -= self.held
            self.held = 0

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----------------------------------------------------------------------------- a request's body and image


def error_reason(error: BaseException) -> str:
    """PIL's message without the object reprs it embeds (``<_io.BytesIO object at 0x...>``)."""
    text = re.sub(r"\s*<[^>]*>", "", one_line(error))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@dataclasses.dataclass(frozen=True)
class Header:
    """What an image file's header says, read before any pixel is decoded."""

    width: int
    height: int
    mode: str  # PIL's: it decides the memory decoding takes (limits.bytes_per_pixel)

    @property
    def memory(self) -> int:
        """The bytes a request for this image holds at its peak."""
        return self.width * self.height * bytes_per_pixel(self.mode)


def probe(data: bytes, max_pixels: int) -> Header:
    """The header of a request body's image, or a RequestError: an image that is not of
    FORMATS, damaged where its chunks' checksums see it, or larger than ``max_pixels``
    is refused before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError(400, "empty body: send the image file's bytes")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            header = Header(img.size[0], img.size[1], img.mode)
            img.verify()  # PNG: every chunk's CRC, so a truncated file fails here
    except Image.DecompressionBombError:  # more than Pillow's limit, which Settings keeps above max_pixels
        raise RequestError(413, f"image has more than --max_pixels={max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise RequestError(400, f"not a readable image: not a {', '.join(FORMATS)} file") from None
    except Exception as e:
        raise RequestError(400, f"not a readable image ({error_reason(e)})") from None
    if header.width * header.height > max_pixels:
        raise RequestError(413, f"image is {header.width}x{header.height}, more than --max_pixels={max_pixels} pixels")
    return header


def decode(data: bytes) -> np.ndarray:
    """A `probe`d request body -> uint8 (H, W, 3), or a RequestError."""
    from PIL import Image

    from rdjax.data.preprocess import to_rgb

    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            return np.asarray(to_rgb(img), np.uint8)
    except Exception as e:  # damage verify() cannot see, e.g. inside a JPEG's entropy-coded data
        raise RequestError(400, f"not a readable image ({error_reason(e)})") from None


async def read_body(request: Request, settings: Settings, lease: Lease) -> bytes:
    """The body: refused with 413 past --max_bytes (by Content-Length before reading),
    leased from the memory budget as it arrives, and 408 unless all of it has come
    within --body_timeout_s (a stalled client holds nothing longer)."""
    import anyio
    from starlette.requests import ClientDisconnect

    limit = settings.max_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RequestError(413, f"body is {int(length)} bytes, more than --max_bytes={limit}")
    chunks, size = [], 0
    try:
        with anyio.fail_after(settings.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, f"body is more than --max_bytes={limit} bytes")
                lease.grow(len(chunk), "the body")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(
            408, f"the body did not arrive within --body_timeout_s={settings.body_timeout_s:g} seconds"
        ) from None
    except ClientDisconnect:  # a camera gone mid-upload: nobody to answer, nothing to log
        raise RequestError(400, "the client disconnected before sending the whole body") from None
    return b"".join(chunks)  # its chunks and their join coexist for a moment: within BYTES_PER_PIXEL's margin


async def image_bytes(request: Request, settings: Settings, lease: Lease) -> bytes:
    """The image file: the whole body, or a multipart form's field ``image``."""
    from python_multipart.multipart import parse_options_header
    from starlette.datastructures import UploadFile
    from starlette.requests import Request as StarletteRequest

    body = await read_body(request, settings, lease)
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind.lower() != b"multipart/form-data":
        return body
    boundary = options.get(b"boundary")
    if boundary and b"--" + boundary + b"--" not in body:  # the parser would drop the unfinished part unsaid
        raise RequestError(400, "incomplete multipart form: the body ends before its closing boundary")

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    limit = settings.max_bytes
    async with StarletteRequest(request.scope, replay).form(max_files=1, max_fields=16, max_part_size=limit) as form:
        field = form.get("image")
        if not isinstance(field, UploadFile):
            raise RequestError(400, "multipart form without a file field 'image'")
        lease.grow(field.size or 0, "the form's image")
        return await field.read()


# ----------------------------------------------------------------------------- flags


def define_flags(fv: flags.FlagValues, defaults: Settings) -> None:
    """The flags of the limits beyond a request's size (rdjax.serve.server.define_flags has those)."""
    flags.DEFINE_integer(
        "max_memory",
        None,
        "Bytes that the requests being served may hold together, counted before each is decoded (its body, "
        f"then width x height x {BYTES_PER_PIXEL}, or x {WIDE_BYTES_PER_PIXEL} for 16/32-bit images); a request "
        "that does not fit now is refused "
        "with 503 and Retry-After, one that never can with 413. Default: a quarter of this machine's memory, "
        f"at most 2 GiB (here {mib(defaults.max_memory)}).",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "max_connections",
        defaults.max_connections,
        "Open connections beyond which a new one is closed at once.",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_float(
        "header_timeout_s",
        defaults.header_timeout_s,
        f"Seconds for a request's headers (at most {MAX_HEADER_BYTES // 1024} KiB) to arrive; then the "
        "connection is closed.",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_float(
        "body_timeout_s",
        defaults.body_timeout_s,
        "Seconds for a request's whole body to arrive; then it is refused with 408.",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "keep_alive_s", defaults.keep_alive_s, "Seconds an idle connection stays open.", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_string(
        "token",
        None,
        f"Require 'Authorization: Bearer TOKEN' on every request but the page at / (which takes it as "
        f"/#token=TOKEN). Prefer the environment variable {TOKEN_ENV}: a flag shows in the process list.",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "allow_origin",
        [],
        "Browser origins (scheme://host:port) besides the server's own whose pages may post to it.",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "allow_host",
        [],
        "Names the server may be called by besides IP addresses, localhost and this machine's name (the Host "
        "header is checked against DNS rebinding).",
        flag_values=fv,
    )


def settings_of(fv: flags.FlagValues, batch_size: int) -> Settings:
    """The Settings the flags ask for (the token: --token, else $RDJAX_SERVE_TOKEN)."""
    return Settings(
        batch_size=batch_size,
        max_wait_ms=fv.max_wait_ms,
        max_bytes=fv.max_bytes,
        max_pixels=fv.max_pixels,
        max_queue=fv.max_queue,
        max_memory=default_max_memory() if fv.max_memory is None else fv.max_memory,
        max_connections=fv.max_connections,
        header_timeout_s=fv.header_timeout_s,
        body_timeout_s=fv.body_timeout_s,
        keep_alive_s=fv.keep_alive_s,
        token=fv.token or os.environ.get(TOKEN_ENV) or None,
        allow_origins=tuple(fv.allow_origin),
        allow_hosts=tuple(fv.allow_host),
    )
