"""Batching: deterministic order, placement on the device mesh, prefetching."""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Iterable, Iterator, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

T = TypeVar("T")


def make_mesh() -> Mesh:
    """A 1-D data-parallel mesh over every device of every process."""
    return Mesh(np.array(jax.devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(tree, sharding: NamedSharding):
    """Host arrays (this process's share of the global batch) -> global device arrays."""
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


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


def local_share(global_rows: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch (every process holds the indices)."""
    return np.split(global_rows, jax.process_count())[jax.process_index()]


def map_global_batches(fn, inputs: np.ndarray, batch_size: int, put, desc: str) -> list[np.ndarray]:
    """Apply ``fn`` to every row of ``inputs`` exactly once, in global batches sharded over
    all devices of all processes, and return the outputs gathered on every process.

    The last batch is padded (repeating its last row) and the padding dropped afterwards,
    so nothing is skipped; each process feeds only its own share of each batch.
    """
    from jax.experimental import multihost_utils
    from tqdm import tqdm

    n = len(inputs)
    outputs: list[list[np.ndarray]] = []
    for start in tqdm(range(0, n, batch_size), desc=desc, leave=False, disable=None if jax.process_index() == 0 else True):
        batch = inputs[start:start + batch_size]
        valid = len(batch)
        if valid < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - valid, axis=0)])
        result = fn(put(local_share(batch)))
        gathered = [np.asarray(multihost_utils.process_allgather(r, tiled=True))[:valid] for r in result]
        if not outputs:
            outputs = [[] for _ in gathered]
        for k, g in enumerate(gathered):
            outputs[k].append(g)
    return [np.concatenate(parts) for parts in outputs]
