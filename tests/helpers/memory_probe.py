"""Run in a fresh process: `memory_probe.py ROOT WORKDIR` prints the peak bytes allocated
through Python and numpy (tracemalloc sees numpy's buffers) during one epoch plus
evaluation of the demo config at 128 px on the generated ROOT, from the disk cache with
binned metrics, after a warm-up run of the same config so that nothing is compiled or
cached while measured. A fresh process, so that what other tests left behind in a
pytest worker (their objects, caches and garbage) is not part of the measurement."""

import gc
import sys
import tracemalloc
from pathlib import Path

from rdjax import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest
from conftest import small_config  # noqa: E402


def peak(root: Path, workdir: Path) -> int:
    config = small_config(root, image_size=128, feature_cache="disk", exact_metrics_max_pixels=0)
    train.train_and_evaluate(config, workdir / "warm")
    gc.collect()
    tracemalloc.start()
    try:
        train.train_and_evaluate(config, workdir / "measured")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


if __name__ == "__main__":
    print(f"peak {peak(Path(sys.argv[1]), Path(sys.argv[2]))}")
