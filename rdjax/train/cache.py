"""Images -> model inputs -> teacher features, and where training gets them from
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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rdjax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from rdjax.errors import ConfigError, WorkdirError
from rdjax.models import Model
from rdjax.modes import FeatureCache
from rdjax.pytrees import Features
from rdjax.runtime.workdir import write_text

AUTO_MEMORY_MAX_BYTES = 2**30


def to_unit(images: jax.Array) -> jax.Array:
    """Model inputs as their recipe (rdjax.data.preprocess.Recipe) gives them -> float32
    in [0, 1]: uint8 over 255, as ToTensor; float32 (OpenCV's recipe) as it is."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def normalize(images: jax.Array, imagenet: bool = True) -> jax.Array:
    """Model inputs (NHWC) -> float32 as ToTensor + Normalize(ImageNet mean, std); ToTensor
    alone with ``imagenet=False`` (the official MNIST/Fashion-MNIST helpers skip Normalize)."""
    return standardize(to_unit(images), imagenet)


def standardize(x: jax.Array, imagenet: bool = True) -> jax.Array:
    """[0, 1] float images -> the model's input (Normalize with ImageNet's mean and std)."""
    if not imagenet:
        return x
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


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
