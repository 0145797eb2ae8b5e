"""Files -> decoded splits. A dataset is chosen by name (config.dataset.name) from
`rdjax.registry.DATASETS`: the module `rdjax.data.<name>` exports `DATASET`, a builder
that takes config.dataset and returns a `Dataset`, so the training loop never asks which
dataset it is running on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from rdjax.data.preprocess import Recipe, Split
from rdjax.errors import ConfigError


class Dataset(Protocol):
    @property
    def summary_keys(self) -> tuple[str, ...]:
        """The metrics of the table over categories; () for all of rdjax.scoring.metrics.TABLE_KEYS
        (a dataset module cannot import the metrics, which come after it on the data path)."""
        ...

    @property
    def unifiable(self) -> bool:
        """Whether one model may train on all its categories (config.setting='unified'):
        not where the categories are one set's classes, each the others' anomalies."""
        ...

    def categories(self) -> list[str]:
        """The categories the config asks for ('all' expanded)."""
        ...

    def load(self, category: str, recipe: Recipe) -> tuple[Split, Split]:
        """(train, test) splits whose rows are model inputs as ``recipe`` makes them,
        decoded lazily."""
        ...


DatasetBuilder = Callable[[Any], Dataset]


def held_out_count(size: float, images: int) -> int:
    """config.threshold.validation_size as a count: a fraction (0 < size < 1) of the
    training images, rounded, at least one; or a number of images (size >= 1)."""
    if size <= 0:
        return 0
    if size < 1:
        return max(int(round(size * images)), 1)
    if size != int(size):
        raise ConfigError(f"config.threshold.validation_size={size} must be a fraction below 1 or a whole number")
    return int(size)


def hold_out(split: Split, size: float, seed: int) -> tuple[Split, Split | None]:
    """Take normal images out of training (``size``: see held_out_count), chosen by the
    seed, for threshold calibration; (split, None) when none are asked for."""
    count = held_out_count(size, len(split))
    if count == 0:
        return split, None
    if count >= len(split):
        raise ConfigError(f"config.threshold.validation_size={size} leaves no training images (there are {len(split)})")
    order = np.random.default_rng([seed, 7]).permutation(len(split))
    return split.subset(np.sort(order[count:])), split.subset(np.sort(order[:count]))
