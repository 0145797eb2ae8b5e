"""Dataset 'realiad': Real-IAD (Wang et al., CVPR 2024) through its official split files.

  <Real-IAD>/realiad_1024/<category>/OK/S0001/<category>_0001_OK_C1_<time>.jpg
  <Real-IAD>/realiad_1024/<category>/NG/<class>/S0002/<category>_0002_NG_<class>_C3_<time>.jpg (+ .png mask)
  <Real-IAD>/realiad_jsons/<category>.json        (realiad_jsons_sv/, realiad_jsons_fuiad_0.x/ alike)

config.dataset.root is the folder of one resolution's images (realiad_256, realiad_512,
realiad_1024 or realiad_raw); the split files are read from the folder beside it that
config.dataset.split_set names (default 'realiad_jsons', the multi-view protocol; it may
also lie inside a realiad_jsons/ folder). A split file holds "meta" ("prefix": the
category's folder under the images, "normal_class": "OK") and "train" and "test" lists of
records {category, anomaly_class, image_path, mask_path}, paths relative to the prefix.

Each image is a row: a sample's five views (C1..C5) are five rows, and the file name,
kept as the row's name, carries the sample and the view (sample_and_view). As in the
official loader (Tencent's AnomalyDetection_Real-IAD, datasets/explicit_dataset.py), every
training record is trained on, and a test image is anomalous when its class is not the
normal class and it has a mask: a defective sample's views that do not show the defect are
listed as 'OK' without a mask, and count as normal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rdjax.data import DatasetBuilder
from rdjax.data.index import Item
from rdjax.data.mvtec import FileDataset, dataset_root, requested
from rdjax.errors import DataError

DEFAULT_SPLIT_SET = "realiad_jsons"
RECORD_KEYS = ("category", "anomaly_class", "image_path", "mask_path")
# <category>_<4 digits>_<OK | NG_CLASS>_C<view>_...: the sample is everything before the view.
NAME = re.compile(r"(?P<sample>.+_\d{4}_[A-Z][A-Z_]*[A-Z])_(?P<view>C\d)_")


def sample_and_view(filename: str) -> tuple[str, str]:
    """('audiojack_0002_NG_AK', 'C3') from a row's name ('AK/audiojack_0002_NG_AK_C3_<time>.jpg'):
    the key that groups a sample's five views (for a sample-level score, their maximum)."""
    match = NAME.match(Path(filename).name)
    if match is None:
        raise DataError(f"{filename}: not a Real-IAD image name (<category>_<NNNN>_<OK|NG_CLASS>_C<view>_...)")
    return match["sample"], match["view"]


def split_dir(root: Path, split_set: str) -> Path:
    """The folder of split files beside the images (or inside a realiad_jsons/ folder)."""
    candidates = [root.parent / split_set, root.parent / DEFAULT_SPLIT_SET / split_set]
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise DataError(
        f"{root}: no split files beside it (looked for {' and '.join(map(str, candidates))}); "
        f"config.dataset.root is a folder of Real-IAD images such as realiad_1024"
    )


def _read_split_file(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable split file ({type(e).__name__})") from None
    if not isinstance(info, dict) or not all(k in info for k in ("meta", "train", "test")):
        raise DataError(f"{path}: expected the keys 'meta', 'train' and 'test'")
    if not all(k in info["meta"] for k in ("prefix", "normal_class")):
        raise DataError(f"{path}: expected 'prefix' and 'normal_class' under 'meta'")
    return info


def scan_realiad(root: Path, folder: Path, category: str) -> dict[str, list[Item]]:
    """A category's training and test images from its split file; every listed file must
    exist and be named with its sample and view."""
    path = folder / f"{category}.json"
    if not path.is_file():
        found = sorted(p.stem for p in folder.glob("*.json"))
        raise DataError(f"{path}: no split file for {category!r}; found: {', '.join(found) or 'none'}")
    info = _read_split_file(path)
    base = root / info["meta"]["prefix"]
    normal = info["meta"]["normal_class"]
    items: dict[str, list[Item]] = {"train": [], "test": []}
    for split, records in items.items():
        for i, record in enumerate(info[split]):
            if not isinstance(record, dict) or not all(k in record for k in RECORD_KEYS):
                raise DataError(f"{path}: {split} record {i} lacks one of {', '.join(RECORD_KEYS)}")
            image = base / record["image_path"]
            if not image.is_file():
                raise DataError(f"{image}: listed in {path} but missing")
            sample_and_view(image.name)
            anomalous = split == "test" and record["anomaly_class"] != normal and bool(record["mask_path"])
            mask = base / record["mask_path"] if anomalous else None
            if mask is not None and not mask.is_file():
                raise DataError(f"{mask}: the mask of {image.name}, listed in {path}, is missing")
            records.append(Item(image, mask, record["anomaly_class"] if anomalous else "good"))
        if not records:
            raise DataError(f"{path}: no {split} records")
    return items


def realiad(dataset: Any) -> FileDataset:
    """Real-IAD, one resolution's images (config.dataset.root) with one set of split files
    (config.dataset.split_set); masks mark defects with any non-zero value."""
    root = dataset_root(dataset)
    folder = split_dir(root, dataset.split_set)
    return FileDataset(
        root,
        dataset.data_dir or None,
        requested(dataset.category, lambda: sorted(p.stem for p in folder.glob("*.json"))),
        lambda category: scan_realiad(root, folder, category),
        prefix="realiad_",
        nonzero_masks=True,
    )


DATASET: DatasetBuilder = realiad
