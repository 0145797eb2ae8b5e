"""Devices and processes: the data-parallel mesh, placing each process's share of a global
batch, and mapping a function over inputs so that every row is seen exactly once.

Every process runs the same program on its own share (jax's multi-controller model);
nothing here knows about datasets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh() -> Mesh:
    """A 1-D data-parallel mesh over every device of every process."""
    return Mesh(np.array(jax.devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(tree: Any, sharding: NamedSharding) -> Any:
    """Host arrays (this process's share of the global batch) -> global device arrays."""
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def round_up(batch_size: int, devices: int) -> int:
    """The smallest multiple of ``devices`` that holds ``batch_size``: an evaluation batch
    must split evenly over the devices."""
    return -(-batch_size // devices) * devices


def local_share(global_rows: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch (every process holds the indices)."""
    return np.split(global_rows, jax.process_count())[jax.process_index()]


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order, with no gather."""
    parts: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        parts.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
    return np.concatenate([parts[k] for k in sorted(parts)])


def gather(x: jax.Array) -> np.ndarray:
    """A batch-sharded global array on every process (for per-image values, not maps)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def map_global_batches(
    fn: Callable[[Any], tuple], inputs: np.ndarray, batch_size: int, put: Callable[[Any], Any], desc: str
) -> list[np.ndarray]:
    """Apply ``fn`` to every row of ``inputs`` exactly once, in global batches sharded over
    all devices of all processes, and return the outputs gathered on every process.

    The last batch is padded (repeating its last row) and the padding dropped afterwards,
    so nothing is skipped; each process feeds only its own share of each batch.
    """
    from jax.experimental import multihost_utils
    from tqdm import tqdm

    n = len(inputs)
    outputs: list[list[np.ndarray]] = []
    for start in tqdm(
        range(0, n, batch_size), desc=desc, leave=False, disable=None if jax.process_index() == 0 else True
    ):
        batch = inputs[start : start + batch_size]
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
