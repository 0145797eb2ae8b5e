"""The pixel metrics of histograms (a large test set's binned statistics,
rdjax.scoring.metrics.PixelStats), and the F1 curve both forms share."""

from __future__ import annotations

import numpy as np

# F1 = 2PR / (P + R + F1_EPSILON), as Dinomaly's f1_score_max (utils.py); it keeps 0/0 at 0.
F1_EPSILON = 1e-7


def f1_curve(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """F1 at each point of a precision-recall curve, with Dinomaly's epsilon (0 where P = R = 0)."""
    return 2 * precision * recall / (precision + recall + F1_EPSILON)


def auroc_from_histograms(neg: np.ndarray, pos: np.ndarray) -> float:
    """AUROC of pixels counted in the same bins: pairs in one bin count one half (the
    bins' only error, at most half the probability that a normal and an anomalous pixel
    share a bin)."""
    neg, pos = np.asarray(neg, np.float64), np.asarray(pos, np.float64)
    if neg.sum() == 0 or pos.sum() == 0:
        return float("nan")
    below = np.cumsum(neg) - neg
    return float(np.sum(pos * (below + 0.5 * neg)) / (neg.sum() * pos.sum()))


def _counts_at_edges(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true, false positives) with each bin's lower edge as the threshold."""
    neg, pos = np.asarray(neg, np.float64), np.asarray(pos, np.float64)
    return np.cumsum(pos[::-1])[::-1], np.cumsum(neg[::-1])[::-1]


def ap_from_histograms(neg: np.ndarray, pos: np.ndarray) -> float:
    """sklearn's AP of the binned pixels, each bin one group of tied scores: precision at
    each bin's lower edge, weighted by the recall the bin adds."""
    pos = np.asarray(pos, np.float64)
    if pos.sum() == 0:
        return float("nan")
    tp, fp = _counts_at_edges(neg, pos)
    precision = tp / np.maximum(tp + fp, 1e-300)
    return float(np.sum(pos * precision) / pos.sum())


def best_f1_from_histograms(neg: np.ndarray, pos: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
    """(best F1, its threshold) over the bins' lower edges; scores >= threshold are anomalous."""
    tp, fp = _counts_at_edges(neg, pos)
    precision = tp / np.maximum(tp + fp, 1e-300)
    recall = tp / max(tp[0], 1e-300)
    f1 = f1_curve(precision, recall)
    best = int(np.argmax(f1))
    return float(f1[best]), float(edges[best])


def quantile_from_histogram(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """The q-quantile of the binned values, linear within its bin (error below one bin)."""
    cum = np.cumsum(np.asarray(counts, np.float64))
    target = q * cum[-1]
    k = min(int(np.searchsorted(cum, target, side="left")), len(counts) - 1)
    before = cum[k - 1] if k else 0.0
    frac = (target - before) / counts[k] if counts[k] else 0.0
    return float(edges[k] + (edges[k + 1] - edges[k]) * frac)


def pro_curve_from_histograms(neg: np.ndarray, pro: np.ndarray, num_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every bin edge, from (0, 0) up: the exact curve sampled at the bins."""
    fp = np.cumsum(np.asarray(neg, np.float64)[::-1]) / max(float(np.sum(neg)), 1e-300)
    overlap = np.cumsum(np.asarray(pro, np.float64)[::-1]) / num_regions
    return np.clip(np.concatenate([[0.0], fp]), 0, 1), np.clip(np.concatenate([[0.0], overlap]), 0, 1)
