"""Dataset 'mvtec', and what every dataset of image files shares (FileDataset): a
layout scanned into items, each category prepared once as an index of its files
(rdjax.data.index), decoded batch by batch as the official code decodes.

MVTec's own folder layout:
  <root>/<category>/train/good/*.png
  <root>/<category>/test/<type>/*.png               (type 'good' = normal)
  <root>/<category>/ground_truth/<type>/*_mask.png
Any folder in this layout works (the synthetic one and MPDD too; JPEG/BMP and upper-case
extensions are accepted). BTAD's variant reads as well: normal images in 'ok' folders
(train/ok, test/ok), anomalous in test/ko, masks named as their image (<stem>.png or .bmp).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rdjax.data import DatasetBuilder
from rdjax.data.index import Item, MVTecAD, load_split, prepare
from rdjax.data.preprocess import (
    IMAGE_EXTENSIONS,
    Recipe,
    Split,
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
