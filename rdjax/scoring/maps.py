"""Features -> anomaly maps, on the device (inside jit), and the jitted evaluation step.

The map follows the official test.py: per scale 1 - cos(teacher, student) over channels,
bilinear upsampling with align_corners=True to the input size, sum (or product) over
scales, then scipy.ndimage.gaussian_filter(sigma=4) with scipy's defaults (truncate 4.0,
mode 'reflect'). Upsampling and blur are linear and separable, so each is two small
matmuls with exact interpolation / reflect-boundary matrices, at HIGHEST precision
(no TF32 on GPUs).

The image score is the map's maximum (the official code), or with config.max_ratio r > 0
the mean of its highest r fraction of pixels: `image_scores`, the one place that turns
maps into scores.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
import numpy as np

from rdjax import modes
from rdjax.data.normalize import normalize
from rdjax.errors import ConfigError
from rdjax.models import MapRecipe, Model
from rdjax.pytrees import Features, Variables
from rdjax.runtime.sharding import map_local

HIGHEST = jax.lax.Precision.HIGHEST


def _upsample64(out_size: int, in_size: int) -> np.ndarray:
    m = np.zeros((out_size, in_size), np.float64)
    if in_size == 1 or out_size == 1:
        m[:, 0] = 1.0
        return m
    pos = np.arange(out_size) * (in_size - 1) / (out_size - 1)
    lo = np.minimum(np.floor(pos).astype(int), in_size - 2)
    frac = pos - lo
    m[np.arange(out_size), lo] = 1.0 - frac
    m[np.arange(out_size), lo + 1] += frac
    return m


def _resize64(out_size: int, in_size: int) -> np.ndarray:
    """torch's bilinear interpolate(size=out, align_corners=False, antialias=False) along one
    axis: source (i + 0.5) in / out - 0.5, clamped at 0, the upper tap clamped to the border."""
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), in_size - 1)
    frac = np.clip(src - lo, 0.0, 1.0)
    m = np.zeros((out_size, in_size), np.float64)
    m[np.arange(out_size), lo] = 1.0 - frac
    m[np.arange(out_size), np.minimum(lo + 1, in_size - 1)] += frac
    return m


@functools.cache
def scale_matrix(out_size: int, input_size: int, in_size: int) -> np.ndarray:
    """(out, in) float32: a scale's distances (in) upsampled with align_corners=True to the
    model's input size, then, where the map has another size (config.map_size: Dinomaly
    evaluates at 256), resized to it as torch's bilinear align_corners=False does. Both
    are linear, so they are one matrix, formed in float64."""
    m = _upsample64(input_size, in_size)
    if out_size != input_size:
        m = _resize64(out_size, input_size) @ m
    return m.astype(np.float32)


def map_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """(B, S, S) masks -> (B, size, size) by torch's 'nearest' (source floor(i * S / size)),
    as Dinomaly's evaluation resizes its masks to the map's size; unchanged at size S."""
    side = masks.shape[-1]
    if size in (0, side):
        return masks
    idx = np.minimum(np.floor(np.arange(size) * (side / size)).astype(int), side - 1)
    return masks[..., idx[:, None], idx[None, :]]


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    """scipy 'reflect' (half-sample symmetric: d c b a | a b c d | d c b a) index folding."""
    period = 2 * n
    i = np.mod(i, period)
    return np.where(i >= n, period - 1 - i, i)


@functools.cache
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


@functools.cache
def kernel_blur_matrix(size: int, kernel: int, sigma: float) -> np.ndarray:
    """(size, size) matrix of a ``kernel`` x ``kernel`` Gaussian with zero padding (Dinomaly's
    get_gaussian_kernel: exp(-d^2 / 2 sigma^2) on the kernel's grid, normalized, applied
    by a padded convolution). The 2-D kernel is the outer product of this normalized 1-D
    one, so rows and columns blur apart."""
    half = kernel // 2
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    taps /= taps.sum()
    m = np.zeros((size, size), np.float64)
    for offset, weight in zip(range(-half, half + 1), taps):
        rows = np.arange(max(0, -offset), min(size, size - offset))
        m[rows, rows + offset] = weight
    return m.astype(np.float32)


def anomaly_map(
    teacher: Features,
    student: Features,
    out_size: tuple[int, int],
    mode: str = "add",
    sigma: float = 4.0,
    map_size: int = 0,
    kernel: int = 0,
) -> jax.Array:
    """(B, H, W) float32 blurred anomaly map from the paired features: at the input's size
    ``out_size``, or at ``map_size`` x ``map_size`` (config.map_size); blurred by scipy's
    gaussian_filter (``kernel`` 0) or a ``kernel`` x ``kernel`` Gaussian with zero padding."""
    combine = modes.parse(modes.MapMode, mode, "map mode")
    h, w = (map_size, map_size) if map_size else out_size
    total: jax.Array | None = None
    for t, s in zip(teacher, student):
        t, s = t.astype(jnp.float32), s.astype(jnp.float32)
        dot = jnp.sum(t * s, axis=-1)
        norm = jnp.linalg.norm(t, axis=-1) * jnp.linalg.norm(s, axis=-1)
        dist = 1.0 - dot / jnp.maximum(norm, 1e-8)  # (B, h_k, w_k)
        uh = jnp.asarray(scale_matrix(h, out_size[0], dist.shape[1]))
        uw = jnp.asarray(scale_matrix(w, out_size[1], dist.shape[2]))
        up = _separable(uh, dist, uw)
        total = up if total is None else (total * up if combine is modes.MapMode.MUL else total + up)
    assert total is not None, "no feature scales"
    if combine is modes.MapMode.MEAN:
        total = total / len(teacher)
    if sigma > 0:
        blur = (lambda n: kernel_blur_matrix(n, kernel, sigma)) if kernel else (lambda n: blur_matrix(n, sigma))
        total = _separable(jnp.asarray(blur(h)), total, jnp.asarray(blur(w)))
    return total


def _separable(rows: jax.Array, x: jax.Array, cols: jax.Array) -> jax.Array:
    """rows @ x @ cols^T for each image of x (B, h, w): two matmuls, written out rather than
    as one three-operand einsum, which ONNX runtimes may expand into a (H, h, w, W)
    product (OpenVINO did: gigabytes at 256 px)."""
    return jnp.matmul(jnp.matmul(rows, x, precision=HIGHEST), cols.T, precision=HIGHEST)


def image_scores(maps: jax.Array | np.ndarray, max_ratio: float = 0.0) -> jax.Array:
    """(B, H, W) blurred maps -> (B,) float32 image scores.

    ``max_ratio`` 0: each map's maximum (RD4AD's and RD++'s test code). ``max_ratio`` r in
    (0, 1]: the mean of each map's k = int(H * W * r) highest pixels, as Dinomaly's
    `max_ratio` (guojiajeremy/Dinomaly, utils.py, evaluation_batch: the blurred map at the
    evaluated resolution, flattened, sorted, the first int(numel * r) averaged), which
    makes the score less sensitive to a single noisy pixel. k is at least 1 (there, a
    map too small for one pixel would give the mean of nothing). Works inside jit and
    eagerly on host maps alike; k depends only on the static shape."""
    if not 0 <= max_ratio <= 1:
        raise ConfigError(f"max_ratio={max_ratio} must be 0 (the map's maximum) or a fraction in (0, 1]")
    maps = jnp.asarray(maps, jnp.float32)
    if max_ratio == 0:
        return jnp.max(maps, axis=(-2, -1))
    h, w = maps.shape[-2:]
    k = max(1, int(h * w * max_ratio))
    top = jax.lax.top_k(maps.reshape(*maps.shape[:-2], h * w), k)[0]
    return jnp.mean(top, axis=-1)


@dataclasses.dataclass(frozen=True)
class EvalStep:
    """A jitted (teacher_vars, student_vars, model inputs) -> (maps, scores), with the
    ``max_ratio`` its scores use, so that maps blended from its windows elsewhere
    (rdjax.scoring.tiling) are scored by the same rule."""

    fn: Callable[[Variables, Variables, jax.Array | np.ndarray], tuple[jax.Array, jax.Array]]
    max_ratio: float

    def __call__(
        self, teacher_vars: Variables, student_vars: Variables, images: jax.Array | np.ndarray
    ) -> tuple[jax.Array, jax.Array]:
        return self.fn(teacher_vars, student_vars, images)


@functools.cache
def make_eval_step(model: Model, recipe: MapRecipe, imagenet_normalize: bool = True) -> EvalStep:
    """The full path from model inputs to maps (``recipe``: map mode, size and blur) and
    `image_scores` (``recipe.max_ratio``).

    Cached, so that every evaluation of a run reuses one compilation."""

    @jax.jit
    def eval_step(teacher_vars: Variables, student_vars: Variables, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = normalize(images, imagenet_normalize)
        t, s = model(teacher_vars, student_vars, x, train=False)
        maps = anomaly_map(
            t, s, (x.shape[1], x.shape[2]), recipe.mode, recipe.blur_sigma, recipe.size, recipe.blur_kernel
        )
        return maps, image_scores(maps, recipe.max_ratio)

    return EvalStep(eval_step, recipe.max_ratio)


# ----------------------------------------------------------------------------- binned pixel statistics

HIST_LOW = 2.0**-20  # scores below fall in the first bin (maps are >= 0 up to rounding)
HIST_EXPONENTS = 24  # up to 2^4 = 16 > 8, the largest possible map (three scales, 'mul')
HIST_MANTISSA_BITS = 12  # bins of relative width 2^-12
NUM_BINS = HIST_EXPONENTS << HIST_MANTISSA_BITS


def bin_edges() -> np.ndarray:
    """The NUM_BINS + 1 bin edges: float32 numbers whose low mantissa bits are zero, so a
    score's bin is its bit pattern shifted (constant relative width, no range to guess)."""
    base = np.array(HIST_LOW, np.float32).view(np.int32)
    bits = base + (np.arange(NUM_BINS + 1, dtype=np.int64) << (23 - HIST_MANTISSA_BITS))
    return bits.astype(np.int32).view(np.float32).astype(np.float64)


