"""The teacher's features of the training images, and where training gets them from
(config.feature_cache):

  memory  this process's share of the training images' features, computed once, in host
          memory in the compute dtype (bfloat16 halves it);
  disk    the same share written once to .npy files and read back row by row with
          pread, so host memory stays flat (the page cache is the kernel's to evict);
  off     no cache: the teacher runs in every step (what augmentation and RD++ need);
  auto    memory for a share of at most AUTO_MEMORY_MAX_BYTES (1 GiB) that fits in half the
          available memory; beyond that disk if the disk has room, since through the page
          cache it trains as fast as memory (docs/scaling.md) while leaving the process's
          own memory flat and the kernel free to evict it; else memory if it fits in half
          the available memory, else off. The choice is logged with its figures.

With no augmentation (the paper's protocol) the frozen teacher's features are identical
in every epoch, so memory and disk train the same weights as off.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from rdjax.data import pipeline
from rdjax.data.normalize import standardize, to_unit
from rdjax.errors import ConfigError, WorkdirError
from rdjax.models import Model
from rdjax.modes import FeatureCache
from rdjax.pytrees import Features
from rdjax.runtime import sharding
from rdjax.runtime.disk import write_text
from rdjax.train.log import label, log

if TYPE_CHECKING:
    from rdjax.train.prepare import Run

AUTO_MEMORY_MAX_BYTES = 2**30


def teacher_fn(model: Model, imagenet_normalize: bool) -> Callable[[Any, jax.Array], Features]:
    """(teacher_vars, model inputs) -> what the feature cache stores: the model's own
    `train_inputs` (a model that trains from a cache draws nothing from the key), so
    cached and fresh training feed the loss the same arrays."""
    scale = functools.partial(standardize, imagenet=imagenet_normalize)
    key = jax.random.key(0)

    def features(teacher_vars: Any, images: jax.Array) -> Features:
        return tuple(model.train_inputs(teacher_vars, to_unit(images), key, scale))

    return features


def feature_shapes(model: Model, image_size: int) -> list[jax.ShapeDtypeStruct]:
    """Per-image shapes of the teacher's features, without computing them."""
    out = jax.eval_shape(
        lambda v, x: teacher_fn(model, True)(v, x),
        model.abstract_variables()[0],
        jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8),
    )
    return [jax.ShapeDtypeStruct(o.shape[1:], o.dtype) for o in out]


def bytes_per_image(shapes: list[jax.ShapeDtypeStruct]) -> int:
    return int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in shapes))


# ----------------------------------------------------------------------------- choosing the mode


