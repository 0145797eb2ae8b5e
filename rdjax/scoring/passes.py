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

from rdjax.data.pipeline import load_batches, prefetch
from rdjax.data.preprocess import Split
from rdjax.pytrees import Variables
from rdjax.runtime.sharding import gather, global_batches, local_rows, local_share
from rdjax.scoring import maps as maps_lib
from rdjax.scoring import metrics


@dataclasses.dataclass
class PassResult:
    """What an evaluation pass keeps: a few numbers per image and the pixel statistics."""

    scores: np.ndarray  # (N,) image scores, the map's max
    sums: np.ndarray  # (N,) the map's sum (the novelty benchmarks' image score)
    pro_images: np.ndarray  # (N,) the RD4AD paper's per-image PRO, NaN where undefined
    pixels: metrics.PixelStats


def merge(a: PassResult | None, b: PassResult, max_pixels: int) -> PassResult:
    """Two passes as one pass over both splits (the unified setting's global threshold):
    per-image numbers concatenated, histograms summed; maps and masks kept only while
    the two together stay within ``max_pixels`` (config.exact_metrics_max_pixels), so a
    running merge over many categories holds no more than one exact pass would."""
    if a is None:
        return b
    pa, pb = a.pixels, b.pixels
    (neg_a, pos_a, pro_a, edges), (neg_b, pos_b, pro_b, _) = pa.binned(), pb.binned()
    pixels = metrics.PixelStats(
        lo=min(pa.lo, pb.lo), hi=max(pa.hi, pb.hi), edges=edges, neg=neg_a + neg_b, pos=pos_a + pos_b,
        pro=pro_a + pro_b, num_regions=pa.num_regions + pb.num_regions,
    )  # fmt: skip
    if pa.exact and pb.exact:
        (maps_a, masks_a), (maps_b, masks_b) = pa.kept(), pb.kept()
        if maps_a.size + maps_b.size <= max_pixels:
            pixels.maps, pixels.masks = np.concatenate([maps_a, maps_b]), np.concatenate([masks_a, masks_b])
    joined = lambda key: np.concatenate([getattr(a, key), getattr(b, key)])
    return PassResult(joined("scores"), joined("sums"), joined("pro_images"), pixels)


Tiler = Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class _Accumulator:
    """What a pass keeps, batch by batch."""

    scores: list[np.ndarray] = dataclasses.field(default_factory=list)
    sums: list[np.ndarray] = dataclasses.field(default_factory=list)
    pro_images: list[np.ndarray] = dataclasses.field(default_factory=list)
    maps: list[np.ndarray] = dataclasses.field(default_factory=list)
    masks: list[np.ndarray] = dataclasses.field(default_factory=list)
    hist: dict[str, np.ndarray] = dataclasses.field(
        default_factory=lambda: {
            k: np.zeros(maps_lib.NUM_BINS, np.float64 if k == "pro" else np.int64) for k in ("neg", "pos", "pro")
        }
    )
    lo: float = np.inf
    hi: float = -np.inf
    num_regions: int = 0

    def add_stats(self, stats: dict) -> None:
        for k in self.hist:
            self.hist[k] += np.asarray(stats[k])
        self.lo, self.hi = min(self.lo, float(stats["lo"])), max(self.hi, float(stats["hi"]))
        self.num_regions += int(stats["regions"])

    def result(self, exact: bool) -> PassResult:
        pixels = metrics.PixelStats(
            lo=self.lo, hi=self.hi, edges=maps_lib.bin_edges(), neg=self.hist["neg"], pos=self.hist["pos"],
            pro=self.hist["pro"], num_regions=self.num_regions,
        )  # fmt: skip
        if exact:
            pixels = dataclasses.replace(pixels, maps=np.concatenate(self.maps), masks=np.concatenate(self.masks))
        return PassResult(
            np.concatenate(self.scores), np.concatenate(self.sums), np.concatenate(self.pro_images), pixels
        )


@dataclasses.dataclass(frozen=True)
class PassSetup:
    """What stays fixed across the evaluation passes of one student: the step, the
    variables, the global batch, how a batch reaches the devices, and how the maps are
    made.

    ``tiler`` (config.resize 'fit' or 'tile'): this process's images at their own
    resolution -> (maps at image_size, scores), computed on the host's side of the
    batch; ``step`` then only reduces them (maps.stats_step). Without it, ``step``
    computes the maps of the squeezed images too. ``map_size`` (config.map_size): the
    maps' side where it differs from the inputs'; the masks are resized to it by
    nearest neighbour (maps.map_masks)."""

    step: Callable
    teacher_vars: Variables
    student_vars: Variables
    batch_size: int
    put: Callable[[Any], Any]
    tiler: Tiler | None = None
    map_size: int = 0


def run_pass(setup: PassSetup, split: Split, exact: bool, kind: str = "test") -> PassResult:
    """Maps of every row of ``split`` exactly once, in global batches of
    ``setup.batch_size`` (sharding.global_batches: the last padded, its padding masked
    out), each process decoding only its share. Kept: one score, one sum and one
    per-image PRO per image, and the binned pixel statistics summed over hosts; with
    ``exact``, every map and mask too (small sets)."""
    batches = global_batches(len(split), setup.batch_size)
    local = [local_share(rows) for rows, _ in batches]
    local_valid = [local_share(np.arange(setup.batch_size) < valid) for _, valid in batches]

    def prepare(item: tuple[dict, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, tuple, Any]:
        """Host batch -> (host masks, valid rows, the step's device inputs, device masks)."""
        batch, rows, valid = item
        masks = maps_lib.map_masks(batch["mask"], setup.map_size)
        weights, regions = zip(*(metrics.region_weights(m) for m in masks))
        inputs = (batch["image"],) if setup.tiler is None else setup.tiler([split.native_image(r) for r in rows])
        device = setup.put((*inputs, masks, np.stack(weights).astype(np.float32), np.asarray(regions, np.int32), valid))
        return masks, valid, device, device[len(inputs)]

    kept = _Accumulator()
    loaded = zip(load_batches(split, local, kind, with_masks=True), local, local_valid)
    bar = tqdm.tqdm(total=len(split), desc=f"evaluating {kind}", unit="img", leave=False,
                    disable=None if jax.process_index() == 0 else True)  # fmt: skip
    for (_, valid_count), (host_masks, host_valid, device, device_masks) in zip(batches, prefetch(loaded, prepare)):
        maps, batch_scores, batch_sums, stats = setup.step(setup.teacher_vars, setup.student_vars, *device)
        kept.add_stats(stats)
        kept.scores.append(gather(batch_scores)[:valid_count])
        kept.sums.append(gather(batch_sums)[:valid_count])
        per_image = [metrics.pro_rd4ad_image(m, k) if v else np.nan
                     for m, k, v in zip(local_rows(maps), host_masks, host_valid)]  # fmt: skip
        kept.pro_images.append(gather(setup.put(np.array(per_image, np.float32)))[:valid_count])
        if exact:
            kept.maps.append(gather(maps)[:valid_count])
            kept.masks.append(gather(device_masks)[:valid_count])
        bar.update(valid_count)
    bar.close()
    return kept.result(exact)
