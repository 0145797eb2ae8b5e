"""Input pipelines: dataset builders, preprocessing and batching."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from rdjax.data import mvtec, synthetic
from rdjax.data.mvtec import DataError, Split

DATASETS = ("mvtec", "synthetic")


def dataset_root(config: ml_collections.ConfigDict) -> Path:
    """The folder holding the categories; the synthetic one is generated when absent."""
    name = config.dataset.name
    if name not in DATASETS:
        raise DataError(f"unknown dataset.name {name!r}; choose one of {DATASETS}")
    if not config.dataset.root:
        raise DataError("config.dataset.root is empty; set --config.dataset.root=/path/to/mvtec_anomaly_detection")
    root = Path(config.dataset.root).expanduser()
    if name == "synthetic":
        synthetic.generate(root, seed=config.dataset.synthetic_seed)
    return root


def load_dataset(config: ml_collections.ConfigDict) -> tuple[Split, Split]:
    """(train, test) splits of config.dataset.category, decoded at config.image_size."""
    root = dataset_root(config)
    builder = mvtec.prepare(root, config.dataset.category, config.dataset.data_dir or None)
    size = config.image_size
    return (
        mvtec.load_split(builder, "train", size, desc="decoding train"),
        mvtec.load_split(builder, "test", size, desc="decoding test"),
    )
