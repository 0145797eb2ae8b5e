"""The Batcher: the images of concurrent requests gathered into one predict call, run in
one worker thread so the event loop keeps accepting."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from rdjax.serve.codec import Scored, split
from rdjax.serve.limits import RequestError, error_reason

if TYPE_CHECKING:
    from rdjax.deploy.predictor import Prediction

log = logging.getLogger(__name__)


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
