"""How a file becomes a model's input: decoding, and each model's input recipe (the resize
filter and size, an optional centre crop, the mask rule and the normalization).

Kept apart from the TFDS builder so that inference needs no tensorflow-datasets.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from rdjax import modes
from rdjax.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# The only formats rdjax decodes, on every path (datasets, predict, rdjax.load, serve), by
# Pillow's names: Image.open tries no other decoder, whatever a file's name or content (an
# EPS file named x.png would otherwise start Ghostscript).
FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
NOT_AN_IMAGE = f"not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} file"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def printable(text: str) -> str:
    """``text`` (a file name, or a message naming one) with each byte that is not UTF-8,
    which Python holds as a surrogate, written as a backslash escape (\\xff): what
    scores.csv and report.html show, since UTF-8 text cannot hold the byte itself."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def open_image(data: bytes, name: str) -> Image.Image:
    """Decode an encoded file of one of FORMATS; a DataError naming ``name`` if it is not
    a readable image of one of them."""
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        img.load()
    except UnidentifiedImageError:
        raise DataError(f"{name}: not a readable image ({NOT_AN_IMAGE})") from None
    except Exception as e:
        raise DataError(
            f"{name}: not a readable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})"
        ) from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16/32-bit grayscale is scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Encoded file -> uint8 (H, W, 3) at the file's own resolution."""
    return np.asarray(to_rgb(open_image(data, name)), dtype=np.uint8)


def resize_pil(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W[, C]) -> uint8 (height, width[, C]) by PIL's bilinear filter, which
    antialiases when it shrinks: what torchvision's Resize does to a PIL image."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR), np.uint8)


def _cv2_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR taps along one axis: per output pixel, the source pixels left
    and right of its centre (d + 0.5) * scale - 0.5 (scale = 1 / (dst / src), as
    cv::resize takes it) and the right one's weight, the centre's fraction; a centre left
    of the first pixel or right of the last takes that pixel alone."""
    centre = (np.arange(dst) + 0.5) * (1.0 / (dst / src)) - 0.5
    left = np.floor(centre).astype(np.int64)
    frac = np.where((left < 0) | (left >= src - 1), 0.0, centre - left)
    left = np.clip(left, 0, src - 1)
    return left, np.minimum(left + 1, src - 1), frac


def resize_cv2(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W, C) -> float32 (height, width, C) in [0, 1], as RD++'s code does it:
    ``cv2.resize(image / 255.0, (width, height))``, OpenCV's bilinear filter (no
    antialiasing), separable, in float64 with float64 weights, rounded once to float32.
    That is OpenCV's IPP path (its x86 wheels); its generic path rounds the coordinates to
    float32 (tests/unit/data/test_recipe.py bounds the difference)."""
    top, bottom, fy = _cv2_taps(image.shape[0], height)
    rows = lambda i: np.take(image, i, axis=0).astype(np.float64) / 255.0  # noqa: E731  (the taps only)
    tall = rows(top) * (1.0 - fy)[:, None, None] + rows(bottom) * fy[:, None, None]
    left, right, fx = _cv2_taps(image.shape[1], width)
    return (tall[:, left] * (1.0 - fx)[None, :, None] + tall[:, right] * fx[None, :, None]).astype(np.float32)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central size x size pixels, offset as torchvision's CenterCrop rounds them."""
    h, w = image.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image[top : top + size, left : left + size]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a file becomes a model's input, as the model's official code does it; recorded
    in the workdir's config (config.input, config.image_size, config.imagenet_normalize)
    and used by training, evaluation, predict, tiling, packages and the export contract.

    filter: rdjax.modes.ResizeFilter. 'pil_bilinear' gives uint8 inputs (PIL works on
    8-bit images); 'cv2_bilinear' gives float32 inputs in [0, 1], since OpenCV resizes
    the float image and rounding it back to 8 bits would change the pixels.
    size: the model's input side. resize: the side images are resized to before a
    centre crop to ``size`` (0: size, no crop). Masks take the same resize with
    PIL's bilinear filter and crop, then > mask_threshold: every official code of the
    family resizes masks so, whatever its image filter; RD4AD's and RD++'s threshold is
    0.5, Dinomaly's 0 (its evaluation takes any non-zero value as a defect).
    """

    filter: str = modes.ResizeFilter.PIL_BILINEAR.value
    size: int = 256
    resize: int = 0
    imagenet_normalize: bool = True
    mask_threshold: float = 0.5

    @classmethod
    def from_config(cls, config: Any) -> Recipe:
        return cls(
            filter=modes.parse(modes.ResizeFilter, config.input.filter, "config.input.filter").value,
            size=config.image_size,
            resize=config.input.resize,
            imagenet_normalize=config.imagenet_normalize,
            mask_threshold=config.input.mask_threshold,
        )

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the model's inputs on the host (uint8, or float32 in [0, 1])."""
        return np.dtype(np.uint8 if self.filter == modes.ResizeFilter.PIL_BILINEAR else np.float32)

    def describe(self) -> str:
        """What a caller outside rdjax must do to a uint8 RGB image (the export contract)."""
        side = self.resize or self.size
        if self.filter == modes.ResizeFilter.PIL_BILINEAR:
            how = f"PIL's bilinear resize of the 8-bit image to {side}x{side} (torchvision's Resize on a PIL image)"
        else:
            how = f"cv2.resize(image / 255.0, ({side}, {side})) in float64 (OpenCV's INTER_LINEAR), then float32"
        return how if side == self.size else f"{how}, then the central {self.size}x{self.size} crop"

    def scale(self, image: np.ndarray, width: int, height: int) -> np.ndarray:
        """uint8 (H, W, 3) -> (height, width, 3) in ``dtype`` by the recipe's filter."""
        if self.filter == modes.ResizeFilter.PIL_BILINEAR:
            return resize_pil(image, width, height)
        return resize_cv2(image, width, height)

    def image(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) at any size -> the model's (size, size, 3) input."""
        side = self.resize or self.size
        return center_crop(self.scale(image, side, side), self.size)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """uint8 (H, W) mask, 255 = defect -> bool (size, size)."""
        side = self.resize or self.size
        resized = resize_pil(mask, side, side).astype(np.float32) / 255.0
        return center_crop(resized, self.size) > self.mask_threshold


