"""Image- and pixel-level metrics on host numpy arrays.

The seven metrics of the ADer / Dinomaly protocol: image AUROC, AP and F1-max; pixel
AUROC, AP and F1-max; AUPRO. AUROC and AP are sklearn's (``roc_auc_score``,
``average_precision_score``); F1-max is the best ``2PR / (P + R + 1e-7)`` over sklearn's
``precision_recall_curve``, the epsilon of Dinomaly's evaluation code (docs/config.md).
AUPRO follows the MVTec AD standard definition (the dataset's own evaluation code):
8-connected ground-truth regions, one global threshold swept over every distinct score,
FPR over all anomaly-free pixels, PRO the mean overlap over all regions, area to FPR 0.3
by trapezoids with linear interpolation at 0.3, divided by 0.3. The RD4AD paper's own
per-image variant is offered as ``pro_rd4ad_per_image``; it is not the same number (see
docs/differences.md). AUPIMO is anomalib's (`aupimo`).

Large test sets use the binned form of the same pixel metrics (`PixelStats`): histograms
over bins of constant relative width 2^-12, accumulated batch by batch, so memory does
not grow with the test set (docs/scaling.md gives the error bounds).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn import metrics as skm

from rdjax.scoring.aupimo import AUPIMO_FPR_BOUNDS, AUPIMO_NUM_THRESHOLDS, aupimo_scores
from rdjax.scoring.binned import (
    ap_from_histograms,
    auroc_from_histograms,
    best_f1_from_histograms,
    f1_curve,
    pro_curve_from_histograms,
    quantile_from_histogram,
)

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)

# How people read each result key: tables, report.html and report.png use these names.
METRIC_NAMES = {
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "image_f1_max": "image F1-max",
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "pixel_f1_max": "pixel F1-max",
    "aupro": "AUPRO",
    "aupro_200": "AUPRO (200 thresholds)",
    "pro_rd4ad_per_image": "PRO (RD4AD per-image)",
    "aupimo": "AUPIMO",
    "image_auroc_sum": "image AUROC (sum of map)",
}
# The metrics an evaluation's table shows (results.md, report.html): the seven of the
# ADer / Dinomaly protocol, in their order, then the paper's own PRO.
TABLE_KEYS = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
    "pro_rd4ad_per_image",
)
# The three the paper reports, which progress lines print.
PAPER_KEYS = ("image_auroc", "pixel_auroc", "aupro")


def percent(value: float | None) -> str:
    """A metric as every table shows it: percent, one decimal; 'n/a' where it is missing
    or undefined (an older metrics.json, a test set without masks)."""
    return "n/a" if value is None or np.isnan(float(value)) else f"{100 * float(value):.1f}"


def headline(result: dict) -> str:
    """'image AUROC 0.9876  pixel AUROC 0.9543  AUPRO 0.9012' for a log line."""
    return "  ".join(f"{METRIC_NAMES[k]} {result[k]:.4f}" for k in PAPER_KEYS)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels).ravel()
    if labels.min() == labels.max():
        return float("nan")  # undefined with one class present
    return float(skm.roc_auc_score(labels, np.asarray(scores).ravel()))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """sklearn's AP (the step sum of precision over recall); NaN without a positive."""
    labels = np.asarray(labels).ravel()
    if not labels.any():
        return float("nan")
    return float(skm.average_precision_score(labels, np.asarray(scores).ravel()))