def available_memory() -> int:
    """Bytes this process may still allocate: MemAvailable, capped by a cgroup limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                avail = min(avail, int(limit) - int(Path(usage_file).read_text()))
        except (OSError, ValueError):
            continue
    return max(avail, 0)


def _free_disk(directory: Path) -> int:
    directory = directory.expanduser().resolve()
    while not directory.exists():
        directory = directory.parent
    return shutil.disk_usage(directory).free


def choose_mode(requested: str, need: int, directory: Path) -> tuple[str, str]:
    """(mode, the reason with its figures). Fails with a one-line ConfigError when the
    requested mode can be foreseen not to fit."""
    memory, disk = available_memory(), _free_disk(directory)
    figures = (
        f"features {need / 2**30:.2f} GiB, available memory {memory / 2**30:.1f} GiB, free disk {disk / 2**30:.1f} GiB"
    )
    if requested == FeatureCache.MEMORY and need > memory:
        raise ConfigError(f"config.feature_cache='memory' does not fit ({figures}); use 'disk', 'off' or 'auto'")
    if requested == FeatureCache.DISK and need > disk:
        raise ConfigError(
            f"config.feature_cache='disk' does not fit in {directory} ({figures}); "
            f"set config.feature_cache_dir, or use 'off'"
        )
    if requested != FeatureCache.AUTO:
        return requested, figures
    if need <= min(AUTO_MEMORY_MAX_BYTES, memory // 2):
        return FeatureCache.MEMORY.value, figures
    if need <= disk * 0.8:
        return FeatureCache.DISK.value, figures
    if need <= memory // 2:
        return FeatureCache.MEMORY.value, figures
    return FeatureCache.OFF.value, figures


# ----------------------------------------------------------------------------- stores


class MemoryStore:
    """Preallocated host arrays, one per scale, (rows, h, w, c)."""

    def __init__(self, shapes: list[jax.ShapeDtypeStruct], rows: int):
        self.arrays = [np.empty((rows, *s.shape), s.dtype) for s in shapes]

    def write(self, start: int, feats: list[np.ndarray]) -> None:
        for a, f in zip(self.arrays, feats):
            a[start : start + len(f)] = f

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(a[rows] for a in self.arrays)

    def close(self, delete: bool) -> None:
        self.arrays = []


class DiskStore:
    """One preallocated .npy file per scale, written and read by row offsets (pwrite and
    pread), so neither a second copy nor a memory map holds the cache in this process.

    ``meta`` identifies what the files hold; files with other metadata or an unfinished
    fill are rewritten, so a resumed run reuses them and a changed run never does."""

    def __init__(self, directory: Path, shapes: list[jax.ShapeDtypeStruct], rows: int, meta: dict):
        self.directory = directory
        self.shapes = shapes
        self.meta = dict(meta, rows=rows, shapes=[[list(s.shape), np.dtype(s.dtype).name] for s in shapes])
        self.files: list[Any] = []
        self.offsets: list[int] = []
        self.row_bytes: list[int] = []
        try:
            self.complete = self._read_meta() == self.meta
            directory.mkdir(parents=True, exist_ok=True)
            self._open(shapes, rows)
        except OSError as e:
            self.close(delete=False)
            raise WorkdirError(
                f"{directory}: cannot keep the feature cache there ({e.strerror or e}); "
                f"set config.feature_cache_dir, or use config.feature_cache='memory' or 'off'"
            ) from None

    def _read_meta(self) -> dict | None:
        try:
            return json.loads(self._meta_path.read_text())
        except (OSError, ValueError):
            return None  # absent or unreadable: the cache is refilled

    def _open(self, shapes: list[jax.ShapeDtypeStruct], rows: int) -> None:
        directory = self.directory
        for k, s in enumerate(shapes):
            path = directory / f"scale{k}.npy"
            dtype = np.dtype(s.dtype)
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, *s.shape)}
            if not self.complete:
                self._meta_path.unlink(missing_ok=True)
                with open(path, "wb") as fh:
                    np.lib.format.write_array_header_1_0(fh, header)
                    offset = fh.tell()
                    fh.truncate(offset + rows * int(np.prod(s.shape)) * dtype.itemsize)
            fd = os.open(path, os.O_RDWR)
            with open(path, "rb") as fh:
                np.lib.format.read_magic(fh)
                np.lib.format.read_array_header_1_0(fh)
                offset = fh.tell()
            self.files.append(fd)
            self.offsets.append(offset)
            self.row_bytes.append(int(np.prod(s.shape)) * dtype.itemsize)

    @property
    def _meta_path(self) -> Path:
        return self.directory / "complete.json"

    def write(self, start: int, feats: list[np.ndarray]) -> None:
        try:
            for fd, off, nb, f in zip(self.files, self.offsets, self.row_bytes, feats):
                os.pwrite(fd, np.ascontiguousarray(f).tobytes(), off + start * nb)
        except OSError as e:
            raise WorkdirError(
                f"{self.directory}: cannot write the feature cache ({e.strerror or e}); "
                f"set config.feature_cache_dir, or use config.feature_cache='memory' or 'off'"
            ) from None

    def invalidate(self) -> None:
        """Forget a complete cache (another process must refill its own, so all refill)."""
        self._meta_path.unlink(missing_ok=True)
        self.complete = False

    def finish(self) -> None:
        for fd in self.files:
            os.fsync(fd)
        write_text(self._meta_path, json.dumps(self.meta))  # atomic: a kill never leaves half a marker
        self.complete = True

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        out = []
        for fd, off, nb, s in zip(self.files, self.offsets, self.row_bytes, self.shapes):
            buf = np.empty((len(rows), *s.shape), s.dtype)
            view = buf.reshape(len(rows), -1).view(np.uint8)
            for i, r in enumerate(rows):
                if os.preadv(fd, [view[i]], off + int(r) * nb) != nb:
                    raise WorkdirError(f"{self.directory}: the feature cache is truncated; delete it to refill it")
            out.append(buf)
        return tuple(out)

    def close(self, delete: bool) -> None:
        for fd in self.files:
            os.close(fd)
        self.files = []
        if delete:
            shutil.rmtree(self.directory, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.directory.parent.rmdir()  # the cache folder, once no process has files there


def fill(
    store: Any,
    rows: int,
    local_batch: int,
    steps: int,
    batches: Iterator[dict],
    compute: Callable[[np.ndarray], list[np.ndarray]],
) -> None:
    """Run ``compute`` (this process's images -> its features; a global computation, so
    every process runs all ``steps``) over the decoded batches and write this process's
    ``rows`` (padding dropped) into the store in order."""
    from tqdm import tqdm

    for step, batch in enumerate(
        tqdm(
            batches,
            total=steps,
            desc="teacher features",
            leave=False,
            disable=None if jax.process_index() == 0 else True,
        )
    ):
        start = step * local_batch
        valid = max(min(local_batch, rows - start), 0)
        feats = compute(batch["image"])
        if valid:
            store.write(start, [f[:valid] for f in feats])


# ----------------------------------------------------------------------------- a run's cache


def feature_mode(config: Any, model: Model, workdir: Path, rows: int) -> tuple[str, Path]:
    """config.feature_cache resolved for this process's share of ``rows`` training rows,
    then agreed on by all processes: the most frugal choice of any process wins, since
    'off' compiles a different step. Returns (mode, the folder 'disk' uses). A model
    whose every step needs the images (RD++'s noised branch) trains with 'off'."""
    if model.needs_images:
        if config.feature_cache not in (FeatureCache.AUTO, FeatureCache.OFF):
            raise ConfigError(
                f"config.feature_cache={config.feature_cache!r}: model {config.model.name!r} runs the "
                "teacher on new noised images in every step; use 'auto' or 'off'"
            )
        log("feature cache: off (model %s needs the images in every step)", config.model.name)
        return FeatureCache.OFF.value, workdir / "feature_cache"
    p, count = jax.process_index(), jax.process_count()
    owned = len(pipeline.owned_rows(rows, config.batch_size, config.seed, p, count))
    folder = (
        Path(config.feature_cache_dir).expanduser() / label(config)
        if config.feature_cache_dir
        else (workdir / "feature_cache")
    )
    directory = folder / f"process_{p}_of_{count}"
    need = bytes_per_image(feature_shapes(model, config.image_size)) * owned
    mode, figures = choose_mode(config.feature_cache, need, directory)
    if count > 1:
        from jax.experimental import multihost_utils

        order = [m.value for m in (FeatureCache.MEMORY, FeatureCache.DISK, FeatureCache.OFF)]
        mode = order[int(np.max(multihost_utils.process_allgather(np.int32(order.index(mode)))))]
    log(
        "feature cache: %s (%s%s)",
        mode,
        figures,
        ", requested 'auto'" if config.feature_cache == FeatureCache.AUTO else "",
    )
    return mode, directory


def _cache_identity(run: Run) -> dict:
    """What the cached features are a function of: a disk cache with other values (another
    dataset, teacher file, size, order) is never reused."""
    config = run.config
    weights = Path(config.model.teacher_weights).expanduser()
    stamp = [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.is_file() else None
    return {
        "model": config.model.to_dict(),
        "teacher_file": stamp,
        "dataset": config.dataset.to_dict(),
        "image_size": config.image_size,
        "input": config.input.to_dict(),  # the recipe that made the images the teacher saw
        "dtype": config.dtype,
        "imagenet_normalize": config.imagenet_normalize,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "validation_size": config.threshold.validation_size,
        "train_rows": len(run.train),
        "train_files": list(run.train.filenames)[:1] + list(run.train.filenames)[-1:],
    }


def cached_features(run: Run, owned: np.ndarray, mode: str, directory: Path) -> Any:
    """This process's share of the training images' teacher features, in a store
    (MemoryStore or DiskStore), computed once (a complete disk cache of the same
    run is reused, e.g. on resume)."""
    config, model = run.config, run.model
    shapes = feature_shapes(model, config.image_size)
    store: MemoryStore | DiskStore
    if mode == FeatureCache.MEMORY:
        store = MemoryStore(shapes, len(owned))
    else:
        store = DiskStore(directory, shapes, len(owned), _cache_identity(run))
        complete = store.complete
        if jax.process_count() > 1:  # reuse only if every process can: the fill is a collective
            from jax.experimental import multihost_utils

            complete = bool(np.min(multihost_utils.process_allgather(np.int32(complete))))
            if not complete:
                store.invalidate()
        if complete:
            log("feature cache: reusing %s", directory)
            return store
    local_batch = run.eval_batch // jax.process_count()
    most = max(
        len(pipeline.owned_rows(len(run.train), config.batch_size, config.seed, q, jax.process_count()))
        for q in range(jax.process_count())
    )
    steps = -(-most // local_batch)
    chunks = [owned[i * local_batch : (i + 1) * local_batch] for i in range(steps)]
    batches = [sharding.pad(c if len(c) else owned[-1:], local_batch)[0] for c in chunks]
    teacher = jax.jit(teacher_fn(model, config.imagenet_normalize))

    def compute(images: np.ndarray) -> list[np.ndarray]:
        return [sharding.local_rows(f) for f in teacher(run.teacher_vars, run.put(images))]

    fill(store, len(owned), local_batch, steps, pipeline.load_batches(run.train, batches, "train"), compute)
    if isinstance(store, DiskStore):
        store.finish()
    return store
