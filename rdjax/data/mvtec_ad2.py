"""Dataset 'mvtec_ad2': MVTec AD 2 (Heckler-Kram et al., 2025), its folders as published:

  <root>/<category>/train/good/*.png                 training images
  <root>/<category>/validation/good/*.png            normal images for calibration
  <root>/<category>/test_public/{good,bad}/*.png     the test set with labels
  <root>/<category>/test_public/ground_truth/bad/<stem>_mask.png
  <root>/<category>/test_private/NNN_regular.png     no labels: the evaluation server's
  <root>/<category>/test_private_mixed/NNN_mixed.png

Training reads train/good and evaluation test_public, through the same builder as MVTec AD
(rdjax.data.mvtec). validation/good is left to the user: rdjax's thresholds come from
normal images held out of train/good (config.threshold.validation_size), the same role.
The images are large and not square, so each split reads them at their own resolution
too (Split.read_native) for config.resize.mode 'fit' and 'tile'.

The private test sets are scored only by MVTec's server: `rdjax predict
--format=mvtec_ad_2` writes them in the layout of MVTec's check_and_prepare_data_for_upload.py
(SUBMISSION_SPLITS, submission_name, write_submission).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rdjax.data import DatasetBuilder
from rdjax.data.mvtec import FileDataset, dataset_root, images_in, list_categories, requested, scan_category
from rdjax.errors import DataError

CATEGORIES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
TEST = "test_public"
GROUND_TRUTH = "test_public/ground_truth"
SUBMISSION_SPLITS = ("test_private", "test_private_mixed")
MAPS = "anomaly_images"  # float16 single-channel TIFF per input image
THRESHOLDED = "anomaly_images_thresholded"  # uint8 PNG, 0 or 255, per input image


def private_images(category_dir: Path) -> list[tuple[str, Path]]:
    """(split, file) of every image of the private test sets of one category folder; a
    DataError naming the folder if either set is missing or empty."""
    out = []
    for split in SUBMISSION_SPLITS:
        files = images_in(category_dir / split)
        if not files:
            raise DataError(
                f"{category_dir / split}: no images; --format=mvtec_ad_2 takes a category folder of "
                f"MVTec AD 2 (one of {', '.join(CATEGORIES)}), holding {' and '.join(SUBMISSION_SPLITS)}"
            )
        out += [(split, f) for f in files]
    return out


def submission_name(category: str, split: str, image: Path, thresholded: bool) -> Path:
    """Where the server expects the map of ``image``: its relative path with the folder of
    maps in front and .tiff (.png when thresholded) for its extension."""
    suffix = ".png" if thresholded else ".tiff"
    return Path(THRESHOLDED if thresholded else MAPS, category, split, image.stem + suffix)


def write_submission(
    out: Path, category: str, split: str, image: Path, amap: np.ndarray, mask: np.ndarray | None
) -> None:
    """The (H, W) float16 TIFF of ``amap`` (the input's resolution) and, when given, the
    8-bit grayscale PNG of ``mask`` as 0/255. Pillow has no float16 image mode, so the TIFF
    is written by tifffile, the library MVTec's checker reads it with."""
    import tifffile
    from PIL import Image

    path = out / submission_name(category, split, image, thresholded=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.asarray(amap, np.float16))
    if mask is not None:
        path = out / submission_name(category, split, image, thresholded=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path)


def mvtec_ad2(dataset: Any) -> FileDataset:
    """Train on train/good, evaluate on test_public (config.dataset.root: the folder of the
    category folders)."""
    root = dataset_root(dataset)
    return FileDataset(
        root,
        dataset.data_dir or None,
        requested(dataset.category, lambda: list_categories(root, TEST)),
        lambda category: scan_category(root, category, TEST, GROUND_TRUTH),
        prefix="mvtec_ad2_",
    )


DATASET: DatasetBuilder = mvtec_ad2
