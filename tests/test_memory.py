"""Host memory does not grow with the data: the guard, at a small scale, of the flat
memory that experiments/scale.py measures at large ones (docs/scaling.md)."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from conftest import small_config
from rdjax import train

pytestmark = pytest.mark.slow


def _peak(root, workdir) -> int:
    """Peak bytes allocated through Python and numpy (tracemalloc sees numpy's buffers)
    during one epoch plus evaluation from the disk cache with binned metrics, after a
    warm-up run of the same config, so that nothing is compiled or cached while measured."""
    config = small_config(root, image_size=128, feature_cache="disk", exact_metrics_max_pixels=0)
    train.train_and_evaluate(config, workdir / "warm")
    gc.collect()
    tracemalloc.start()
    try:
        train.train_and_evaluate(config, workdir / "measured")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_host_memory_does_not_grow_with_the_number_of_images(synthetic_data, tmp_path):
    """16 against 128 training images and 13 against 52 test images at 128 px. Holding
    the 112 extra training images would add 112 * 48 KB = 5.4 MB, their resnet18
    features 112 * 459 KB = 51 MB, the extra test images and maps 39 * 112 KB = 4.4 MB.
    What may grow is per-image bookkeeping (the file index, names, labels, scores, the
    epoch's order: measured 1.1 MB in all, about 7 KB per image) and allocator noise
    (up to 0.8 MB between runs in the full suite). So the bound is 3 MB: above what
    bookkeeping and noise reach, below the smallest growth that holding any per-image
    array would cause."""
    small = synthetic_data(size=128, num_train=16, num_test_good=4, num_per_defect=3)
    large = synthetic_data(size=128, num_train=128, num_test_good=16, num_per_defect=12)
    grow = _peak(large, tmp_path / "large") - _peak(small, tmp_path / "small")
    print(f"peak grew by {grow / 2**20:.2f} MB")
    assert grow < 3 * 2**20, grow
