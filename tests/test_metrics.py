"""Metrics against sklearn, brute force, and a hand-computed case."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from rdjax import maps as maps_lib
from rdjax import metrics

from conftest import auroc_bounds, pair_auroc


def brute_force_aupro(maps, masks, limit=0.3):
    """Straight from the definition: at every distinct score t (descending), FPR over all
    normal pixels and PRO as the mean over all 8-connected regions of the covered fraction."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in sorted(np.unique(maps), reverse=True):
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([pred[i][r].mean() for i, r in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:  # interpolate at the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / limit


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_brute_force_with_ties_and_many_regions(seed):
    rng = np.random.default_rng(seed)
    maps = rng.integers(0, 6, size=(3, 9, 9)).astype(np.float32)  # few distinct values: many ties
    masks = np.zeros((3, 9, 9), bool)
    masks[0, 1:3, 1:3] = True
    masks[0, 5:8, 5] = True  # a second region in the same image
    masks[0, 4, 4] = True  # touches (5,5) diagonally: joins it under 8-connectivity
    masks[1, 0, :] = True
    maps[masks] += rng.integers(0, 4, size=masks.sum())
    assert metrics.aupro(maps, masks) == pytest.approx(brute_force_aupro(maps, masks), abs=1e-12)


def test_aupro_hand_computed():
    """One image, 4 pixels: region {0,1}, normal {2,3}; scores 0.9, 0.2, 0.5, 0.1.
    Thresholds 0.9: FPR 0, PRO 1/2; 0.5: FPR 1/2, PRO 1/2; 0.2: FPR 1/2, PRO 1; 0.1: FPR 1, PRO 1.
    Area to 0.3: the curve is (0,0)->(0,0.5)->(0.5,0.5): 0.5 * 0.3 = 0.15; /0.3 = 0.5."""
    maps = np.array([[[0.9, 0.2], [0.5, 0.1]]])
    masks = np.array([[[True, True], [False, False]]])
    fpr, pro = metrics.pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1])
    assert metrics.aupro(maps, masks) == pytest.approx(0.5)


def test_best_f1_threshold_gives_the_best_f1():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 80)
    scores = labels + rng.normal(scale=0.8, size=80)
    f1, t = metrics.best_f1(labels, scores)
    best = max(skm.f1_score(labels, scores >= c) for c in np.unique(scores))
    assert skm.f1_score(labels, scores >= t) == pytest.approx(best)
    assert f1 == pytest.approx(best)


def test_auroc_counts_pairs_and_f1_max_against_sklearn():
    """AUROC against pair counting, with ties (scores rounded to one decimal)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = labels * 0.7 + rng.normal(size=200)
    assert metrics.auroc(labels, scores) == pytest.approx(pair_auroc(labels, scores), abs=1e-12)
    assert metrics.auroc(labels, scores.round(1)) == pytest.approx(pair_auroc(labels, scores.round(1)), abs=1e-12)
    best = max(skm.f1_score(labels, scores >= t) for t in np.unique(scores))
    assert metrics.f1_max(labels, scores) == pytest.approx(best)


def test_compute_all_pixel_auroc_and_per_type():
    rng = np.random.default_rng(2)
    maps = rng.random((6, 8, 8))
    masks = np.zeros((6, 8, 8), bool)
    masks[3:, 2:5, 2:5] = True
    maps[masks] += 0.3
    labels = np.array([0, 0, 0, 1, 1, 1])
    types = ["good", "good", "good", "a", "b", "b"]
    scores = maps.max(axis=(1, 2))
    pixels = metrics.PixelStats(lo=float(maps.min()), hi=float(maps.max()), maps=maps, masks=masks)
    r = metrics.compute_all(scores, labels, types, pixels, np.full(6, np.nan))
    assert r["pixel_auroc"] == pytest.approx(pair_auroc(masks, maps), abs=1e-12)
    assert r["image_auroc"] == pytest.approx(pair_auroc(labels, scores), abs=1e-12)
    keep_b = np.array([1, 1, 1, 0, 1, 1], bool)
    assert r["per_type"]["b"]["image_auroc"] == pytest.approx(pair_auroc(labels[keep_b], scores[keep_b]), abs=1e-12)
    assert r["per_type"]["a"]["count"] == 1 and r["per_type"]["b"]["count"] == 2


def test_rd4ad_per_image_pro_matches_a_loop():
    """The paper's variant, re-derived with explicit loops over thresholds and regions."""
    rng = np.random.default_rng(3)
    maps = rng.random((2, 12, 12))
    masks = np.zeros((2, 12, 12), bool)
    masks[0, 2:5, 2:6] = True
    masks[0, 8:10, 8:11] = True
    masks[1, 6:9, 1:4] = True
    maps[masks] += 0.25
    values = []
    for amap, mask in zip(maps, masks):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        delta = (amap.max() - amap.min()) / 200
        fprs, pros = [], []
        for th in np.arange(amap.min(), amap.max(), delta):
            b = amap > th
            pros.append(np.mean([b[lab == k].sum() / (lab == k).sum() for k in range(1, n + 1)]))
            fprs.append((b & ~mask).sum() / (~mask).sum())
        fprs, pros = np.array(fprs), np.array(pros)
        keep = fprs < 0.3
        values.append(skm.auc(fprs[keep] / fprs[keep].max(), pros[keep]))
    assert metrics.pro_rd4ad_per_image(maps, masks) == pytest.approx(np.mean(values))


