"""Dataset 'synthetic': a deterministic dataset in MVTec AD layout, generated into
config.dataset.root when absent, for the demo and the tests.

Two categories: 'weave' (texture-like, a periodic pattern with noise) and 'disk'
(object-like, a shaded disk on a plain background, with small pose jitter). Defects of
three types: 'scratch' (a thin line), 'hole' (a dark round spot) and 'stain' (a tinted
ellipse). Each mask is exactly the set of pixels the defect changed.

  python -m rdjax.data.synthetic --root data/synthetic
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from rdjax.data import DatasetBuilder
from rdjax.data.mvtec import FileDataset, mvtec_layout
from rdjax.errors import DataError

CATEGORIES = ("weave", "disk")
DEFECT_TYPES = ("scratch", "hole", "stain")


def _weave(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    period = 8.0
    pattern = np.sin(2 * np.pi * x / period + phase[0]) * np.sin(2 * np.pi * y / period + phase[1])
    base = np.array([0.72, 0.62, 0.45], np.float32)
    img = base + 0.12 * pattern[..., None] + rng.normal(0, 0.025, (size, size, 3))
    return img


def _disk(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-size / 32, size / 32, size=2)
    r = size * 0.3 * rng.uniform(0.96, 1.04)
    d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.array([0.35, 0.35, 0.38], np.float32)
    inside = d <= r
    shade = 1.0 - 0.35 * (d / r) ** 2
    img[inside] = np.array([0.25, 0.45, 0.75], np.float32) * shade[inside, None]
    img += rng.normal(0, 0.02, img.shape)
    return img, (cy, cx, r)


def _defect_mask(
    rng: np.random.Generator, kind: str, size: int, center: tuple[float, float], spread: float
) -> np.ndarray:
    """A binary mask for one defect near ``center``, drawn without antialiasing."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    cy, cx = center + rng.uniform(-spread, spread, size=2)
    s = size / 128.0
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        half = rng.uniform(14, 24) * s
        dx, dy = half * np.cos(angle), half * np.sin(angle)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=max(2, int(round(2 * s))))
    elif kind == "hole":
        r = rng.uniform(5, 8) * s
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == "stain":
        ry, rx = rng.uniform(7, 12, size=2) * s
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    else:
        raise ValueError(f"unknown defect type {kind!r}")
    return np.asarray(mask) > 0


def _apply_defect(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, kind: str) -> np.ndarray:
    img = img.copy()
    if kind == "scratch":
        img[mask] = np.array([0.95, 0.95, 0.92]) + rng.normal(0, 0.02, (mask.sum(), 3))
    elif kind == "hole":
        img[mask] = np.array([0.05, 0.04, 0.04]) + rng.normal(0, 0.01, (mask.sum(), 3))
    else:  # stain: a reddish tint over the texture
        img[mask] = 0.45 * img[mask] + 0.55 * np.array([0.65, 0.15, 0.1])
    return img


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _sample(rng: np.random.Generator, category: str, size: int) -> tuple[np.ndarray, tuple[float, float], float]:
    """A normal image, plus where a defect may go (center, spread)."""
    if category == "weave":
        return _weave(rng, size), (size / 2, size / 2), size * 0.3
    img, (cy, cx, r) = _disk(rng, size)
    return img, (cy, cx), r * 0.45


def generate_category(
    directory: Path, category: str, seed: int, size: int, num_train: int, num_test_good: int, num_per_defect: int
) -> None:
    rng = np.random.default_rng([seed, CATEGORIES.index(category)])
    (directory / "train" / "good").mkdir(parents=True)
    (directory / "test" / "good").mkdir(parents=True)
    for i in range(num_train):
        Image.fromarray(_to_uint8(_sample(rng, category, size)[0])).save(directory / "train" / "good" / f"{i:03d}.png")
    for i in range(num_test_good):
        Image.fromarray(_to_uint8(_sample(rng, category, size)[0])).save(directory / "test" / "good" / f"{i:03d}.png")
    for kind in DEFECT_TYPES:
        (directory / "test" / kind).mkdir(parents=True)
        (directory / "ground_truth" / kind).mkdir(parents=True)
        for i in range(num_per_defect):
            img, center, spread = _sample(rng, category, size)
            mask = _defect_mask(rng, kind, size, center, spread)
            img = _apply_defect(rng, img, mask, kind)
            Image.fromarray(_to_uint8(img)).save(directory / "test" / kind / f"{i:03d}.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(directory / "ground_truth" / kind / f"{i:03d}_mask.png")


def generate(
    root: str | os.PathLike,
    categories: tuple[str, ...] = CATEGORIES,
    seed: int = 0,
    size: int = 128,
    num_train: int = 48,
    num_test_good: int = 12,
    num_per_defect: int = 8,
) -> Path:
    """Write the categories that are absent under ``root``; return ``root``.

    Each category is built in a temporary folder and renamed into place when complete,
    so an interrupted run never leaves a half-written category behind.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for category in categories:
        if category not in CATEGORIES:
            raise ValueError(f"unknown synthetic category {category!r}; choose from {CATEGORIES}")
        if (root / category).exists():
            continue
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{category}."))
        try:
            generate_category(tmp / category, category, seed, size, num_train, num_test_good, num_per_defect)
            os.replace(tmp / category, root / category)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def synthetic(dataset: Any) -> FileDataset:
    if not dataset.root:
        raise DataError("config.dataset.root is empty; set --config.dataset.root=DIR (generated when absent)")
    return mvtec_layout(generate(Path(dataset.root).expanduser(), seed=dataset.synthetic_seed), dataset)


DATASET: DatasetBuilder = synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic MVTec-layout dataset.")
    parser.add_argument("--root", default="data/synthetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    print(generate(args.root, seed=args.seed, size=args.size))


if __name__ == "__main__":
    main()
