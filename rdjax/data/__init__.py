"""Files -> decoded splits. A dataset is chosen by name (config.dataset.name) from
`rdjax.registry.DATASETS`: the module `rdjax.data.<name>` exports `DATASET`, a builder
that takes config.dataset and returns a `Dataset`, so the training loop never asks which
dataset it is running on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from rdjax.data.preprocess import Split
from rdjax.errors import ConfigError


class Dataset(Protocol):
    @property
    def summary_keys(self) -> tuple[str, ...]:
        """The metrics of the table over categories."""
        ...

    def categories(self) -> list[str]:
        """The categories the config asks for ('all' expanded)."""
        ...

    def load(self, category: str, image_size: int) -> tuple[Split, Split]:
        """(train, test) splits, decoded lazily."""
        ...


DatasetBuilder = Callable[[Any], Dataset]


def hold_out(split: Split, size: int, seed: int) -> tuple[Split, Split | None]:
    """Take ``size`` normal images out of training, chosen by the seed, for threshold
    calibration; (split, None) when none are asked for."""
    if size <= 0:
        return split, None
    if size >= len(split):
        raise ConfigError(f"config.threshold.validation_size={size} leaves no training images (there are {len(split)})")
    order = np.random.default_rng([seed, 7]).permutation(len(split))
    return split.subset(np.sort(order[size:])), split.subset(np.sort(order[:size]))
