"""The input pipeline: which rows each step uses, and decoding them batch by batch.

The epoch order is built from *lanes*. The training rows are dealt once, by the seed,
into ``batch_size`` lanes; every epoch each lane is shuffled on its own (a pure function
of seed, epoch and lane) and step k takes the k-th row of every lane. Column j of every
global batch therefore comes from lane j, and the process holding columns j is the only
one that ever needs those rows: each process decodes (and caches the teacher's
features of) only its own share, with no gather, for any number of processes. The
global batches themselves depend on the seed and the batch size only, not on the
device or process count, so results do not either (grain's per-process sharding is the
same idea with one lane per process, which would tie the order to the process count).

Decoding and resizing run in grain's reader threads (PIL releases the GIL), and a
background thread puts each batch on the devices ahead of the step.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np

from rdjax.data.preprocess import Split
from rdjax.errors import ConfigError

T = TypeVar("T")
U = TypeVar("U")

decoded: collections.Counter = collections.Counter()  # images decoded by this process, per split kind
_lock = threading.Lock()


def lanes(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """The training rows dealt into ``batch_size`` lanes, fixed for the whole run."""
    if n < batch_size:
        raise ConfigError(f"config.batch_size={batch_size} is larger than the {n} training images; lower it")
    order = np.random.default_rng([seed, 0xA11E]).permutation(n)
    return [np.sort(order[j::batch_size]) for j in range(batch_size)]


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    """ceil(N / B), the official DataLoader's epoch (drop_last=False): the last batch has
    the N mod B rows left over. ``drop_last``: full batches only, N // B."""
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, valid): (steps, batch_size) row indices of one epoch and float32 1/0 for the
    rows that count, a pure function of (seed, epoch), so a resumed run sees exactly the
    order an uninterrupted one would. Every row appears exactly once (``drop_last``: all
    but the N mod B rows left over).

    The last step of an epoch that keeps its partial batch takes the extra row of each of
    the first N mod B lanes; the other lanes' columns repeat a row of their own lane with
    valid 0, so every process still feeds its fixed columns of a full batch (and reads
    only its own rows), and the step is the same compiled program."""
    steps = steps_per_epoch(n, batch_size, drop_last)
    rows = np.empty((steps, batch_size), np.int64)
    valid = np.zeros((steps, batch_size), np.float32)
    for j, lane in enumerate(lanes(n, batch_size, seed)):
        order = np.random.default_rng([seed, epoch, j]).permutation(lane)[:steps]
        rows[:, j] = np.concatenate([order, order[: steps - len(order)]])
        valid[: len(order), j] = 1.0
    return rows, valid


def share(columns: int, process_index: int, process_count: int) -> slice:
    """The columns of a global batch that one process feeds (its devices' contiguous part)."""
    per = columns // process_count
    return slice(process_index * per, (process_index + 1) * per)


def owned_rows(n: int, batch_size: int, seed: int, process_index: int, process_count: int) -> np.ndarray:
    """Every training row this process will ever use: the rows of its lanes."""
    return np.concatenate(lanes(n, batch_size, seed)[share(batch_size, process_index, process_count)])


def _threads() -> int:
    return min(8, os.cpu_count() or 1)


def load_batches(split: Split, batches: Iterable[np.ndarray], kind: str, with_masks: bool = False) -> Iterator[dict]:
    """Decode the rows of each batch (this process's share) in grain's reader threads:
    {'image': the recipe's (b, S, S, 3) inputs} and, ``with_masks``, {'mask': bool (b, S, S)}. Every
    batch in ``batches`` must have the same length (pad the last one by repeating rows)."""
    import grain

    batches = [np.asarray(b) for b in batches]
    if not batches:
        return iter(())
    size = len(batches[0])

    def decode(row: int) -> dict:
        image, mask = split.example(int(row))
        with _lock:
            decoded[kind] += 1
        return {"image": image, "mask": mask} if with_masks else {"image": image}

    rows = np.concatenate(batches).tolist()
    dataset = grain.MapDataset.source(rows).map(decode).batch(size)
    # The elements are whole batches: one per reader thread in flight, so at most
    # threads * batch images are decoded ahead, whatever the dataset size.
    options = grain.ReadOptions(num_threads=_threads(), prefetch_buffer_size=_threads())
    return iter(dataset.to_iter_dataset(options))


def prefetch(iterable: Iterable[T], fn: Callable[[T], U], size: int = 2) -> Iterator[U]:
    """Apply ``fn`` (a gather or a device_put) in a background thread, ``size`` items ahead."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        queue: collections.deque = collections.deque()
        it = iter(iterable)
        for item in it:
            queue.append(pool.submit(fn, item))
            if len(queue) > size:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()
