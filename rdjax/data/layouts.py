"""The layouts of datasets 'visa' (its official 1cls split CSV) and 'folder' (any
folders), other than MVTec AD's, scanned into the same train/test items that the TFDS builder in
mvtec.py stores.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from rdjax.data.index import Item
from rdjax.data.mvtec import FileDataset, dataset_root, images_in, requested
from rdjax.errors import DataError


def visa_csv(root: Path) -> Path:
    return root / "split_csv" / "1cls.csv"


def _visa_rows(root: Path) -> list[dict]:
    path = visa_csv(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root does not exist")
    if not path.is_file():
        raise DataError(f"{path}: no VisA split file (expected the official split_csv/1cls.csv under the root)")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    needed = {"object", "split", "label", "image", "mask"}
    if not rows or not needed <= set(rows[0]):
        raise DataError(f"{path}: expected columns {sorted(needed)}")
    return rows


def visa_categories(root: Path) -> list[str]:
    return sorted({r["object"] for r in _visa_rows(root)})


def scan_visa(root: Path, category: str) -> dict[str, list[Item]]:
    """Items of one VisA category from the 1cls split ('normal' -> good, 'anomaly' -> anomaly)."""
    rows = [r for r in _visa_rows(root) if r["object"] == category]
    if not rows:
        raise DataError(
            f"{visa_csv(root)}: no rows for category {category!r}; found: {', '.join(visa_categories(root))}"
        )
    items: dict[str, list[Item]] = {"train": [], "test": []}
    for r in rows:
        image = root / r["image"]
        if not image.is_file():
            raise DataError(f"{image}: listed in {visa_csv(root).name} but missing")
        normal = r["label"] == "normal"
        mask = None if normal or not r["mask"] else root / r["mask"]
        if not normal and (mask is None or not mask.is_file()):
            raise DataError(f"{mask or image}: mask of an anomalous image is missing")
        if r["split"] not in items:
            raise DataError(f"{visa_csv(root)}: unknown split {r['split']!r} for {r['image']}")
        items[r["split"]].append(Item(image, mask, "good" if normal else "anomaly"))
    if not items["train"]:
        raise DataError(f"{visa_csv(root)}: no training images for {category!r}")
    return items


def scan_folders(
    train_dir: str, test_good_dir: str, test_anomalous_dir: str, mask_dir: str = ""
) -> dict[str, list[Item]]:
    """Any folders: normal training images, normal and anomalous test images, and optional
    masks matched to anomalous images by file stem ('<stem>.png' or '<stem>_mask.png')."""
    for key, value in (
        ("train_dir", train_dir),
        ("test_good_dir", test_good_dir),
        ("test_anomalous_dir", test_anomalous_dir),
    ):
        if not value or not Path(value).is_dir():
            problem = "is empty" if not value else "does not exist" if not Path(value).exists() else "is not a folder"
            raise DataError(f"config.dataset.{key}={value!r}: {problem}")
    train = [Item(p, None, "good") for p in images_in(Path(train_dir))]
    if not train:
        raise DataError(f"{train_dir}: no training images (.png/.jpg/.bmp/.tif)")
    good = [Item(p, None, "good") for p in images_in(Path(test_good_dir))]
    anomalous = images_in(Path(test_anomalous_dir))
    if not good or not anomalous:
        raise DataError(f"{test_good_dir if not good else test_anomalous_dir}: no test images")
    masks = {}
    if mask_dir:
        if not Path(mask_dir).is_dir():
            raise DataError(f"config.dataset.mask_dir={mask_dir!r}: not a folder")
        masks = {p.stem.removesuffix("_mask"): p for p in images_in(Path(mask_dir))}
        missing = [p.name for p in anomalous if p.stem not in masks]
        if missing:
            raise DataError(
                f"{mask_dir}: no mask for {len(missing)} of {len(anomalous)} anomalous images (first: {missing[0]})"
            )
    bad = [Item(p, masks.get(p.stem), "anomalous") for p in anomalous]
    return {"train": train, "test": good + bad}


def visa(dataset: Any) -> FileDataset:
    """VisA with its official 1cls split; its masks mark defects with any non-zero value."""
    root = dataset_root(dataset)
    return FileDataset(
        root,
        dataset.data_dir or None,
        requested(dataset.category, lambda: visa_categories(root)),
        lambda category: scan_visa(root, category),
        prefix="visa_",
        nonzero_masks=True,
    )


def folder(dataset: Any) -> FileDataset:
    """Any folders of normal and anomalous images, masks optional; one category."""
    d = dataset
    return FileDataset(
        Path(d.train_dir).expanduser().parent,
        d.data_dir or None,
        lambda: [d.category],
        lambda _: scan_folders(d.train_dir, d.test_good_dir, d.test_anomalous_dir, d.mask_dir),
        prefix="folder_",
    )
