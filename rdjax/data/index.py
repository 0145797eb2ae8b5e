"""The prepared index of a category's image files: a tensorflow-datasets builder whose
records hold each file's path relative to the root, its label, defect type and name,
never pixels or file bytes, so preparing stays small at any dataset size (TFDS's writer
would otherwise spill more than 1 GB per split to temporary files through TensorFlow,
which rdjax does not need). Decoding (PIL) and the model's input recipe
(rdjax.data.preprocess.Recipe) happen batch by batch. A builder config is named after the
category and a fingerprint of its files' names and sizes, so an edited folder is never
served from a stale index, and a moved root still works (paths are relative).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from rdjax.data.preprocess import (
    Recipe,
    Split,
    check_mask_header,
    decode_image,
    decode_mask,
    header_size,
)
from rdjax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Item:
    image: Path
    mask: Path | None
    defect_type: str


def fingerprint(items: dict[str, list[Item]]) -> str:
    """Short hash of file names and sizes: a changed folder gets a fresh builder config."""
    h = hashlib.sha1()
    for split in sorted(items):
        for it in items[split]:
            for p in (it.image, it.mask):
                if p is not None:
                    h.update(f"{split}/{p.parent.name}/{p.name}:{p.stat().st_size};".encode())
    return h.hexdigest()[:10]


class MVTecConfig(tfds.core.BuilderConfig):
    def __init__(self, *, category: str, items: dict[str, list[Item]], **kwargs):
        name = f"{category}-{fingerprint(items)}"
        super().__init__(name=name, description=f"MVTec AD layout, category {category}", **kwargs)
        self.category = category
        self.items = items


class MVTecAD(tfds.core.GeneratorBasedBuilder):
    """MVTec AD (and any folder in its layout). One builder config per category."""

    name = "mvtec_ad"
    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "2.0.0": "Records hold file paths (relative to the manual dir), not file bytes.",
        "1.0.0": "Records held the encoded files.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad, extract "
        "mvtec_anomaly_detection.tar.xz and pass the folder holding the categories as the manual dir "
        "(config.dataset.root)."
    )

    def _log_download_bytes(self) -> None:
        """TFDS prints "Downloading and preparing dataset Unknown size" for a local folder;
        rdjax's log says what happens instead."""
        logging.info("indexing the files of %s into %s", self.builder_config.name, self.data_dir)

    def _log_download_done(self) -> None:
        pass  # TFDS prints "downloaded and prepared"; nothing was downloaded

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="MVTec AD: encoded image and mask files, labels and defect types.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Text(),  # the file's path relative to the manual dir
                    "mask": tfds.features.Text(),  # '' for good images
                    "label": tfds.features.ClassLabel(names=["good", "defect"]),
                    "defect_type": tfds.features.Text(),
                    "filename": tfds.features.Text(),
                }
            ),
            homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        items = self.builder_config.items
        root = Path(dl_manager.manual_dir)
        return {split: self._generate_examples(split_items, root) for split, split_items in items.items()}

    def _generate_examples(self, items: list[Item], root: Path) -> Iterator[tuple[str, dict]]:
        for it in items:
            key = f"{it.defect_type}/{it.image.name}"
            yield (
                key,
                {
                    "image": os.path.relpath(it.image, root),
                    "mask": os.path.relpath(it.mask, root) if it.mask is not None else "",
                    "label": 0 if it.defect_type == "good" else 1,
                    "defect_type": it.defect_type,
                    "filename": f"{it.defect_type}/{it.image.name}",
                },
            )


def prepare(
    root: str | os.PathLike,
    category: str,
    data_dir: str | os.PathLike | None,
    items: dict[str, list[Item]],
) -> MVTecAD:
    """Prepare a category's index once (``items``: its scanned, validated files); return
    the ready builder."""
    builder = MVTecAD(
        config=MVTecConfig(category=category, items=items),
        data_dir=str(data_dir) if data_dir else None,
        file_format="array_record",
    )
    tfds.display_progress_bar(False)  # a file list prepares in seconds: no bars of "examples"
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    finally:
        tfds.display_progress_bar(True)
    prune_prepared(Path(builder.data_dir).parent, category)
    return builder


KEEP_PREPARED = 3  # prepared copies kept per category name: a changed folder gets a fresh one


def prune_prepared(current: Path, category: str) -> None:
    """Keep this category's KEEP_PREPARED most recently used prepared copies, and delete
    older ones: each change to a folder's files prepares a new copy (a new fingerprint),
    which would otherwise pile up under the TFDS data dir. A copy is only the file list,
    so one deleted by mistake is prepared again in seconds."""
    os.utime(current)  # used now
    name = re.compile(rf"{re.escape(category)}-[0-9a-f]{{10}}")  # MVTecConfig's names
    copies = [p for p in current.parent.iterdir() if name.fullmatch(p.name)]
    copies.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in copies[KEEP_PREPARED:]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read(root: Path, relative: Any, name: str) -> bytes:
    try:
        return (root / _text(relative)).read_bytes()
    except OSError as e:
        raise DataError(
            f"{name}: cannot read ({e.strerror or e}); was it moved after the dataset was prepared?"
        ) from None


def load_split(builder: MVTecAD, split: str, recipe: Recipe, root: Path, nonzero_masks: bool = False) -> Split:
    """A prepared split as a lazy `Split` over the files under ``root``: one pass over the
    records reads the labels and names and checks each file (the pixels are decoded
    later, batch by batch). Rows are sorted by file name, a stable order whatever the
    storage order.

    Errors name the file as it lies under ``root``, e.g. a corrupt image or a mask whose
    size differs from its image's.
    """
    root = Path(root)
    source = builder.as_data_source()[split]
    n = len(source)

    def path_of(ex: Any) -> str:
        return os.path.normpath(root / _text(ex["image"]))

    def meta(i: int) -> tuple[str, str, int, bool]:
        """Names and label; the headers are checked here, so that an unreadable file or a
        mask of the wrong size fails before training starts."""
        ex = source[i]
        path = path_of(ex)
        size = header_size(_read(root, ex["image"], path), path)
        if ex["mask"]:
            name = f"{path} (its mask)"
            check_mask_header(_read(root, ex["mask"], name), size, name)
        return _text(ex["filename"]), _text(ex["defect_type"]), int(ex["label"]), bool(ex["mask"])

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        rows = list(pool.map(meta, range(n)))
    order = sorted(range(n), key=lambda i: rows[i][0])
    rows = [rows[i] for i in order]
    defective = [r for r in rows if r[2] != 0]

    def read(record: int) -> tuple[np.ndarray, np.ndarray | None]:
        ex = source[record]
        name = path_of(ex)
        image = recipe.image(decode_image(_read(root, ex["image"], name), name))
        if not ex["mask"]:
            return image, None
        mask_name = f"{name} (its mask)"
        return image, recipe.mask(decode_mask(_read(root, ex["mask"], mask_name), mask_name, nonzero=nonzero_masks))

    def read_native(record: int) -> np.ndarray:
        ex = source[record]
        name = path_of(ex)
        return decode_image(_read(root, ex["image"], name), name)

    return Split(
        read=read,
        read_native=read_native,
        records=np.asarray(order, np.int64),
        labels=np.array([r[2] for r in rows], np.int32),
        defect_types=tuple(r[1] for r in rows),
        filenames=tuple(r[0] for r in rows),
        image_size=recipe.size,
        has_masks=bool(defective) and all(r[3] for r in defective),
    )
