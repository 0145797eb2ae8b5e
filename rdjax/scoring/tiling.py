"""Large and non-square images without the square squeeze (docs/usage.md, "Large and
non-square images").

The model sees S×S inputs (S = the workdir's image_size). 'squeeze' makes a whole image
an S×S input by the model's input recipe (rdjax.data.preprocess.Recipe), the paper's
protocol: a 640×480 part is distorted and a small defect in a 2048 px image shrinks to a
few pixels. The other two modes cut the image into S×S windows of a proportionally scaled
copy (the recipe's filter) and blend the windows' maps back together:
  fit   scale the shorter side to S: no distortion, windows along the longer side;
  tile  scale by S / tile_size (tile_size native pixels per window; tile_size = S keeps
        the native resolution): small defects keep their size.
Windows overlap by ``overlap`` native pixels (at least as needed to cover the image), and
their maps are averaged with weights that ramp down linearly across the overlap, so no seam
shows. The image score is taken from the blended map at the scale it was computed, by the
rule of a whole image (rdjax.scoring.maps.image_scores, config.max_ratio).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rdjax import modes
from rdjax.data.preprocess import Recipe
from rdjax.errors import ConfigError, DataError
from rdjax.scoring import maps


def starts(length: int, size: int, stride: int) -> list[int]:
    """Offsets of windows of ``size`` covering [0, length): every ``stride``, the last one
    aligned with the end (so windows may overlap by more than size - stride there)."""
    if length <= size:
        return [0]
    return list(range(0, length - size, stride)) + [length - size]


def ramp(size: int, overlap: int) -> np.ndarray:
    """(size, size) blending weights: 1 inside, falling linearly to 1 / (overlap + 1) at
    the edges across the overlap, never 0 (an image border is covered by one window only)."""
    line = np.ones(size, np.float64)
    if overlap > 0:
        edge = np.arange(1, overlap + 1) / (overlap + 1)
        line[:overlap] = np.minimum(line[:overlap], edge)
        line[-overlap:] = np.minimum(line[-overlap:], edge[::-1])
    return np.outer(line, line)


def scale_for(mode: str, shape: tuple[int, int], size: int, tile_size: int | None) -> float:
    """How much an image of ``shape`` is scaled before it is cut into size×size windows."""
    h, w = shape
    kind = modes.parse(modes.ResizeMode, mode, "resize")
    if kind is modes.ResizeMode.FIT:
        return size / min(h, w)
    if kind is modes.ResizeMode.SQUEEZE:
        raise ConfigError("resize='squeeze' has no windows; choose 'fit' or 'tile'")
    tile = tile_size or size
    if min(h, w) < tile:
        raise DataError(f"image {w}x{h} is smaller than one tile ({tile} px): use resize='fit' or a smaller tile_size")
    return size / tile


def tiled_maps(
    images: Sequence[np.ndarray],
    recipe: Recipe,
    scales: Sequence[float],
    overlap: int,
    run: Callable[[np.ndarray], np.ndarray],
) -> list[np.ndarray]:
    """The blended map of each uint8 image scaled by its scale with the recipe's filter
    (float32, at the scaled size). The windows of all the images go to ``run`` together,
    so batches fill up even when each image has only a few windows.

    ``run``: (n, size, size, 3) windows in the recipe's dtype -> their (n, size, size) maps."""
    size = recipe.size
    windows, layouts = [], []
    for image, scale in zip(images, scales):
        h, w = image.shape[:2]
        sh, sw = max(size, round(h * scale)), max(size, round(w * scale))
        scaled = recipe.scale(image, sw, sh)
        over = min(int(round(overlap * scale)), size - 1)
        corners = [(y, x) for y in starts(sh, size, size - over) for x in starts(sw, size, size - over)]
        windows += [scaled[y : y + size, x : x + size] for y, x in corners]
        layouts.append(((sh, sw), over, corners))
    maps = iter(run(np.stack(windows)))
    blended = []
    for (sh, sw), over, corners in layouts:
        weight = ramp(size, over)
        total = np.zeros((sh, sw), np.float64)
        norm = np.zeros((sh, sw), np.float64)
        for (y, x), amap in zip(corners, maps):
            total[y : y + size, x : x + size] += weight * amap
            norm[y : y + size, x : x + size] += weight
        blended.append((total / norm).astype(np.float32))
    return blended


def resize_map(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float map to (height, width), bilinear."""
    from PIL import Image

    h, w = shape
    if amap.shape == (h, w):
        return amap
    return np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))


def uncrop_map(amap: np.ndarray, shape: tuple[int, int], recipe: Recipe) -> np.ndarray:
    """A squeezed input's map back on its image of ``shape``: resized over the part of the
    image the recipe's centre crop kept; 0 (nothing seen) outside it."""
    side = recipe.resize or recipe.size
    if side == recipe.size:
        return resize_map(amap, shape)
    h, w = shape
    start = int(round((side - recipe.size) / 2.0))
    y0, y1 = round(start * h / side), round((start + recipe.size) * h / side)
    x0, x1 = round(start * w / side), round((start + recipe.size) * w / side)
    full = np.zeros(shape, np.float32)
    full[y0:y1, x0:x1] = resize_map(amap, (y1 - y0, x1 - x0))
    return full


def blended_scores(blended: Sequence[np.ndarray], max_ratio: float) -> np.ndarray:
    """Each blended map's image score (rdjax.scoring.maps.image_scores), at the size it has: maps
    of one size are scored together, one call per size (a call per map would cost a
    dispatch each, and a compilation per size either way)."""
    scores = np.zeros(len(blended), np.float32)
    for shape in {m.shape for m in blended}:
        rows = [i for i, m in enumerate(blended) if m.shape == shape]
        scores[rows] = np.asarray(maps.image_scores(np.stack([blended[i] for i in rows]), max_ratio))
    return scores


def evaluation_maps(
    images: Sequence[np.ndarray], recipe: Recipe, setting: Any, run: maps.WindowRunner
) -> tuple[np.ndarray, np.ndarray]:
    """Tiled evaluation (config.resize): each image's blended map resized to (size, size),
    where the masks and pixel metrics live, and its score by ``run``'s max_ratio, from the
    blended map at the scale it was computed (as `Predictor.predict` scores it), before that
    resize."""
    size = recipe.size
    scales = [scale_for(setting.mode, image.shape[:2], size, setting.tile_size or None) for image in images]
    blended = tiled_maps(images, recipe, scales, setting.overlap, run)
    return (
        np.stack([resize_map(amap, (size, size)) for amap in blended]),
        blended_scores(blended, run.max_ratio),
    )
