"""AUPIMO (anomalib 2's per-image overlap metric), each anomalous image's score; its mean
over the images is rdjax.scoring.metrics.aupimo."""

from __future__ import annotations

import numpy as np

# anomalib 2's AUPIMO defaults (metrics/pimo/pimo.py): thresholds, shared-FPR bounds, and
# the fewest integration points it computes with (it refuses 30 or fewer).
AUPIMO_NUM_THRESHOLDS = 300_000
AUPIMO_FPR_BOUNDS = (1e-5, 1e-4)
AUPIMO_MIN_POINTS = 31


def aupimo_scores(
    maps: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    num_thresholds: int = AUPIMO_NUM_THRESHOLDS,
    fpr_bounds: tuple[float, float] = AUPIMO_FPR_BOUNDS,
) -> np.ndarray:
    """Each anomalous image's AUPIMO as anomalib 2 defines it (metrics/pimo/functional.py),
    NaN for the other images, or for all of them where anomalib refuses to compute it.

    ``num_thresholds`` thresholds evenly spaced from the min to the max score of the normal
    (label 0) images, in the maps' dtype; the shared FPR at each is the fraction of those
    images' pixels scoring >= it (anomalib's mean of per-image FPRs, the images being of one
    size); an anomalous image's PIMO curve is the fraction of its ground-truth pixels
    scoring >= it. Each bound of ``fpr_bounds`` is met by the threshold whose shared FPR is
    nearest (the lowest such threshold on a tie), without interpolation; between them the
    curve is integrated by trapezoids over ln(FPR) (points of FPR 0 left out), divided by
    ln(upper / lower) and clipped to [0, 1].

    NaN for all where anomalib raises: no normal image, or no anomalous one with a
    ground-truth pixel; constant normal scores; a bound outside the shared FPR's range (as
    with fewer than 1 / lower normal pixels); both bounds met by one threshold; at most 30
    points between them. A label-1 image without ground-truth pixels gets NaN (anomalib,
    which classes images by their masks, would count its pixels as normal ones).
    """
    maps = np.asarray(maps)
    masks = np.asarray(masks).astype(bool)
    labels = np.asarray(labels).ravel()
    if maps.shape != masks.shape or len(labels) != len(maps):
        raise ValueError(f"maps {maps.shape}, masks {masks.shape} and {len(labels)} labels do not match")
    result = np.full(len(maps), np.nan)
    anomalous = np.flatnonzero((labels != 0) & masks.any(axis=(1, 2)))
    normal = np.sort(maps[labels == 0], axis=None)
    if not len(anomalous) or not normal.size or normal[0] == normal[-1]:
        return result
    thresholds = np.linspace(float(normal[0]), float(normal[-1]), num_thresholds).astype(maps.dtype)
    fpr = (normal.size - np.searchsorted(normal, thresholds, side="left")) / normal.size
    lower, upper = fpr_bounds
    if lower < fpr.min() or upper > fpr.max():
        return result
    first = int(np.argmin(np.abs(fpr - upper)))  # FPR falls as the threshold rises
    last = int(np.argmin(np.abs(fpr - lower)))
    if first >= last:
        return result
    log_fpr = np.log(fpr[first : last + 1][::-1])
    finite = np.isfinite(log_fpr)
    if finite.sum() < AUPIMO_MIN_POINTS:
        return result
    window = thresholds[first : last + 1][::-1][finite]
    for i in anomalous:
        positives = np.sort(maps[i][masks[i]])
        tpr = (positives.size - np.searchsorted(positives, window, side="left")) / positives.size
        result[i] = np.trapezoid(tpr, log_fpr[finite]) / np.log(upper / lower)
    return np.clip(result, 0, 1)