def to_display(images: np.ndarray) -> np.ndarray:
    """Model inputs in either recipe dtype -> uint8, for pictures (reports, overlays)."""
    if images.dtype == np.uint8:
        return images
    return np.clip(np.rint(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def header_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the file header, after PIL's verify() (for PNG it checks every
    chunk's CRC, so a truncated file is caught without decoding the pixels); a DataError
    naming ``name`` if the file fails. Damage verify() cannot see (inside a JPEG's
    entropy-coded data) surfaces when the image is decoded, as the same one-line error."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            img.verify()
            return img.size
    except UnidentifiedImageError:
        raise DataError(f"{name}: not a readable image ({NOT_AN_IMAGE})") from None
    except Exception as e:
        raise DataError(f"{name}: not a readable image ({type(e).__name__})") from None


def check_mask_header(data: bytes, image_size: tuple[int, int], name: str) -> None:
    """A mask must be readable and as large as its image (checked from the headers)."""
    size = header_size(data, name)
    if size != image_size:
        raise DataError(f"{name}: mask is {size[0]}x{size[1]} but its image is {image_size[0]}x{image_size[1]}")


def decode_mask(data: bytes, name: str = "mask", nonzero: bool = False) -> np.ndarray:
    """Encoded mask -> uint8 (H, W), 255 = defect, at the file's own resolution.

    ``nonzero``: the mask marks defects with any non-zero value (VisA's are not 0/255), so it
    is binarized to 0/255 first."""
    img = open_image(data, name)
    if nonzero:
        return ((np.asarray(to_rgb(img).convert("L")) > 0) * 255).astype(np.uint8)
    if img.mode != "L":
        img = to_rgb(img).convert("L")
    return np.asarray(img, np.uint8)


Reader = Callable[[int], tuple[np.ndarray, "np.ndarray | None"]]


@dataclasses.dataclass(frozen=True)
class Split:
    """A split as per-image metadata and a reader that decodes one image on demand.

    Host memory grows with the number of images by a few bytes each (label, names), never
    by pixels: images and masks are decoded batch by batch as they are used
    (rdjax.data.pipeline), on each process only for its own share.
    """

    # record -> (the recipe's (S, S, 3) input, bool (S, S) mask or None if there is none)
    read: Reader = dataclasses.field(repr=False)
    records: np.ndarray  # int64 (N,): the record each row reads
    labels: np.ndarray  # int32 (N,), 0 = good
    defect_types: tuple[str, ...]
    filenames: tuple[str, ...]
    image_size: int
    has_masks: bool = True  # False: anomalous images without masks (image-level metrics only)
    # record -> uint8 (H, W, 3) at the file's own resolution, for tiled evaluation; None
    # where the data has no resolution of its own beyond image_size (the novelty sets).
    read_native: Callable[[int], np.ndarray] | None = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Split:
        return dataclasses.replace(
            self,
            records=self.records[idx],
            labels=self.labels[idx],
            defect_types=tuple(self.defect_types[i] for i in idx),
            filenames=tuple(self.filenames[i] for i in idx),
        )

    def example(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``row`` decoded: (image, mask); the mask is all False where there is none."""
        image, mask = self.read(int(self.records[row]))
        return image, np.zeros(image.shape[:2], bool) if mask is None else mask

    def native_image(self, row: int) -> np.ndarray:
        """Row ``row``'s image at its file's own resolution (rdjax.scoring.tiling)."""
        if self.read_native is None:
            raise DataError("this dataset has no images beyond image_size to tile: use config.resize.mode='squeeze'")
        return self.read_native(int(self.records[row]))

    def images(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """The given rows (all rows if None: small splits only) decoded and stacked."""
        rows = range(len(self)) if rows is None else rows
        return np.stack([self.example(i)[0] for i in rows])

    def masks(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        rows = range(len(self)) if rows is None else rows
        return np.stack([self.example(i)[1] for i in rows])

    @classmethod
    def concat(cls, parts: dict[str, Split]) -> Split:
        """One split over several categories' splits (the unified setting), each row
        reading from its own split: its records are offset past those of the parts before
        it, and its filename starts with its category. Nothing is decoded or copied."""
        splits = list(parts.values())
        bases = np.cumsum([0] + [int(s.records.max()) + 1 if len(s) else 0 for s in splits])

        def owner(record: int) -> tuple[Split, int]:
            k = int(np.searchsorted(bases, record, side="right")) - 1
            return splits[k], record - int(bases[k])

        def read(record: int) -> tuple[np.ndarray, np.ndarray | None]:
            split, own = owner(record)
            return split.read(own)

        def read_native(record: int) -> np.ndarray:
            split, own = owner(record)
            assert split.read_native is not None
            return split.read_native(own)

        return cls(
            read=read,
            records=np.concatenate([s.records + b for s, b in zip(splits, bases)]),
            labels=np.concatenate([s.labels for s in splits]),
            defect_types=tuple(t for s in splits for t in s.defect_types),
            filenames=tuple(f"{name}/{f}" for name, s in parts.items() for f in s.filenames),
            image_size=splits[0].image_size,
            has_masks=all(s.has_masks for s in splits),
            read_native=read_native if all(s.read_native is not None for s in splits) else None,
        )

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        masks: np.ndarray,
        labels: np.ndarray,
        defect_types: Sequence[str],
        filenames: Sequence[str],
        has_masks: bool = True,
    ) -> Split:
        """A split over arrays already in memory (user data that is small, tests)."""
        return cls(
            read=lambda i: (images[i], masks[i]),
            records=np.arange(len(labels)),
            labels=np.asarray(labels, np.int32),
            defect_types=tuple(defect_types),
            filenames=tuple(filenames),
            image_size=int(images.shape[1]),
            has_masks=has_masks,
        )