def bin_index(x: jax.Array) -> jax.Array:
    base = np.array(HIST_LOW, np.float32).view(np.int32)
    x = jnp.clip(x.astype(jnp.float32), HIST_LOW, np.float32(2.0 ** (HIST_EXPONENTS - 20)) * (1 - 2**-24))
    return (jax.lax.bitcast_convert_type(x, jnp.int32) - base) >> (23 - HIST_MANTISSA_BITS)


def pixel_histograms(maps: jax.Array, masks: jax.Array, pro_weights: jax.Array, valid: jax.Array) -> dict:
    """Per-bin counts of normal and anomalous pixels and sums of region weights, over the
    valid rows of a (global) batch; summed over every device and host by the compiler."""
    idx = bin_index(maps).ravel()
    rows = valid[:, None, None]
    normal = (~masks & rows).ravel().astype(jnp.int32)
    anomalous = (masks & rows).ravel().astype(jnp.int32)
    zeros = jnp.zeros(NUM_BINS, jnp.int32)
    inf = jnp.float32(jnp.inf)
    return {
        "neg": zeros.at[idx].add(normal),
        "pos": zeros.at[idx].add(anomalous),
        "pro": jnp.zeros(NUM_BINS, jnp.float32).at[idx].add(jnp.where(rows, pro_weights, 0.0).ravel()),
        "lo": jnp.min(jnp.where(rows, maps, inf)),
        "hi": jnp.max(jnp.where(rows, maps, -inf)),
    }


