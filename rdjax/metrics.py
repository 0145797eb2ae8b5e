"""Image- and pixel-level metrics on host numpy arrays.

AUROC and F1-max are sklearn's. AUPRO follows the MVTec AD standard definition (the
dataset's own evaluation code): 8-connected ground-truth regions, one global threshold
swept over every distinct score, FPR over all anomaly-free pixels, PRO the mean overlap
over all regions, area to FPR 0.3 by trapezoids with linear interpolation at 0.3,
divided by 0.3. The RD4AD paper's own per-image variant is offered as
``pro_rd4ad_per_image``; it is not the same number (see docs/differences.md).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn import metrics as skm

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels).ravel()
    if labels.min() == labels.max():
        return float("nan")  # undefined with one class present
    return float(skm.roc_auc_score(labels, np.asarray(scores).ravel()))


def best_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1 over all thresholds, its threshold); scores >= threshold are anomalous."""
    precision, recall, thresholds = skm.precision_recall_curve(np.asarray(labels).ravel(), np.asarray(scores).ravel())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
    return float(f1[best]), float(thresholds[best])


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
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
    fp_weight = np.zeros(maps.shape, np.float64)
    pro_weight = np.zeros(maps.shape, np.float64)
    num_regions = 0
    for i, mask in enumerate(masks):
        labeled, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
        if n:
            areas = np.bincount(labeled.ravel(), minlength=n + 1).astype(np.float64)
            inv_area = np.zeros(n + 1)
            inv_area[1:] = 1.0 / areas[1:]
            pro_weight[i] = inv_area[labeled]
        num_regions += n
        fp_weight[i] = ~mask
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


def pro_rd4ad_per_image(maps: np.ndarray, masks: np.ndarray, num_thresholds: int = 200) -> float:
    """The RD4AD paper's PRO: per anomalous image, 200 evenly spaced thresholds between
    that image's min and max score, points with FPR < 0.3 with FPR rescaled by its max,
    sklearn's auc, then the mean over images."""
    results = []
    for amap, mask in zip(np.asarray(maps, np.float64), np.asarray(masks).astype(bool)):
        if not mask.any():
            continue
        labeled, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
        areas = np.bincount(labeled.ravel(), minlength=n + 1)[1:]
        lo, hi = amap.min(), amap.max()
        thresholds = np.arange(lo, hi, (hi - lo) / num_thresholds) if hi > lo else np.array([lo])
        binary = amap[None] > thresholds[:, None, None]
        hits = np.stack([np.bincount(labeled.ravel(), weights=b.ravel(), minlength=n + 1)[1:] for b in binary])
        pros = np.mean(hits / areas, axis=1)
        fprs = (binary & ~mask).sum(axis=(1, 2)) / (~mask).sum()
        keep = fprs < 0.3
        if keep.sum() < 2 or fprs[keep].max() == 0:
            continue
        results.append(skm.auc(fprs[keep] / fprs[keep].max(), pros[keep]))
    return float(np.mean(results)) if results else float("nan")


def compute_all(
    maps: np.ndarray, scores: np.ndarray, masks: np.ndarray, labels: np.ndarray, defect_types: list[str],
    pixel: bool = True,
) -> dict:
    """Every metric rdjax reports, as plain floats (JSON-ready). ``pixel=False`` (no ground
    truth masks) reports the image-level metrics only; the pixel ones are NaN."""
    labels = np.asarray(labels)
    has_regions = pixel and bool(np.asarray(masks).any())
    result = {
        "image_auroc": auroc(labels, scores),
        "pixel_auroc": auroc(masks, maps) if has_regions else float("nan"),
        "aupro": aupro(maps, masks) if has_regions else float("nan"),
        "pro_rd4ad_per_image": pro_rd4ad_per_image(maps, masks) if has_regions else float("nan"),
        "image_f1_max": f1_max(labels, scores),
        "num_images": int(len(labels)),
        "num_defective": int(labels.sum()),
    }
    types = np.asarray(defect_types)
    per_type = {}
    for t in sorted(set(defect_types) - {"good"}):
        keep = (types == t) | (labels == 0)
        per_type[t] = {"image_auroc": auroc(labels[keep], np.asarray(scores)[keep]), "count": int((types == t).sum())}
    result["per_type"] = per_type
    return result
