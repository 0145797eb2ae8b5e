"""Datasets 'mvtec' (and the layout shared by every folder dataset): a
tensorflow-datasets builder over image files, and decoding as the official code.

The builder reads MVTec's own folder layout from a manual directory:
  <root>/<category>/train/good/*.png
  <root>/<category>/test/<type>/*.png               (type 'good' = normal)
  <root>/<category>/ground_truth/<type>/*_mask.png
Any folder in this layout works (the synthetic one and MPDD too; JPEG/BMP and upper-case
extensions are accepted). BTAD's variant reads as well: normal images in 'ok' folders
(train/ok, test/ok), anomalous in test/ko, masks named as their image (<stem>.png or .bmp).

The prepared dataset is an index: each record holds a file's path relative to the root,
its label, defect type and name, never pixels or file bytes,
so preparing stays small at any dataset size (TFDS's writer would otherwise spill more
than 1 GB per split to temporary files through TensorFlow, which rdjax does not need).
Decoding (PIL) and the model's input recipe (rdjax.data.preprocess.Recipe) happen batch
by batch. A
builder config is named after the category and a fingerprint of its files' names and
sizes, so an edited folder is never served from a stale index, and a moved root still
works (paths are relative).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from rdjax.data import DatasetBuilder
from rdjax.data.preprocess import (
    IMAGE_EXTENSIONS,
    Recipe,
    Split,
    check_mask_header,
    decode_image,
    decode_mask,
    header_size,
)
from rdjax.errors import DataError

# ----------------------------------------------------------------------------- layout


def images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_categories(root: str | os.PathLike, test: str = "test") -> list[str]:
    """Categories under ``root``: folders that hold both train/ and ``test``/."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "train").is_dir() and (p / test).is_dir())


@dataclasses.dataclass(frozen=True)
class Item:
    image: Path
    mask: Path | None
    defect_type: str


def normal_folder(directory: Path) -> str:
    """The name of the folders of normal images: 'good', or BTAD's 'ok' (train/ok)."""
    return "ok" if (directory / "train" / "ok").is_dir() and not (directory / "train" / "good").is_dir() else "good"


def scan_category(
    root: str | os.PathLike, category: str, test: str = "test", ground_truth: str = "ground_truth"
) -> dict[str, list[Item]]:
    """Pair every test image with its mask; raise DataError naming what is wrong.

    ``test`` and ``ground_truth``: the folders of test images and of their masks, relative
    to the category (MVTec AD 2 has test_public/ and test_public/ground_truth/). Normal
    images get the defect type 'good' whatever their folder is called ('ok' in BTAD)."""
    root = Path(root)
    directory = root / category
    if not root.is_dir():
        raise DataError(f"{root}: dataset root does not exist")
    if not (directory / "train").is_dir() or not (directory / test).is_dir():
        found = list_categories(root, test)
        raise DataError(
            f"{directory}: no such category (needs train/ and {test}/); found: {', '.join(found) or 'none'}"
        )
    good = normal_folder(directory)
    train = [Item(p, None, "good") for p in images_in(directory / "train" / good)]
    if not train:
        raise DataError(f"{directory / 'train' / good}: no training images (.png/.jpg/.bmp/.tif)")
    test_items: list[Item] = []
    for type_dir in sorted(p for p in (directory / test).iterdir() if p.is_dir() and p != directory / ground_truth):
        images = images_in(type_dir)
        if type_dir.name == good:
            test_items += [Item(p, None, "good") for p in images]
            continue
        mask_dir = directory / ground_truth / type_dir.name
        masks = {p.stem.removesuffix("_mask"): p for p in images_in(mask_dir)}
        missing = [p.name for p in images if p.stem not in masks]
        if missing:
            raise DataError(
                f"{mask_dir}: no mask for {len(missing)} of {len(images)} '{type_dir.name}' images "
                f"(first: {missing[0]}, expected {Path(missing[0]).stem}_mask.png or {Path(missing[0]).stem}.png)"
            )
        orphans = sorted(set(masks) - {p.stem for p in images})
        if orphans:
            raise DataError(
                f"{masks[orphans[0]]}: mask without an image ({len(orphans)} such masks; "
                f"{len(masks)} masks for {len(images)} '{type_dir.name}' images)"
            )
        test_items += [Item(p, masks[p.stem], type_dir.name) for p in images]
    if not test_items:
        raise DataError(f"{directory / test}: no test images")
    return {"train": train, "test": test_items}


def fingerprint(items: dict[str, list[Item]]) -> str:
    """Short hash of file names and sizes: a changed folder gets a fresh builder config."""
    h = hashlib.sha1()
    for split in sorted(items):
        for it in items[split]:
            for p in (it.image, it.mask):
                if p is not None:
                    h.update(f"{split}/{p.parent.name}/{p.name}:{p.stat().st_size};".encode())
    return h.hexdigest()[:10]


