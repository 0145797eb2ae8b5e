"""Host memory does not grow with the data: the guard, at a small scale, of the flat
memory that experiments/scale.py measures at large ones (docs/scaling.md)."""

from __future__ import annotations

import tracemalloc

import pytest

from conftest import small_config
from rdjax import train

pytestmark = pytest.mark.slow


def _peak(root, workdir) -> int:
    """Peak bytes allocated through Python and numpy (tracemalloc sees numpy's buffers)
    during one epoch plus evaluation from the disk cache with binned metrics."""
    config = small_config(root, feature_cache="disk", exact_metrics_max_pixels=0)
    train.train_and_evaluate(config, workdir / "warm")  # compile first: the measured runs trace nothing new
    tracemalloc.start()
    try:
        train.train_and_evaluate(config, workdir / "measured")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_host_memory_does_not_grow_with_the_number_of_images(synthetic_data, tmp_path):
    """16 against 80 training images and 13 against 52 test images at 64 px. Holding the
    extra images would add 64 * 12 KB = 786 KB, their resnet18 features 64 * 115 KB = 7 MB,
    the extra test maps 39 * 16 KB = 640 KB; per-image metadata (names, labels, scores)
    is ~0.2 KB each, 20 KB in all. So the peak may grow by at most 300 KB."""
    small = synthetic_data(num_train=16, num_test_good=4, num_per_defect=3)
    large = synthetic_data(num_train=80, num_test_good=16, num_per_defect=12)
    grow = _peak(large, tmp_path / "large") - _peak(small, tmp_path / "small")
    assert grow < 300 * 1024, grow
