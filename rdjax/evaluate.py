"""Anomaly maps on the device (inside jit), the evaluation pass, and its outputs.

The map follows the official test.py: per scale 1 - cos(teacher, student) over channels,
bilinear upsampling with align_corners=True to the input size, sum (or product) over
scales, then scipy.ndimage.gaussian_filter(sigma=4) with scipy's defaults (truncate 4.0,
mode 'reflect'). Upsampling and blur are linear and separable, so each is two small
matmuls with exact interpolation / reflect-boundary matrices, at HIGHEST precision
(no TF32 on GPUs).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rdjax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Split
from rdjax.models.rd4ad import RD4AD, Features, Variables

HIGHEST = jax.lax.Precision.HIGHEST


def normalize(images: jax.Array, imagenet: bool = True) -> jax.Array:
    """uint8 NHWC -> float32 as ToTensor + Normalize(ImageNet mean, std); ToTensor alone
    with ``imagenet=False`` (the official MNIST/Fashion-MNIST helpers skip Normalize)."""
    x = images.astype(jnp.float32) / 255.0
    if not imagenet:
        return x
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


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
def make_eval_step(model: RD4AD, mode: str = "add", sigma: float = 4.0, imagenet_normalize: bool = True):
    """A jitted (teacher_vars, student_vars, uint8 images) -> (maps, scores): the full path.

    Cached, so that every evaluation of a run reuses one compilation."""

    @jax.jit
    def eval_step(teacher_vars: Variables, student_vars: Variables, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = normalize(images, imagenet_normalize)
        t, s = model(teacher_vars, student_vars, x, train=False)
        maps = anomaly_map(t, s, x.shape[1:3], mode, sigma)
        return maps, jnp.max(maps, axis=(1, 2))

    return eval_step


def predict_split(
    eval_step, teacher_vars: Variables, student_vars: Variables, images: np.ndarray, batch_size: int, put
) -> tuple[np.ndarray, np.ndarray]:
    """Maps and scores for every image exactly once, gathered on every process."""
    from rdjax.data.pipeline import map_global_batches

    fn = lambda x: eval_step(teacher_vars, student_vars, x)  # noqa: E731
    maps, scores = map_global_batches(fn, images, batch_size, put, desc="evaluating")
    return maps, scores


# ----------------------------------------------------------------------------- outputs


def write_json(path: Path, data: Any) -> None:
    """Atomic: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}"


def results_markdown(result: dict) -> str:
    lines = [
        f"# {result.get('category', '')} (epoch {result.get('epoch')})",
        "",
        "| image AUROC | pixel AUROC | AUPRO (MVTec, FPR<=0.3) | PRO (RD4AD per-image) | image F1-max |",
        "|---|---|---|---|---|",
        f"| {_fmt(result['image_auroc'])} | {_fmt(result['pixel_auroc'])} | {_fmt(result['aupro'])} "
        f"| {_fmt(result['pro_rd4ad_per_image'])} | {_fmt(result['image_f1_max'])} |",
        "",
        "| defect type | images | image AUROC |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {v['count']} | {_fmt(v['image_auroc'])} |" for t, v in result["per_type"].items()]
    for w in result.get("warnings", []):
        lines.append(f"\n**Warning:** {w}")
    return "\n".join(lines) + "\n"


HEADERS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO",
           "image_auroc_sum": "image AUROC (sum of map)"}


def summary_markdown(results: dict[str, dict], keys: tuple[str, ...] | None = None) -> str:
    """One table over categories with a mean row, in the paper's layout (percent)."""
    keys = keys or ("image_auroc", "pixel_auroc", "aupro")
    lines = ["| category | " + " | ".join(HEADERS[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    means = [float(np.nanmean([r[k] for r in results.values()])) for k in keys]
    lines.append("| **mean** | " + " | ".join(f"**{_fmt(m)}**" for m in means) + " |")
    return "\n".join(lines) + "\n"


def overlay(image: np.ndarray, amap: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8 image blended half and half with the map in the 'jet' colour map (fixed lo..hi)."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip((amap - lo) / max(hi - lo, 1e-12), 0, 1))[..., :3]
    return (np.clip(0.5 * image.astype(np.float32) / 255.0 + 0.5 * heat, 0, 1) * 255).astype(np.uint8)


def write_overlays(directory: Path, split: Split, maps: np.ndarray, scores: np.ndarray, per_group: int = 4) -> list[Path]:
    """(image | ground truth | map) sheets for the hardest cases: the highest-scoring good
    images and the lowest-scoring defective ones. Maps share one colour scale."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    good = np.flatnonzero(split.labels == 0)
    bad = np.flatnonzero(split.labels != 0)
    chosen = [("good_high", i) for i in good[np.argsort(-scores[good])][:per_group]]
    chosen += [("defect_low", i) for i in bad[np.argsort(scores[bad])][:per_group]]
    lo, hi = float(maps.min()), float(maps.max())
    paths = []
    for rank, (group, i) in enumerate(chosen):
        img = split.images[i]
        gt = img.astype(np.float32)
        gt[split.masks[i]] = 0.5 * gt[split.masks[i]] + 0.5 * np.array([255.0, 0.0, 0.0])
        sheet = np.concatenate([img, gt.astype(np.uint8), overlay(img, maps[i], lo, hi)], axis=1)
        name = split.filenames[i].replace("/", "_").rsplit(".", 1)[0]
        path = directory / f"{rank:02d}_{group}_{name}_score{scores[i]:.4f}.png"
        Image.fromarray(sheet).save(path)
        paths.append(path)
    return paths
