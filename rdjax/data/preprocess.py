"""Decoding and preprocessing as the official code: PIL bilinear resize (what
torchvision's Resize does on PIL images), ImageNet statistics, masks binarized at 0.5.

Kept apart from the TFDS builder so that inference needs no tensorflow-datasets.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from rdjax.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def open_image(data: bytes, name: str) -> Image.Image:
    """Decode an encoded file; a DataError naming ``name`` if it is not a readable image."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise DataError(f"{name}: not a readable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16/32-bit grayscale is scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def decode_image(data: bytes, size: int, name: str = "image") -> np.ndarray:
    """Encoded file -> uint8 (size, size, 3), resized as torchvision's Resize on PIL."""
    img = to_rgb(open_image(data, name))
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def original_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def decode_mask(data: bytes, size: int, name: str = "mask", expected_size: tuple[int, int] | None = None,
                nonzero: bool = False) -> np.ndarray:
    """Encoded mask -> bool (size, size): same bilinear resize, then > 0.5 as the official code.

    ``nonzero``: the mask marks defects with any non-zero value (VisA's are not 0/255), so it
    is binarized to 0/255 before the resize."""
    img = open_image(data, name)
    if nonzero:
        img = Image.fromarray(((np.asarray(to_rgb(img).convert("L")) > 0) * 255).astype(np.uint8))
    if expected_size is not None and img.size != expected_size:
        raise DataError(f"{name}: mask is {img.size[0]}x{img.size[1]} but its image is {expected_size[0]}x{expected_size[1]}")
    if img.mode != "L":
        img = to_rgb(img).convert("L")
    resized = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return resized > 0.5


@dataclasses.dataclass
class Split:
    """A split decoded into memory: preprocessing happens once per run, not per epoch."""

    images: np.ndarray  # uint8 (N, S, S, 3)
    masks: np.ndarray  # bool (N, S, S)
    labels: np.ndarray  # int32 (N,), 0 = good
    defect_types: list[str]
    filenames: list[str]
    has_masks: bool = True  # False: anomalous images without masks (image-level metrics only)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "Split":
        return Split(self.images[idx], self.masks[idx], self.labels[idx],
                     [self.defect_types[i] for i in idx], [self.filenames[i] for i in idx], self.has_masks)