def best_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1 over all thresholds, its threshold); scores >= threshold are anomalous."""
    precision, recall, thresholds = skm.precision_recall_curve(np.asarray(labels).ravel(), np.asarray(scores).ravel())
    f1 = f1_curve(precision, recall)
    best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
    return float(f1[best]), float(thresholds[best])


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """The best F1 over thresholds; NaN without a positive."""
    if not np.asarray(labels).any():
        return float("nan")
    return best_f1(labels, scores)[0]


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, PRO) curve over all distinct scores, starting at (0, 0).

    Vectorised: every pixel gets a weight (1/#ok-pixels if normal, 1/(#regions * area)
    if in a region); sorting once by descending score and cumulating the weights gives
    both curves at every threshold. Only the last of tied scores is kept.
    """
    maps = np.asarray(maps)  # sorted in its own dtype: float32 sorts faster than float64
    masks = np.asarray(masks).astype(bool)
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    fp_weight = (~masks).astype(np.float64)
    pro_weight = np.zeros(maps.shape, np.float64)
    num_regions = 0
    for i, mask in enumerate(masks):
        pro_weight[i], n = region_weights(mask)
        num_regions += n
    num_ok = fp_weight.sum()
    if num_regions == 0 or num_ok == 0:
        raise ValueError("AUPRO needs at least one anomalous region and one normal pixel")
    order = np.argsort(maps.ravel())[::-1]  # order within ties is irrelevant: only their last is kept
    scores = maps.ravel()[order]
    fpr = np.cumsum(fp_weight.ravel()[order]) / num_ok
    pro = np.cumsum(pro_weight.ravel()[order]) / num_regions
    last_of_ties = np.append(np.diff(scores) != 0, True)
    fpr = np.clip(np.concatenate([[0.0], fpr[last_of_ties]]), 0, 1)
    pro = np.clip(np.concatenate([[0.0], pro[last_of_ties]]), 0, 1)
    return fpr, pro


def pro_thresholds(lo: float, hi: float, num_thresholds: int = 200) -> np.ndarray:
    """The 200-threshold AUPRO's thresholds: np.arange(min, max, (max - min) / 200) of the maps."""
    return np.arange(lo, hi, (hi - lo) / num_thresholds) if hi > lo else np.array([lo])


def auc_below(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float = 0.3) -> float:
    """The 200-threshold AUPRO's area (RD4AD's and Dinomaly's compute_pro): the points with
    FPR < ``fpr_limit``, FPR divided by the largest of them, sklearn's trapezoidal auc."""
    keep = fpr < fpr_limit
    if keep.sum() < 2 or fpr[keep].max() == 0:
        return float("nan")
    return float(skm.auc(fpr[keep] / fpr[keep].max(), pro[keep]))


def aupro_200(maps: np.ndarray, masks: np.ndarray, num_thresholds: int = 200) -> float:
    """Dinomaly's compute_pro (utils.py): 200 evenly spaced thresholds between the maps'
    min and max; at each, the FPR pooled over every image and the mean overlap of every
    region of every image (8-connected); then `auc_below`. Exact: each threshold's counts
    come from one sort (pixels strictly above it)."""
    maps = np.asarray(maps)
    masks = np.asarray(masks).astype(bool)
    thresholds = pro_thresholds(maps.min(), maps.max(), num_thresholds)  # in the maps' dtype, as the official
    pro_weight = np.zeros(maps.shape, np.float64)
    num_regions = 0
    for i, mask in enumerate(masks):
        pro_weight[i], n = region_weights(mask)
        num_regions += n
    order = np.argsort(maps.ravel())
    scores = maps.ravel()[order]
    fp_after = np.concatenate([[0.0], np.cumsum((~masks).ravel()[order][::-1])])[::-1]
    pro_after = np.concatenate([[0.0], np.cumsum(pro_weight.ravel()[order][::-1])])[::-1]
    first_above = np.searchsorted(scores, thresholds, side="right")
    fpr = fp_after[first_above] / max((~masks).sum(), 1)
    return auc_below(fpr, pro_after[first_above] / max(num_regions, 1))


def area_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) for x in [x[0], x_max]; y interpolated linearly at x_max."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    inside = x <= x_max
    area = float(np.sum(0.5 * (y[inside][1:] + y[inside][:-1]) * np.diff(x[inside])))
    k = int(np.searchsorted(x, x_max, side="right"))  # first point beyond x_max
    if 0 < k < len(x) and x[k - 1] < x_max:
        y_at = y[k - 1] + (y[k] - y[k - 1]) * (x_max - x[k - 1]) / (x[k] - x[k - 1])
        area += 0.5 * (y[k - 1] + y_at) * (x_max - x[k - 1])
    return area


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """MVTec AD standard AUPRO up to ``fpr_limit``, normalised to [0, 1]."""
    fpr, pro = pro_curve(maps, masks)
    return area_to(fpr, pro, fpr_limit) / fpr_limit


