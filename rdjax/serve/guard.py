"""Who may call `rdjax serve`, and how many at once: the Host, Origin and bearer-token
checks in front of the application (Guard, an ASGI middleware), the warning printed when
the server is reachable from other machines, and the connection cap and header deadline
of its HTTP protocol."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from rdjax.serve.limits import TOKEN_ENV, RequestError

log = logging.getLogger(__name__)


def protocol(max_connections: int, header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with two limits it lacks: at most ``max_connections`` open
    at once (uvicorn's limit_concurrency only answers 503 to requests, so connections
    that never finish their headers pile up), and ``header_timeout_s`` for a request's
    headers to arrive, from the connection's start or the previous answer (uvicorn's
    keep-alive timeout stops at the first byte of the next request)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Guarded(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("refused a connection: %d are open (--max_connections)", max_connections)
                transport.close()
                return
            self._headers_due(None)

        def on_response_complete(self) -> None:
            answered = self.cycle
            super().on_response_complete()
            self._headers_due(answered)

        def _headers_due(self, cycle: object) -> None:
            """Close the connection unless a request after ``cycle`` has begun in time."""

            def expire() -> None:
                if self.cycle is cycle and not self.transport.is_closing():
                    self.transport.close()

            self.loop.call_later(header_timeout_s, expire)

    return Guarded


# ----------------------------------------------------------------------------- access

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback(address: str) -> bool:
    """Whether a bound address is reachable from this machine only."""
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def exposure_warning(address: str, port: int, token: str | None) -> str | None:
    """The warning printed at start when the server is reachable from other machines."""
    if is_loopback(address):
        return None
    where = f"rdjax serve listens on {address}:{port}, reachable from other machines over plain HTTP (no TLS)"
    if token:
        return f"warning: {where}: the token and the images cross the network unencrypted"
    return f"warning: {where} with no token: anyone who reaches it can use it; set {TOKEN_ENV} (or --token)"


def host_name(header: str) -> str | None:
    """The name in a Host header, lowercased, without its port (None if malformed)."""
    try:
        return urllib.parse.urlsplit("//" + header).hostname
    except ValueError:
        return None


class Guard:
    """ASGI middleware in front of the application.

    - Host must be an IP address, localhost or one of ``hosts``: a web page whose name
      an attacker re-points to this machine (DNS rebinding) sends its own name.
    - A request other than GET or HEAD from a browser page of another origin (Origin, or
      Sec-Fetch-Site without it) is refused unless its origin is in ``origins``, whose
      requests get CORS headers and preflight answers. Without this, any web page open on
      the line PC could post images (text/plain needs no preflight). Clients that are
      not browsers send neither header.
    - With a ``token``, every request but the page at / must carry
      ``Authorization: Bearer TOKEN`` (compared in constant time).
    """

    def __init__(self, app: ASGIApp, token: str | None, origins: frozenset[str], hosts: frozenset[str]) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.origins = origins
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            allowed = self.check(scope["method"], scope["path"], scope.get("scheme", "http"), headers)
        except RequestError as e:
            await self.refuse(e, scope, receive, send)
            return
        if allowed is None:
            await self.app(scope, receive, send)
            return
        cors = [(b"access-control-allow-origin", allowed.encode()), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS":  # a preflight of an allowed origin
            preflight = [
                (b"access-control-allow-methods", b"GET, POST"),
                (b"access-control-allow-headers", b"Authorization, Content-Type"),
                (b"access-control-max-age", b"600"),
            ]
            await send({"type": "http.response.start", "status": 204, "headers": cors + preflight})
            await send({"type": "http.response.body", "body": b""})
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *cors]
            await send(message)

        await self.app(scope, receive, with_cors)

    def check(self, method: str, path: str, scheme: str, headers: dict[str, str]) -> str | None:
        """A RequestError for a request to refuse; else the allowed foreign origin to send
        CORS headers to, or None."""
        host = headers.get("host")
        if host is None:  # HTTP/1.0 without one: not a browser, which always names the host
            host = ""
        elif (name := host_name(host)) is None or not (name == "localhost" or name in self.hosts or _is_ip(name)):
            raise RequestError(421, f"Host {host!r} is not this server's name; allow it with --allow_host")
        origin = headers.get("origin")
        foreign = None
        if origin is not None and origin.lower() != f"{scheme}://{host}".lower():
            foreign = origin
        elif origin is None and headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            foreign = "a page of another site"
        if foreign is not None and foreign not in self.origins:
            if method not in ("GET", "HEAD"):
                raise RequestError(403, f"cross-origin request from {foreign} refused; allow it with --allow_origin")
            foreign = None  # answered, but without CORS headers its page cannot read the answer
        if self.token is not None and path != "/" and method != "OPTIONS":
            given = headers.get("authorization", "")
            scheme_, _, value = given.partition(" ")
            if scheme_.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token):
                raise RequestError(401, "missing or wrong token: send the header 'Authorization: Bearer TOKEN'")
        return foreign

    @staticmethod
    async def refuse(error: RequestError, scope: Scope, receive: Receive, send: Send) -> None:
        from starlette.responses import JSONResponse

        headers = {**error.headers, **({"WWW-Authenticate": "Bearer"} if error.status == 401 else {})}
        await JSONResponse({"error": error.reason}, error.status, headers)(scope, receive, send)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
