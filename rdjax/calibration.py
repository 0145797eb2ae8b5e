"""Decision thresholds and normalized scores, fitted after training (calibration.json).

Normalized scores map a raw score s to [0, 1] with the threshold t at exactly 0.5,
piecewise linearly between the calibration set's lowest score lo and highest score hi:
    s <= t:  0.5 * (s - lo) / (t - lo)
    s >  t:  0.5 + 0.5 * (s - t) / (hi - t)
clipped to [0, 1]. Scores of different categories become comparable: 0.5 is the
decision boundary everywhere, 0 the most normal calibration image, 1 the most anomalous.
"""

from __future__ import annotations

import numpy as np

from rdjax.errors import ConfigError
from rdjax.metrics import PixelStats, best_f1


def normalize_scores(scores: np.ndarray, threshold: float, lo: float, hi: float) -> np.ndarray:
    """See the module docstring for the formula."""
    s = np.asarray(scores, np.float64)
    below = 0.5 * (s - lo) / max(threshold - lo, 1e-12)
    above = 0.5 + 0.5 * (s - threshold) / max(hi - threshold, 1e-12)
    return np.clip(np.where(s <= threshold, below, above), 0.0, 1.0)


def calibrate(method: str, scores: np.ndarray, labels: np.ndarray, pixels: PixelStats, quantile: float,
              source: str) -> dict:
    """Image and pixel thresholds, and the range used for normalized scores.

    'f1': F1-optimal on a labelled set (image labels; pixel masks).
    'quantile': the given quantile of held-out normal images' scores (and of their pixels).
    Pixel thresholds come from ``pixels``, exact or binned (rdjax.metrics.PixelStats).
    """
    if method == "f1":
        image_t = best_f1(labels, scores)[1]
        pixel_t = pixels.best_f1()[1] if pixels.has_regions else pixels.quantile(0.99)
    elif method == "quantile":
        image_t = float(np.quantile(scores, quantile))
        pixel_t = pixels.quantile(quantile)
    else:
        raise ConfigError(f"unknown threshold method {method!r}; choose 'f1' or 'quantile'")
    return {
        "method": method,
        "source": source,
        "image_threshold": image_t,
        "pixel_threshold": pixel_t,
        "score_min": float(np.min(scores)),
        "score_max": float(np.max(scores)),
        "pixel_min": pixels.lo,
        "pixel_max": pixels.hi,
    }