def pro_rd4ad_image(amap: np.ndarray, mask: np.ndarray, num_thresholds: int = 200) -> float:
    """The RD4AD paper's PRO of one anomalous image: 200 evenly spaced thresholds between
    the image's min and max score, points with FPR < 0.3 with FPR rescaled by its max,
    sklearn's auc. NaN where it is undefined: no region, no normal pixel (a defect
    covering the whole view, as a tight centre crop can make it), fewer than two points."""
    amap, mask = np.asarray(amap, np.float64), np.asarray(mask).astype(bool)
    if not mask.any() or mask.all():
        return float("nan")
    labeled, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
    areas = np.bincount(labeled.ravel(), minlength=n + 1)[1:]
    thresholds = pro_thresholds(amap.min(), amap.max(), num_thresholds)
    binary = amap[None] > thresholds[:, None, None]
    hits = np.stack([np.bincount(labeled.ravel(), weights=b.ravel(), minlength=n + 1)[1:] for b in binary])
    pros = np.mean(hits / areas, axis=1)
    fprs = (binary & ~mask).sum(axis=(1, 2)) / (~mask).sum()
    return auc_below(fprs, pros)


def pro_rd4ad_per_image(maps: np.ndarray, masks: np.ndarray, num_thresholds: int = 200) -> float:
    """The RD4AD paper's PRO: the mean of `pro_rd4ad_image` over the images where it is defined."""
    values = [pro_rd4ad_image(m, k, num_thresholds) for m, k in zip(maps, masks)]
    return nanmean(values)


def nanmean(values: Any) -> float:
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(per-pixel 1/area of its 8-connected ground-truth region, 0 elsewhere; the number of
    regions): summed over pixels above a threshold and divided by the number of regions,
    the weights give the mean per-region overlap, so PRO can be accumulated batch by batch."""
    labeled, n = ndimage.label(np.asarray(mask, bool), structure=EIGHT_CONNECTED)
    if not n:
        return np.zeros(mask.shape), 0
    areas = np.bincount(labeled.ravel(), minlength=n + 1).astype(np.float64)
    inv_area = np.zeros(n + 1)
    inv_area[1:] = 1.0 / areas[1:]
    return inv_area[labeled], n


def aupimo(
    maps: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    num_thresholds: int = AUPIMO_NUM_THRESHOLDS,
    fpr_bounds: tuple[float, float] = AUPIMO_FPR_BOUNDS,
) -> float:
    """anomalib's AUPIMO: the mean of `aupimo_scores` over the anomalous images."""
    return nanmean(aupimo_scores(maps, masks, labels, num_thresholds, fpr_bounds))


