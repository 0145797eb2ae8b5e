"""Thresholds lie between calibration scores, normalized scores follow their formula, and
every image called anomalous has something to show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

import rdjax
from rdjax.scoring import metrics
from rdjax.scoring import thresholds as calibration


def test_midway_hand_cases():
    s = np.array([0.4, 0.1, 0.3, 0.2, 0.3])
    assert calibration.midway(s, 0.3) == pytest.approx(0.25)  # between 0.2 and 0.3
    assert calibration.midway(s, 0.26) == pytest.approx(0.25)  # the same gap, the same decisions
    assert calibration.midway(s, 0.1) == pytest.approx(0.05)  # no score below: half the smallest gap lower
    assert calibration.midway(s, 0.05) == 0.05  # below every score already
    assert calibration.midway(s, 0.5) == 0.5  # above every score


def test_midway_keeps_every_decision_and_touches_no_score():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = np.round(rng.random(int(rng.integers(2, 30))), 2)  # with ties
        for t in s:
            m = calibration.midway(s, t)
            np.testing.assert_array_equal(s >= m, s >= t)
            gap = np.min(np.diff(np.unique(s))) if len(np.unique(s)) > 1 else 1.0
            assert np.min(np.abs(s - m)) >= gap / 2 - 1e-12


def test_f1_calibration_reaches_the_best_f1_between_two_scores():
    """The F1 threshold against sklearn: its decisions reach the best F1 over every
    possible threshold, and no calibration score lies on it."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    scores = rng.random(60) + 0.4 * labels
    maps = rng.random((60, 4, 4))
    pixels = metrics.PixelStats(lo=0.0, hi=1.0, maps=maps, masks=maps > 0.9)
    cal = calibration.calibrate("f1", scores, labels, pixels, 0.99, "test set")
    t = cal.image_threshold
    best = max(f1_score(labels, scores >= c) for c in scores)
    assert f1_score(labels, scores >= t) == pytest.approx(best)
    assert np.min(np.abs(scores - t)) > 0


def test_quantile_calibration():
    rng = np.random.default_rng(1)
    scores, maps = rng.random(50), rng.random((50, 4, 4))
    pixels = metrics.PixelStats(lo=float(maps.min()), hi=float(maps.max()), maps=maps, masks=np.zeros((50, 4, 4), bool))
    cal = calibration.calibrate("quantile", scores, np.zeros(50), pixels, 0.9, "held out")
    q = np.quantile(scores, 0.9)
    np.testing.assert_array_equal(scores >= cal.image_threshold, scores >= q)
    below, above = np.max(scores[scores < q]), np.min(scores[scores >= q])
    assert cal.image_threshold == pytest.approx((below + above) / 2)
    assert cal.pixel_threshold == pytest.approx(np.quantile(maps, 0.9))
    assert (cal.score_min, cal.score_max) == (scores.min(), scores.max())


def test_normalized_scores_formula():
    s = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 9.0])
    out = calibration.normalize_scores(s, threshold=3.0, lo=1.0, hi=5.0)
    np.testing.assert_allclose(out, [0.0, 0.25, 0.5, 0.75, 1.0, 0.0, 1.0])


def test_explanation_masks_hand_cases():
    amap = np.array([[0.1, 0.3], [0.6, 0.2]], np.float32)
    low_peak = np.array([[0.1, 0.2], [0.25, 0.2]], np.float32)  # resizing left its peak below 0.3
    masks = calibration.explanation_masks(
        [amap, amap, low_peak], np.array([True, False, True]), pixel_threshold=0.7, image_threshold=0.3
    )
    np.testing.assert_array_equal(masks[0], [[False, True], [True, False]])  # reaches the image threshold
    assert not masks[1].any()  # normal, nothing above the pixel threshold
    np.testing.assert_array_equal(masks[2], [[False, False], [True, False]])  # the peak alone
    both = calibration.explanation_masks([amap], np.array([True]), pixel_threshold=0.15, image_threshold=0.55)
    np.testing.assert_array_equal(both[0], amap >= 0.15)


def test_no_anomalous_decision_without_something_to_show(trained):
    """On the shared run's test images, at their own resolution and squeezed to odd
    sizes (where resizing moves the peak): every image called anomalous has a mask."""
    from PIL import Image

    config, work, _ = trained
    files = sorted((Path(config.dataset.root) / "disk" / "test").rglob("*.png"))
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    odd = [np.asarray(Image.fromarray(a).resize((37, 91))) for a in images]
    pred = rdjax.load(work).predict(images + odd)
    assert pred.decisions.any()
    for decided, mask in zip(pred.decisions, pred.masks):
        assert mask.any() or not decided
