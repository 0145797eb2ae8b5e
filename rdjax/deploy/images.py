"""The inputs rdjax.Predictor.predict takes (arrays, PIL images, paths), as uint8 RGB arrays:
files decoded only as the image formats rdjax reads (rdjax.data.preprocess.FORMATS)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rdjax.data.preprocess import FORMATS, NOT_AN_IMAGE, open_image, to_rgb
from rdjax.errors import DataError

ImageLike = Any  # uint8 HxWx3 array, a batch of them, a PIL image, or a path


def _to_array(item: ImageLike, name: str) -> np.ndarray:
    """One input as uint8 (H, W, 3). Files are decoded only as FORMATS; so is a PIL image
    opened from a file (Pillow decodes lazily: an EPS image would start Ghostscript here)."""
    if isinstance(item, (str, os.PathLike)):
        try:
            data = Path(item).read_bytes()
        except OSError as e:
            raise DataError(f"{item}: cannot read ({e.strerror or e})") from None
        item = open_image(data, str(item))
    if isinstance(item, Image.Image):
        if item.format not in (None, "MPO", *FORMATS):  # MPO: a camera's JPEG with several pictures
            raise DataError(f"{name}: a PIL image of format {item.format}, {NOT_AN_IMAGE}")
        return np.asarray(to_rgb(item), np.uint8)
    arr = np.asarray(item)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise DataError(f"{name}: expected a uint8 array of shape (H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def as_images(x: ImageLike | Sequence[ImageLike]) -> list[np.ndarray]:
    """Any supported input -> a list of uint8 HxWx3 arrays at their original size."""
    if isinstance(x, np.ndarray) and x.ndim == 4:
        return [_to_array(a, f"image {i}") for i, a in enumerate(x)]
    if isinstance(x, (list, tuple)):
        return [_to_array(a, f"image {i}") for i, a in enumerate(x)]
    return [_to_array(x, "image")]
