"""An evaluation pass: the maps of every image of a split, reduced batch by batch to what
the metrics need, so that memory does not grow with the test set (maps -> metrics).

Each process decodes only its share of each global batch; the pixel histograms are
summed over hosts inside the jitted step; per-image numbers (score, map sum, the paper's
per-image PRO) are gathered, since they are one float per image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tqdm

from rdjax import maps as maps_lib
from rdjax import metrics
from rdjax.data.pipeline import load_batches, padded, prefetch
from rdjax.data.preprocess import Split
from rdjax.sharding import gather, local_rows, local_share

Variables = dict[str, Any]


@dataclasses.dataclass
class PassResult:
    """What an evaluation pass keeps: a few numbers per image and the pixel statistics."""

    scores: np.ndarray  # (N,) image scores, the map's max
    sums: np.ndarray  # (N,) the map's sum (the novelty benchmarks' image score)
    pro_images: np.ndarray  # (N,) the RD4AD paper's per-image PRO, NaN where undefined
    pixels: metrics.PixelStats


Tiler = Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]


def run_pass(
    pass_step: Callable,
    teacher_vars: Variables,
    student_vars: Variables,
    split: Split,
    batch_size: int,
    put: Callable[[Any], Any],
    exact: bool,
    kind: str = "test",
    tiler: Tiler | None = None,
) -> PassResult:
    """Maps of every row of ``split`` exactly once, in global batches of ``batch_size``
    (the last padded, its padding masked out), each process decoding only its share.
    Kept: one score, one sum and one per-image PRO per image, and the binned pixel
    statistics summed over hosts; with ``exact``, every map and mask too (small sets).

    ``tiler`` (config.resize 'fit' or 'tile'): this process's images at their own
    resolution -> (maps at image_size, scores), computed on the host's side of the
    batch; ``pass_step`` then only reduces them (maps.stats_step). Without it,
    ``pass_step`` computes the maps of the squeezed images too."""
    n = len(split)
    global_batches = [padded(np.arange(s, min(s + batch_size, n)), batch_size) for s in range(0, n, batch_size)]
    local = [local_share(rows) for rows, _ in global_batches]
    local_valid = [local_share(np.arange(batch_size) < valid) for _, valid in global_batches]

    def prepare(item: tuple[dict, np.ndarray, np.ndarray]) -> tuple:
        batch, rows, valid = item
        weights, regions = zip(*(metrics.region_weights(m) for m in batch["mask"]))
        inputs = (batch["image"],) if tiler is None else tiler([split.native_image(r) for r in rows])
        host = (*inputs, batch["mask"], np.stack(weights).astype(np.float32), np.asarray(regions, np.int32), valid)
        return (batch["mask"], valid), put(host)

    scores, sums, pro_images, kept_maps, kept_masks = [], [], [], [], []
    hist = {k: np.zeros(maps_lib.NUM_BINS, np.int64 if k != "pro" else np.float64) for k in ("neg", "pos", "pro")}
    lo, hi, num_regions = np.inf, -np.inf, 0
    batches = zip(load_batches(split, local, kind, with_masks=True), local, local_valid)
    bar = tqdm.tqdm(
        total=n, desc=f"evaluating {kind}", unit="img", leave=False, disable=None if jax.process_index() == 0 else True
    )
    for (_, valid_count), ((host_masks, host_valid), device) in zip(global_batches, prefetch(batches, prepare)):
        maps, batch_scores, batch_sums, stats = pass_step(teacher_vars, student_vars, *device)
        for k in hist:
            hist[k] += np.asarray(stats[k])
        lo, hi = min(lo, float(stats["lo"])), max(hi, float(stats["hi"]))
        num_regions += int(stats["regions"])
        scores.append(gather(batch_scores)[:valid_count])
        sums.append(gather(batch_sums)[:valid_count])
        mine = local_rows(maps)
        per_image = np.array(
            [metrics.pro_rd4ad_image(m, k) if v else np.nan for m, k, v in zip(mine, host_masks, host_valid)],
            np.float32,
        )
        pro_images.append(gather(put(per_image))[:valid_count])
        if exact:
            kept_maps.append(gather(maps)[:valid_count])
            kept_masks.append(gather(device[-4])[:valid_count])
        bar.update(valid_count)
    bar.close()
    pixels = metrics.PixelStats(
        lo=lo,
        hi=hi,
        edges=maps_lib.bin_edges(),
        neg=hist["neg"],
        pos=hist["pos"],
        pro=hist["pro"],
        num_regions=num_regions,
    )
    if exact:
        pixels = dataclasses.replace(pixels, maps=np.concatenate(kept_maps), masks=np.concatenate(kept_masks))
    return PassResult(np.concatenate(scores), np.concatenate(sums), np.concatenate(pro_images), pixels)
