"""Files -> decoded splits. A dataset is chosen by name (config.dataset.name) from
`rdjax.registry.DATASETS`; each entry builds an object with

    categories() -> list[str]          the categories the config asks for ('all' expanded)
    load(category, image_size) -> (train Split, test Split)
    summary_keys                       the metrics of the table over categories

so the training loop never asks which dataset it is running on.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from rdjax.data.preprocess import Split
from rdjax.errors import ConfigError
from rdjax.registry import DATASETS


class Dataset(Protocol):
    summary_keys: tuple[str, ...]

    def categories(self) -> list[str]: ...

    def load(self, category: str, image_size: int) -> tuple[Split, Split]: ...


def build(dataset_config: Any) -> Dataset:
    """The dataset config.dataset names, resolved once (an archive extracted, synthetic
    data generated) so that listing and loading categories has no further side effects."""
    return DATASETS.get(dataset_config.name)(dataset_config)


def hold_out(split: Split, size: int, seed: int) -> tuple[Split, Split | None]:
    """Take ``size`` normal images out of training, chosen by the seed, for threshold
    calibration; (split, None) when none are asked for."""
    if size <= 0:
        return split, None
    if size >= len(split):
        raise ConfigError(f"config.threshold.validation_size={size} leaves no training images (there are {len(split)})")
    order = np.random.default_rng([seed, 7]).permutation(len(split))
    return split.subset(np.sort(order[size:])), split.subset(np.sort(order[:size]))
