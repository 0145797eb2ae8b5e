"""Decoding and preprocessing as the official code: PIL bilinear resize (what
torchvision's Resize does on PIL images), ImageNet statistics, masks binarized at 0.5.

Kept apart from the TFDS builder so that inference needs no tensorflow-datasets.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Sequence

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


def decode_image(data: bytes, size: int | None, name: str = "image") -> np.ndarray:
    """Encoded file -> uint8 (size, size, 3), resized as torchvision's Resize on PIL;
    ``size=None`` keeps the file's own resolution (tiled evaluation)."""
    img = to_rgb(open_image(data, name))
    if size is not None:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def header_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the file header, after PIL's verify() (for PNG it checks every
    chunk's CRC, so a truncated file is caught without decoding the pixels); a DataError
    naming ``name`` if the file fails. Damage verify() cannot see (inside a JPEG's
    entropy-coded data) surfaces when the image is decoded, as the same one-line error."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
            return img.size
    except Exception as e:
        raise DataError(f"{name}: not a readable image ({type(e).__name__})") from None


def check_mask_header(data: bytes, image_size: tuple[int, int], name: str) -> None:
    """A mask must be readable and as large as its image (checked from the headers)."""
    size = header_size(data, name)
    if size != image_size:
        raise DataError(f"{name}: mask is {size[0]}x{size[1]} but its image is {image_size[0]}x{image_size[1]}")


def decode_mask(data: bytes, size: int, name: str = "mask", nonzero: bool = False) -> np.ndarray:
    """Encoded mask -> bool (size, size): same bilinear resize, then > 0.5 as the official code.

    ``nonzero``: the mask marks defects with any non-zero value (VisA's are not 0/255), so it
    is binarized to 0/255 before the resize."""
    img = open_image(data, name)
    if nonzero:
        img = Image.fromarray(((np.asarray(to_rgb(img).convert("L")) > 0) * 255).astype(np.uint8))
    if img.mode != "L":
        img = to_rgb(img).convert("L")
    resized = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return resized > 0.5


Reader = Callable[[int], tuple[np.ndarray, "np.ndarray | None"]]


@dataclasses.dataclass(frozen=True)
class Split:
    """A split as per-image metadata and a reader that decodes one image on demand.

    Host memory grows with the number of images by a few bytes each (label, names), never
    by pixels: images and masks are decoded batch by batch as they are used
    (rdjax.data.pipeline), on each process only for its own share.
    """

    read: Reader = dataclasses.field(repr=False)  # record -> (uint8 (S, S, 3), bool (S, S) or None if no mask)
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
        """Row ``row``'s image at its file's own resolution (rdjax.tiling)."""
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
