"""Features -> anomaly maps, on the device (inside jit), and the jitted evaluation step.

The map follows the official test.py: per scale 1 - cos(teacher, student) over channels,
bilinear upsampling with align_corners=True to the input size, sum (or product) over
scales, then scipy.ndimage.gaussian_filter(sigma=4) with scipy's defaults (truncate 4.0,
mode 'reflect'). Upsampling and blur are linear and separable, so each is two small
matmuls with exact interpolation / reflect-boundary matrices, at HIGHEST precision
(no TF32 on GPUs).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rdjax.features import Features, normalize
from rdjax.sharding import map_global_batches

Variables = dict[str, Any]

HIGHEST = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=None)
def upsample_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) matrix of bilinear interpolation with align_corners=True."""
    m = np.zeros((out_size, in_size), np.float64)
    if in_size == 1 or out_size == 1:
        m[:, 0] = 1.0
        return m.astype(np.float32)
    pos = np.arange(out_size) * (in_size - 1) / (out_size - 1)
    lo = np.minimum(np.floor(pos).astype(int), in_size - 2)
    frac = pos - lo
    m[np.arange(out_size), lo] = 1.0 - frac
    m[np.arange(out_size), lo + 1] += frac
    return m.astype(np.float32)


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    """scipy 'reflect' (half-sample symmetric: d c b a | a b c d | d c b a) index folding."""
    period = 2 * n
    i = np.mod(i, period)
    return np.where(i >= n, period - 1 - i, i)


@functools.lru_cache(maxsize=None)
def blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """(size, size) matrix equal to scipy.ndimage.gaussian_filter1d with mode='reflect'."""
    radius = int(truncate * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (taps / sigma) ** 2)
    weights /= weights.sum()
    m = np.zeros((size, size), np.float64)
    rows = np.repeat(np.arange(size), len(taps))
    cols = _reflect(np.arange(size)[:, None] + taps[None, :], size).ravel()
    np.add.at(m, (rows, cols), np.tile(weights, size))
    return m.astype(np.float32)


def anomaly_map(
    teacher: Features, student: Features, out_size: tuple[int, int], mode: str = "add", sigma: float = 4.0
) -> jax.Array:
    """(B, H, W) float32 blurred anomaly map from the paired features."""
    if mode not in ("add", "mul"):
        raise ValueError(f"unknown map mode {mode!r}; choose 'add' or 'mul'")
    h, w = out_size
    total = None
    for t, s in zip(teacher, student):
        t, s = t.astype(jnp.float32), s.astype(jnp.float32)
        dot = jnp.sum(t * s, axis=-1)
        norm = jnp.linalg.norm(t, axis=-1) * jnp.linalg.norm(s, axis=-1)
        dist = 1.0 - dot / jnp.maximum(norm, 1e-8)  # (B, h_k, w_k)
        uh = jnp.asarray(upsample_matrix(h, dist.shape[1]))
        uw = jnp.asarray(upsample_matrix(w, dist.shape[2]))
        up = jnp.einsum("Hh,bhw,Ww->bHW", uh, dist, uw, precision=HIGHEST)
        total = up if total is None else (total + up if mode == "add" else total * up)
    if sigma > 0:
        bh, bw = jnp.asarray(blur_matrix(h, sigma)), jnp.asarray(blur_matrix(w, sigma))
        total = jnp.einsum("Hh,bhw,Ww->bHW", bh, total, bw, precision=HIGHEST)
    return total


@functools.lru_cache(maxsize=None)
def make_eval_step(model: Any, mode: str = "add", sigma: float = 4.0, imagenet_normalize: bool = True):
    """A jitted (teacher_vars, student_vars, uint8 images) -> (maps, scores): the full path.

    Cached, so that every evaluation of a run reuses one compilation."""

    @jax.jit
    def eval_step(teacher_vars: Variables, student_vars: Variables, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = normalize(images, imagenet_normalize)
        t, s = model(teacher_vars, student_vars, x, train=False)
        maps = anomaly_map(t, s, x.shape[1:3], mode, sigma)
        return maps, jnp.max(maps, axis=(1, 2))

    return eval_step


def predict_images(
    eval_step: Callable, teacher_vars: Variables, student_vars: Variables, images: np.ndarray, batch_size: int,
    put: Callable[[Any], Any],
) -> tuple[np.ndarray, np.ndarray]:
    """Maps and scores for every image exactly once, gathered on every process."""
    maps, scores = map_global_batches(lambda x: eval_step(teacher_vars, student_vars, x), images, batch_size, put,
                                      desc="evaluating")
    return maps, scores


def eval_step_for(model: Any, config: Any) -> Callable:
    """The eval step a config asks for (map mode, blur, input normalization)."""
    return make_eval_step(model, config.map_mode, config.blur_sigma, config.imagenet_normalize)