def binned(maps, masks):
    """PixelStats accumulated as an evaluation pass does: the device histograms of
    rdjax.maps, batch by batch (two images at a time), summed on the host."""
    import jax.numpy as jnp

    hist = {"neg": 0, "pos": 0, "pro": 0}
    regions = 0
    for start in range(0, len(maps), 2):
        m, k = maps[start : start + 2], masks[start : start + 2]
        weights, counts = zip(*(metrics.region_weights(x) for x in k))
        regions += sum(counts)
        out = maps_lib.pixel_histograms(
            jnp.asarray(m, jnp.float32),
            jnp.asarray(k),
            jnp.asarray(np.stack(weights), jnp.float32),
            jnp.ones(len(m), bool),
        )
        for key in hist:
            hist[key] = hist[key] + np.asarray(out[key], np.float64)
    return metrics.PixelStats(
        lo=float(maps.min()),
        hi=float(maps.max()),
        edges=maps_lib.bin_edges(),
        neg=hist["neg"],
        pos=hist["pos"],
        pro=hist["pro"],
        num_regions=regions,
    )


def _blobs(rng, n, size):
    masks = np.zeros((n, size, size), bool)
    for i in range(n // 2, n):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 8, 2)
            h, w = rng.integers(2, 8, 2)
            masks[i, y : y + h, x : x + w] = True
    return masks


@pytest.mark.parametrize("kind", ["uniform", "lognormal", "separated", "maps"])
def test_binned_pixel_metrics_equal_exact_within_1e3(kind):
    """Binned (streaming) pixel AUROC, AUPRO and F1 threshold against the exact ones on
    random maps of several shapes and on smooth maps like the model's (blurred noise
    plus blurred defects). The bins have relative width 2^-12, so a threshold moves by at
    most 2.4e-4 of its value and AUROC only by the (small) mass of pixel pairs sharing a
    bin; 1e-3 is the tolerance the streaming path promises."""
    rng = np.random.default_rng(["uniform", "lognormal", "separated", "maps"].index(kind))
    n, size = 12, 48
    masks = _blobs(rng, n, size)
    if kind == "uniform":
        maps = rng.random((n, size, size))
    elif kind == "lognormal":
        maps = rng.lognormal(-2, 1, (n, size, size))
    elif kind == "separated":
        maps = rng.random((n, size, size)) * 0.2 + masks * 0.15
    else:
        maps = ndimage.gaussian_filter(rng.random((n, size, size)), (0, 4, 4)) * 0.3 + 0.1
        maps += ndimage.gaussian_filter(masks.astype(float), (0, 2, 2)) * 0.2
    maps = maps.astype(np.float32)
    exact = metrics.PixelStats(lo=float(maps.min()), hi=float(maps.max()), maps=maps, masks=masks)
    stream = binned(maps, masks)
    assert stream.auroc() == pytest.approx(pair_auroc(masks, maps), abs=1e-3)
    assert stream.aupro() == pytest.approx(brute_force_aupro(maps, masks), abs=1e-3)
    f1_exact, t_exact = exact.best_f1()
    f1_stream, t_stream = stream.best_f1()
    assert t_stream == pytest.approx(t_exact, abs=1e-3) and f1_stream == pytest.approx(f1_exact, abs=1e-3)
    assert stream.quantile(0.99) == pytest.approx(np.quantile(maps, 0.99), abs=1e-3)
    assert exact.auroc() == pytest.approx(pair_auroc(masks, maps), abs=1e-9)


def test_binned_auroc_hand_computed():
    """Scores 0.1 (normal), 0.3 (anomalous), 0.3 (normal): a tie counts one half, so the
    AUROC is (1 + 0.5) / 2 = 0.75."""
    maps = np.array([[[0.1, 0.3, 0.3]]], np.float32)
    masks = np.array([[[False, True, False]]])
    assert binned(maps, masks).auroc() == pytest.approx(0.75, abs=1e-12)


def test_the_auroc_bounds_the_tests_use():
    """conftest.auroc_bounds: at tol 0 it is pair counting; with a tolerance its range
    holds the AUROC of every perturbation of the scores within it, and nothing wider
    than the pairs it leaves open."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 60)
    scores = (labels * 0.3 + rng.random(60)).round(2)  # many ties
    lo, hi = auroc_bounds(labels, scores, 0.0)
    assert lo == hi == pytest.approx(pair_auroc(labels, scores), abs=1e-12)
    tol = 0.004
    lo, hi = auroc_bounds(labels, scores, tol)
    for seed in range(20):
        moved = scores + np.random.default_rng(seed).uniform(-tol, tol, 60)
        assert lo - 1e-12 <= pair_auroc(labels, moved) <= hi + 1e-12
    pos, neg = scores[labels == 1][:, None], scores[labels == 0][None, :]
    assert hi - lo == pytest.approx(np.mean(np.abs(pos - neg) <= 2 * tol), abs=1e-12)
