"""The ASGI application of `rdjax serve`: ``POST /predict``, ``GET /health`` and the page at
``GET /`` (rdjax/serve/page.html), behind rdjax.serve.guard.Guard. The routes share one
Service: the model, the settings, the Batcher and the memory budget requests lease from.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from rdjax.serve.batcher import Batcher
from rdjax.serve.codec import answer, choose, query_switch
from rdjax.serve.guard import ASGIApp, Guard
from rdjax.serve.limits import Budget, Header, RequestError, Settings, decode, error_reason, image_bytes, probe

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from rdjax.deploy.predictor import Prediction, Predictor

# A self-contained page to try an image by hand; a package file, so it can be linted as one.
PAGE = importlib.resources.files("rdjax.serve").joinpath("page.html").read_text(encoding="utf-8")


class Service:
    """What the routes share: the model, the settings, the Batcher and the memory budget."""

    def __init__(self, model: Predictor, settings: Settings) -> None:
        import anyio

        self.model = model
        self.settings = settings
        self.batcher = Batcher(
            self.predict_batch,
            settings.batch_size,
            settings.max_wait_ms / 1000,
            settings.max_queue,
        )
        # What requests hold is bounded by the budget they lease from, not by the queue or by
        # these threads: admitted images may wait for the model, decoded, however many there are.
        self.budget = Budget(settings.max_memory)
        self.workers = anyio.CapacityLimiter(os.cpu_count() or 1)

    def predict_batch(self, images: list[np.ndarray], route: bool) -> Prediction:
        from rdjax.deploy.predictor import AUTO, GLOBAL

        category = AUTO if route else (GLOBAL if self.model.categories else None)
        return self.model.predict(images, batch_size=self.settings.batch_size, category=category)

    async def in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        import anyio

        return await anyio.to_thread.run_sync(fn, *args, limiter=self.workers)

    async def predict(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        from rdjax.deploy.predictor import AUTO

        settings = self.settings
        with_map = query_switch(request.query_params.get("map"), "map")
        category = choose(self.model, request.query_params.get("category"))
        with self.budget.lease() as lease:
            data = await image_bytes(request, settings, lease)
            header: Header = await self.in_thread(probe, data, settings.max_pixels)
            lease.grow(header.memory, f"a {header.width}x{header.height} {header.mode} image")
            # Decoded only now, and named nowhere here: the batcher drops it with its batch.
            scored = await self.batcher.submit(await self.in_thread(decode, data), route=category == AUTO)
            return JSONResponse(await self.in_thread(answer, self.model, scored, with_map, category))

    async def health(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        model, settings, batcher = self.model, self.settings, self.batcher
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
                "memory_in_use": self.budget.used,
                "waiting": batcher.waiting,
                "batches": batcher.batches,
                "images": batcher.images,
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """The batcher starts and stops with the application."""
        self.batcher.start()
        try:
            yield
        finally:
            await self.batcher.stop()


async def page(request: Request) -> Response:
    from starlette.responses import HTMLResponse

    return HTMLResponse(PAGE)


async def refused(request: Request, error: Exception) -> Response:
    from starlette.responses import JSONResponse

    assert isinstance(error, RequestError)
    return JSONResponse({"error": error.reason}, error.status, error.headers)


async def http_error(request: Request, error: Exception) -> Response:
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    assert isinstance(error, HTTPException)
    return JSONResponse({"error": " ".join(str(error.detail).split())}, error.status_code, error.headers)


async def internal_error(request: Request, error: Exception) -> Response:  # uvicorn logs the traceback too
    from starlette.responses import JSONResponse

    return JSONResponse({"error": f"internal error ({error_reason(error)})"}, 500)


def create_app(model: Predictor, settings: Settings | None = None) -> ASGIApp:
    """The ASGI application behind its access checks (rdjax.serve.guard.Guard); the batcher
    starts and stops with it (its lifespan). ``settings`` None: the defaults."""
    settings = settings or Settings()
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    service = Service(model, settings)
    app = Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/health", service.health, methods=["GET"]),
            Route("/predict", service.predict, methods=["POST"]),
        ],
        exception_handlers={RequestError: refused, HTTPException: http_error, Exception: internal_error},
        lifespan=service.lifespan,
    )
    hosts = frozenset(h.lower() for h in (*settings.allow_hosts, socket.gethostname()))
    return Guard(app, settings.token, frozenset(settings.allow_origins), hosts)
