"""Datasets 'mnist', 'fashion_mnist', 'cifar10': one-class novelty detection (the paper's
Table 3).

Train on the training images of one class; test on the whole test split, where that class
is normal and the nine others anomalous. Grayscale becomes 3 channels, and images are
resized to image_size by the model's recipe (RD4AD's: PIL bilinear, as the official
helpers' torchvision Resize). There are no
masks: only image-level metrics are reported.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from rdjax.data.preprocess import Recipe, Split
from rdjax.errors import DataError
from rdjax.runtime.weights import offline

CLASSES = tuple(str(c) for c in range(10))


def _sources(name: str, data_dir: str | None) -> dict:
    """{'train', 'test'} random-access sources, preparing the dataset with TFDS if needed."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        try:
            return {split: builder.as_data_source(split=split) for split in ("train", "test")}
        except NotImplementedError:  # prepared as tfrecord (TFDS's default), which has no random access
            raise DataError(
                f"{builder.data_dir}: {name} is prepared as tfrecord, which rdjax cannot read row by row; "
                f"set config.dataset.data_dir to another folder (rdjax prepares it as array_record there)"
            ) from None
    if offline():
        raise DataError(
            f"offline (RDJAX_OFFLINE=1): {name} is not prepared in {builder.data_dir}; prepare it once with "
            f"network access, or copy a prepared {name} there"
        )
    try:
        builder.download_and_prepare(file_format="array_record")
    except ImportError as e:
        raise DataError(
            f"preparing {name} with tensorflow-datasets needs TensorFlow ({e}); pip install tensorflow, "
            f"or prepare it once elsewhere into config.dataset.data_dir"
        ) from None
    return {split: builder.as_data_source(split=split) for split in ("train", "test")}


def _read_record(source: Any, recipe: Recipe, i: int) -> tuple[np.ndarray, None]:
    image = np.asarray(source[i]["image"])
    rgb = np.asarray(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB"), np.uint8)
    return recipe.image(rgb), None


def load_novelty(name: str, normal_class: int, recipe: Recipe, data_dir: str | None) -> tuple[Split, Split]:
    """(train, test) as lazy splits: one pass reads the labels, pixels are decoded on demand."""
    if normal_class not in range(10):
        raise DataError(f"config.dataset.normal_class={normal_class} must be 0..9 or 'all'")
    sources = _sources(name, data_dir)
    splits = []
    for split in ("train", "test"):
        source = sources[split]
        labels = np.array([int(source[i]["label"]) for i in range(len(source))])
        keep = np.flatnonzero(labels == normal_class) if split == "train" else np.arange(len(source))
        if split == "train" and not len(keep):
            raise DataError(f"{name}: no training images of class {normal_class}")
        anomalous = (labels[keep] != normal_class).astype(np.int32)
        splits.append(
            Split(
                read=functools.partial(_read_record, source, recipe),
                records=keep.astype(np.int64),
                labels=anomalous,
                defect_types=tuple("good" if a == 0 else f"class_{labels[i]}" for a, i in zip(anomalous, keep)),
                filenames=tuple(f"{split}/{i:05d}" for i in keep),
                image_size=recipe.size,
                has_masks=False,
            )
        )
    return splits[0], splits[1]


@dataclasses.dataclass(frozen=True)
class NoveltyDataset:
    """One problem per normal class, named 'class_<c>' (dataset.normal_class, or all ten)."""

    name: str
    normal_class: str
    data_dir: str | None
    summary_keys: tuple[str, ...] = ("image_auroc", "image_auroc_sum")
    unifiable: bool = False  # the classes are each other's anomalies

    def categories(self) -> list[str]:
        """'all', one class or a comma-separated list of them ('0,3')."""
        named = self.normal_class.split(",")
        classes = CLASSES if self.normal_class == "all" else tuple(dict.fromkeys(c.strip() for c in named))
        if not set(classes) <= set(CLASSES):
            raise DataError(
                f"config.dataset.normal_class={self.normal_class!r} must be 0..9, a list of them such as '0,3', "
                "or 'all'"
            )
        return [f"class_{c}" for c in classes]

    def load(self, category: str, recipe: Recipe) -> tuple[Split, Split]:
        return load_novelty(self.name, int(category.removeprefix("class_")), recipe, self.data_dir)


def builder(name: str) -> Callable[[Any], NoveltyDataset]:
    """The DATASET of rdjax.data.<name>, for the novelty benchmarks."""
    return lambda dataset: NoveltyDataset(name, str(dataset.normal_class), dataset.data_dir or None)