@jax.jit
def stats_step(
    maps: jax.Array, scores: jax.Array, masks: jax.Array, pro_weights: jax.Array, regions: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, dict]:
    """What an evaluation pass keeps of a batch of maps: (maps, scores, map sums, the
    binned pixel statistics)."""
    stats = pixel_histograms(maps, masks, pro_weights, valid)
    stats["regions"] = jnp.sum(jnp.where(valid, regions, 0))
    return maps, scores, jnp.sum(maps, axis=(1, 2)), stats


@functools.cache
def make_pass_step(model: Model, recipe: MapRecipe, imagenet_normalize: bool = True) -> Callable:
    """The eval step of an evaluation pass over squeezed images: the maps and scores
    computed from the images, then `stats_step`, in one program."""
    eval_step = make_eval_step(model, recipe, imagenet_normalize)

    @jax.jit
    def pass_step(
        teacher_vars: Variables,
        student_vars: Variables,
        images: jax.Array,
        masks: jax.Array,
        pro_weights: jax.Array,
        regions: jax.Array,
        valid: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array, dict]:
        maps, scores = eval_step(teacher_vars, student_vars, images)
        return stats_step(maps, scores, masks, pro_weights, regions, valid)

    return pass_step


@dataclasses.dataclass(frozen=True)
class WindowRunner:
    """windows (model inputs) -> their maps (``run``), and the ``max_ratio`` that scores the maps
    blended from them (rdjax.scoring.tiling.evaluation_maps), the eval step's own."""

    run: Callable[[np.ndarray], np.ndarray]
    max_ratio: float

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        return self.run(windows)


def local_runner(
    eval_step: EvalStep, teacher_vars: Variables, student_vars: Variables, batch_size: int
) -> WindowRunner:
    """windows (model inputs) -> their maps, on this process's first device alone, in padded
    batches of ``batch_size``.

    Tiling gives each image its own number of windows, so processes cannot share one
    global batch; each computes its own images' windows with its local copy of the
    (replicated) variables, and no collective is involved."""
    teacher, student = jax.tree.map(lambda a: a.addressable_data(0), (teacher_vars, student_vars))

    def run(windows: np.ndarray) -> np.ndarray:
        return map_local(lambda batch: eval_step(teacher, student, batch)[0], windows, batch_size)

    return WindowRunner(run, eval_step.max_ratio)


@overload
def eval_step_for(
    model: Model, config: Any, full_pass: Literal[False] = False, max_ratio: float | None = None
) -> EvalStep: ...


@overload
def eval_step_for(model: Model, config: Any, full_pass: Literal[True], max_ratio: float | None = None) -> Callable: ...


def eval_step_for(model: Model, config: Any, full_pass: bool = False, max_ratio: float | None = None) -> Callable:
    """The eval step a config asks for (map mode, size and blur, input normalization, the
    image score's ``max_ratio``: config.max_ratio unless given); with ``full_pass`` the pass step
    that adds the binned pixel statistics."""
    recipe = MapRecipe.of(config)
    if max_ratio is not None:
        recipe = dataclasses.replace(recipe, max_ratio=float(max_ratio))
    args = (model, recipe, config.imagenet_normalize)
    return make_pass_step(*args) if full_pass else make_eval_step(*args)
