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


def pad(x: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """``x`` padded along its first axis to ``size`` rows by repeating its last row (so
    one compiled program serves every batch), and how many rows are real."""
    valid = len(x)
    if valid == 0:
        raise ValueError("no rows to pad")
    return np.concatenate([x, np.repeat(x[-1:], size - valid, axis=0)]), valid


def global_batches(n: int, batch_size: int) -> list[tuple[np.ndarray, int]]:
    """The row indices of ``n`` rows in global batches of ``batch_size``, each padded, with
    its count of real rows: every row exactly once, in order."""
    return [pad(np.arange(s, min(s + batch_size, n)), batch_size) for s in range(0, n, batch_size)]


def map_global_batches(
    fn: Callable[[Any], tuple], inputs: np.ndarray, batch_size: int, put: Callable[[Any], Any], desc: str
) -> list[np.ndarray]:
    """Apply ``fn`` to every row of ``inputs`` exactly once, in global batches sharded over
    all devices of all processes, and return the outputs gathered on every process
    (each process places only its own share of each batch)."""
    from tqdm import tqdm

    outputs: list[list[np.ndarray]] = []
    batches = global_batches(len(inputs), batch_size)
    disable = None if jax.process_index() == 0 and len(batches) > 1 else True  # no bar for one batch (a server's)
    for rows, valid in tqdm(batches, desc=desc, leave=False, disable=disable):
        result = fn(put(local_share(inputs[rows])))
        gathered = [gather(r)[:valid] for r in result]
        outputs = outputs or [[] for _ in gathered]
        for k, g in enumerate(gathered):
            outputs[k].append(g)
    return [np.concatenate(parts) for parts in outputs]


def map_local(fn: Callable[[np.ndarray], Any], inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` over ``inputs`` in padded batches on this process alone (no collective):
    for work whose size differs between processes, such as each image's tiles."""
    out = []
    for start in range(0, len(inputs), batch_size):
        batch, valid = pad(inputs[start : start + batch_size], batch_size)
        out.append(np.asarray(fn(batch))[:valid])
    return np.concatenate(out)