# ----------------------------------------------------------------------------- TFDS builder


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
    data_dir: str | os.PathLike | None = None,
    items: dict[str, list[Item]] | None = None,
) -> MVTecAD:
    """Scan (MVTec layout unless ``items`` are given), validate and (once) prepare a
    category; return the ready builder."""
    items = scan_category(root, category) if items is None else items
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


# ----------------------------------------------------------------------------- the dataset


@dataclasses.dataclass(frozen=True)
class FileDataset:
    """A dataset of image files, prepared once per category through the TFDS builder.

    ``scan`` lists a category's items (and validates them, naming any bad file);
    ``names`` are the categories the config asks for. Used by every file-based dataset
    (MVTec layout, synthetic, VisA, any folders), which differ only in how they scan.
    """

    root: Path
    data_dir: str | None
    names: Callable[[], list[str]]
    scan: Callable[[str], dict[str, list[Item]]]
    prefix: str = ""  # builder config names: distinct per layout, so caches never mix
    nonzero_masks: bool = False  # masks mark defects with any non-zero value (VisA)
    summary_keys: tuple[str, ...] = ()  # every metric of the table (rdjax.data.Dataset)
    unifiable: bool = True

    def categories(self) -> list[str]:
        return self.names()

    def load(self, category: str, recipe: Recipe) -> tuple[Split, Split]:
        """(train, test) as ``recipe`` makes model inputs, decoded lazily. With several processes, process 0
        prepares the data first and the others wait, so no two write the same folder."""
        import jax
        from jax.experimental import multihost_utils

        def ready() -> MVTecAD:
            return prepare(self.root, f"{self.prefix}{category}", self.data_dir, items=self.scan(category))

        if jax.process_count() > 1:
            if jax.process_index() == 0:
                ready()
            multihost_utils.sync_global_devices("rdjax: dataset prepared")
        builder = ready()
        train, test = (
            load_split(builder, split, recipe, self.root, nonzero_masks=self.nonzero_masks)
            for split in ("train", "test")
        )
        return train, test


def requested(category: str, available: Callable[[], list[str]]) -> Callable[[], list[str]]:
    """dataset.category as a list: every available category for 'all', those named for a
    comma-separated list (checked before any is trained, so a misspelt last one does not
    fail hours in), else the one named."""
    if category == "all":
        return available
    if "," not in category:
        return lambda: [category]
    wanted = list(dict.fromkeys(c.strip() for c in category.split(",") if c.strip()))
    if not wanted:
        raise DataError(f"config.dataset.category={category!r} names no category; give 'a,b', one, or 'all'")

    def names() -> list[str]:
        found = available()
        unknown = [c for c in wanted if c not in found]
        if unknown:
            raise DataError(
                f"config.dataset.category={category!r}: no category {', '.join(map(repr, unknown))}; "
                f"found: {', '.join(found) or 'none'}"
            )
        return wanted

    return names


def extract_archive(archive: Path, cache: Path) -> Path:
    """Unpack the official mvtec_anomaly_detection.tar.xz once; return the folder of categories.

    Extraction goes to a temporary folder renamed into place when complete, so an
    interrupted extraction is never mistaken for a dataset.
    """
    import shutil
    import tarfile
    import tempfile

    if not archive.is_file():
        raise DataError(f"{archive}: no such archive")
    target = cache / "extracted" / archive.name.split(".tar")[0]
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract."))
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            entries = list(tmp.iterdir())
            inner = entries[0] if len(entries) == 1 and not list_categories(tmp) else tmp
            inner.rename(target)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{archive}: cannot extract ({e})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def tfds_dir(dataset: Any) -> Path:
    return Path(dataset.data_dir or Path.home() / "tensorflow_datasets").expanduser()


def dataset_root(dataset: Any) -> Path:
    """config.dataset.root as a folder of categories; an official archive is extracted once."""
    if not dataset.root:
        raise DataError(f"config.dataset.root is empty; set --config.dataset.root=/path/to/{dataset.name}")
    root = Path(dataset.root).expanduser()
    if root.name.endswith((".tar.xz", ".tar.gz", ".tar")):
        root = extract_archive(root, tfds_dir(dataset))
    if not root.is_dir():  # before any category is listed: a missing root is not an empty one
        raise DataError(f"{root}: {'not a folder' if root.exists() else 'does not exist'} (config.dataset.root)")
    return root


def mvtec_layout(root: Path, dataset: Any) -> FileDataset:
    return FileDataset(
        root,
        dataset.data_dir or None,
        requested(dataset.category, lambda: list_categories(root)),
        lambda category: scan_category(root, category),
    )


def mvtec(dataset: Any) -> FileDataset:
    """MVTec AD, or any folder in its layout (the official .tar.xz is accepted too)."""
    return mvtec_layout(dataset_root(dataset), dataset)


DATASET: DatasetBuilder = mvtec
