"""Host memory does not grow with the data: the guard, at a small scale, of the flat
memory that experiments/scale.py measures at large ones (docs/scaling.md)."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT, subprocess_run

pytestmark = pytest.mark.slow


def _peak(root, workdir) -> int:
    """tests/helpers/memory_probe.py's peak for ``root``, in a fresh process."""
    proc = subprocess_run(sys.executable, str(ROOT / "tests" / "helpers" / "memory_probe.py"), str(root), str(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split("peak ")[-1])


def test_host_memory_does_not_grow_with_the_number_of_images(synthetic_data, tmp_path):
    """16 against 128 training images and 13 against 52 test images at 128 px. Holding
    the 112 extra training images would add 112 * 48 KB = 5.4 MB, their resnet18
    features 112 * 459 KB = 51 MB, the extra test images and maps 39 * 112 KB = 4.4 MB.
    What may grow is per-image bookkeeping (the file index, names, labels, scores, the
    epoch's order: a few KB per image, under 1 MB for 112 images) and allocator noise. The
    peaks are taken in fresh processes: inside a pytest worker, other tests' objects and
    garbage would join the peak. So the bound is 3 MB: above what bookkeeping and noise
    reach, below the smallest growth that holding any per-image array would cause."""
    small = synthetic_data(size=128, num_train=16, num_test_good=4, num_per_defect=3)
    large = synthetic_data(size=128, num_train=128, num_test_good=16, num_per_defect=12)
    grow = _peak(large, tmp_path / "large") - _peak(small, tmp_path / "small")
    print(f"peak grew by {grow / 2**20:.2f} MB")
    assert grow < 3 * 2**20, grow
