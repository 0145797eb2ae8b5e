"""Batching on the host: a deterministic order per epoch, and prefetching."""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, multiple_of: int = 1) -> list[np.ndarray]:
    """Index batches for one epoch, a pure function of (seed, epoch): a resumed run sees
    exactly the order an uninterrupted one would.

    Like the official DataLoader (shuffle=True, drop_last=False) the last batch may be
    smaller; it is trimmed to a multiple of ``multiple_of`` (the device count) so that it
    shards evenly, and dropped if that leaves nothing.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n)
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    last = batches[-1]
    keep = len(last) - len(last) % multiple_of
    batches[-1] = last[:keep]
    return [b for b in batches if len(b)]


def prefetch(iterable: Iterable[T], fn: Callable[[T], object], size: int = 2) -> Iterator[object]:
    """Apply ``fn`` (gather + device_put) in a background thread, ``size`` items ahead."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        queue: collections.deque = collections.deque()
        it = iter(iterable)
        for item in it:
            queue.append(pool.submit(fn, item))
            if len(queue) > size:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()