@dataclasses.dataclass
class PixelStats:
    """The pixel-level statistics of one evaluation pass, in one of two forms: exact
    (``maps`` and ``masks`` kept, for small test sets) or binned (histograms of normal and
    anomalous pixel scores and of region-overlap weights, accumulated batch by batch).
    Every pixel metric and threshold is asked of this object, so callers never care which."""

    lo: float
    hi: float
    maps: np.ndarray | None = None
    masks: np.ndarray | None = None
    edges: np.ndarray | None = None
    neg: np.ndarray | None = None
    pos: np.ndarray | None = None
    pro: np.ndarray | None = None
    num_regions: int = 0

    @property
    def exact(self) -> bool:
        return self.maps is not None

    def kept(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.maps is not None and self.masks is not None, "exact statistics keep maps and masks"
        return self.maps, self.masks

    def binned(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        assert self.neg is not None and self.pos is not None and self.pro is not None and self.edges is not None
        return self.neg, self.pos, self.pro, self.edges

    @property
    def has_regions(self) -> bool:
        return bool(self.kept()[1].any()) if self.exact else bool(self.binned()[1].sum() > 0)

    def auroc(self) -> float:
        if self.exact:
            maps, masks = self.kept()
            return auroc(masks, maps)
        neg, pos, _, _ = self.binned()
        return auroc_from_histograms(neg, pos)

    @functools.cached_property
    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        if self.exact:
            return pro_curve(*self.kept())
        neg, _, pro, _ = self.binned()
        return pro_curve_from_histograms(neg, pro, self.num_regions)

    def aupro(self, fpr_limit: float = 0.3) -> float:
        fpr, pro = self.pro_curve
        return area_to(fpr, pro, fpr_limit) / fpr_limit

    def aupro_200(self) -> float:
        """Dinomaly's 200-threshold AUPRO; binned, each threshold counts the pixels of the
        bins above the bin that holds it (bins of relative width 2^-12). The metric keeps
        the points below FPR 0.3 and rescales by the largest kept FPR, so a threshold whose
        FPR lies next to 0.3 can move it by more than the other metrics' 1e-3 when binned."""
        if self.exact:
            return aupro_200(*self.kept())
        neg, _, pro, edges = self.binned()
        thresholds = pro_thresholds(self.lo, self.hi)
        above = np.minimum(np.searchsorted(edges, thresholds, side="right"), len(neg))
        fp_after = np.concatenate([np.cumsum(np.asarray(neg, np.float64)[::-1])[::-1], [0.0]])
        pro_after = np.concatenate([np.cumsum(np.asarray(pro, np.float64)[::-1])[::-1], [0.0]])
        return auc_below(fp_after[above] / max(float(np.sum(neg)), 1.0), pro_after[above] / max(self.num_regions, 1))

    def ap(self) -> float:
        if self.exact:
            maps, masks = self.kept()
            return average_precision(masks, maps)
        neg, pos, _, _ = self.binned()
        return ap_from_histograms(neg, pos)

    def best_f1(self) -> tuple[float, float]:
        if self.exact:
            maps, masks = self.kept()
            return best_f1(masks, maps)
        neg, pos, _, edges = self.binned()
        return best_f1_from_histograms(neg, pos, edges)

    def f1_max(self) -> float:
        return self.best_f1()[0] if self.has_regions else float("nan")

    def aupimo(self, labels: np.ndarray) -> float:
        """NaN when binned: AUPIMO needs each anomalous image's own curve, which the
        histograms (pooled over all images) do not keep."""
        return aupimo(*self.kept(), labels) if self.exact else float("nan")

    def quantile(self, q: float) -> float:
        if self.exact:
            return float(np.quantile(self.kept()[0], q))
        neg, pos, _, edges = self.binned()
        return float(np.clip(quantile_from_histogram(neg + pos, edges, q), self.lo, self.hi))


def compute_all(
    scores: np.ndarray,
    labels: np.ndarray,
    defect_types: Sequence[str],
    pixels: PixelStats | None,
    pro_images: np.ndarray,
) -> dict:
    """Every metric rdjax reports, as plain floats (JSON-ready). ``pixels=None`` (no ground
    truth masks) reports the image-level metrics only; the pixel ones are NaN, and AUPIMO is
    NaN with binned statistics too (`PixelStats.aupimo`). ``pro_images``: the per-image
    PRO of each image (NaN where undefined)."""
    labels = np.asarray(labels)
    nan = float("nan")
    if pixels is None or not pixels.has_regions:
        pixels = None
    result: dict[str, Any] = {
        "image_auroc": auroc(labels, scores),
        "image_ap": average_precision(labels, scores),
        "image_f1_max": f1_max(labels, scores),
        "pixel_auroc": nan if pixels is None else pixels.auroc(),
        "pixel_ap": nan if pixels is None else pixels.ap(),
        "pixel_f1_max": nan if pixels is None else pixels.f1_max(),
        "aupro": nan if pixels is None else pixels.aupro(),
        "aupro_200": nan if pixels is None else pixels.aupro_200(),
        "pro_rd4ad_per_image": nan if pixels is None else nanmean(pro_images),
        "aupimo": nan if pixels is None else pixels.aupimo(labels),
        "num_images": int(len(labels)),
        "num_defective": int(labels.sum()),
        "pixel_metrics": "none" if pixels is None else ("exact" if pixels.exact else "binned"),
    }
    types = np.asarray(defect_types)
    per_type = {}
    for t in sorted(set(defect_types) - {"good"}):
        keep = (types == t) | (labels == 0)
        per_type[t] = {"image_auroc": auroc(labels[keep], np.asarray(scores)[keep]), "count": int((types == t).sum())}
    result["per_type"] = per_type
    return result
