"""Metrics against brute force, pair counting, and hand-computed cases."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from rdjax.scoring import aupimo, metrics
from rdjax.scoring import maps as maps_lib

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


def brute_force_ap(labels, scores):
    """AP from its definition: the mean over positives of the precision among all scores
    >= that positive's score (a tie counts every tied score, as sklearn's step sum does)."""
    labels, scores = np.asarray(labels).ravel().astype(bool), np.asarray(scores).ravel()
    precisions = []
    for s in scores[labels]:
        above = scores >= s
        precisions.append((above & labels).sum() / above.sum())
    return float(np.mean(precisions))


def brute_force_f1_max(labels, scores):
    """The best F1 = 2 TP / (2 TP + FP + FN) over every distinct threshold (scores >= t)."""
    labels, scores = np.asarray(labels).ravel().astype(bool), np.asarray(scores).ravel()
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp, fp, fn = (pred & labels).sum(), (pred & ~labels).sum(), (~pred & labels).sum()
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


# F1-max is 2PR / (P + R + 1e-7), as Dinomaly's: it differs from the exact 2PR / (P + R) by
# 2PR * 1e-7 / ((P + R)(P + R + 1e-7)) <= 1e-7 * F1 / (P + R) <= 5e-8 (as F1 <= (P + R) / 2).
F1_EPS_ERROR = 5e-8


def brute_force_aupimo(maps, masks, labels, num_thresholds, fpr_bounds):
    """AUPIMO from its definition, one threshold at a time: shared FPR the mean over normal
    images of each one's FPR, TPR per anomalous image, each bound met by the nearest
    shared FPR (the lowest threshold on a tie), trapezoids over log10(FPR) between them,
    divided by log10(upper / lower); images without a ground-truth pixel are left out."""
    normal = maps[labels == 0]
    thresholds = np.linspace(float(normal.min()), float(normal.max()), num_thresholds).astype(maps.dtype)
    fprs = [float(np.mean([(m >= t).mean() for m in normal])) for t in thresholds]
    lower, upper = fpr_bounds

    def nearest(level):
        return min(range(len(fprs)), key=lambda k: (abs(fprs[k] - level), k))

    window = [k for k in range(nearest(upper), nearest(lower) + 1) if fprs[k] > 0]
    values = []
    for m, k in zip(maps, masks):
        if not k.any():
            continue
        points = [(np.log10(fprs[j]), (m[k] >= thresholds[j]).mean()) for j in window]
        area = sum(0.5 * (y0 + y1) * (x0 - x1) for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]))
        values.append(min(max(area / np.log10(upper / lower), 0.0), 1.0))
    return float(np.mean(values))


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


def test_ap_and_f1_max_hand_computed():
    """Scores 0.9 (anomalous), 0.8 (normal), 0.8 (anomalous). At 0.9: P 1, R 1/2; at 0.8
    (the tie counts both): P 2/3, R 1. AP = 1/2 * 1 + 1/2 * 2/3 = 5/6; F1 is 2/3, then 4/5."""
    labels = np.array([1, 0, 1])
    scores = np.array([0.9, 0.8, 0.8])
    assert metrics.average_precision(labels, scores) == pytest.approx(5 / 6, abs=1e-12)
    assert metrics.f1_max(labels, scores) == pytest.approx(0.8, abs=F1_EPS_ERROR)
    maps, masks = scores.reshape(1, 1, 3).astype(np.float32), labels.reshape(1, 1, 3).astype(bool)
    exact = metrics.PixelStats(lo=0.8, hi=0.9, maps=maps, masks=masks)
    assert exact.ap() == pytest.approx(5 / 6, abs=1e-12)
    assert exact.f1_max() == pytest.approx(0.8, abs=F1_EPS_ERROR)
    stream = binned(maps, masks)  # the same ties: 0.9 and 0.8 lie in different bins
    assert stream.ap() == pytest.approx(5 / 6, abs=1e-12)
    assert stream.f1_max() == pytest.approx(0.8, abs=F1_EPS_ERROR)


@pytest.mark.parametrize("seed", range(3))
def test_ap_and_f1_max_match_brute_force_with_ties(seed):
    """Image level and exact pixel level, on scores rounded to one decimal: many ties."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = (labels * 0.4 + rng.random(300)).round(1)
    assert metrics.average_precision(labels, scores) == pytest.approx(brute_force_ap(labels, scores), abs=1e-12)
    assert metrics.f1_max(labels, scores) == pytest.approx(brute_force_f1_max(labels, scores), abs=F1_EPS_ERROR)
    maps, masks = scores.reshape(3, 10, 10), labels.reshape(3, 10, 10).astype(bool)
    exact = metrics.PixelStats(lo=float(maps.min()), hi=float(maps.max()), maps=maps, masks=masks)
    assert exact.ap() == pytest.approx(brute_force_ap(masks, maps), abs=1e-12)
    assert exact.f1_max() == pytest.approx(brute_force_f1_max(masks, maps), abs=F1_EPS_ERROR)


def test_ap_and_f1_max_are_nan_without_a_positive():
    assert np.isnan(metrics.average_precision(np.zeros(4), np.arange(4.0)))
    assert np.isnan(metrics.f1_max(np.zeros(4), np.arange(4.0)))


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
    assert r["image_ap"] == pytest.approx(brute_force_ap(labels, scores), abs=1e-12)
    assert r["image_f1_max"] == pytest.approx(brute_force_f1_max(labels, scores), abs=F1_EPS_ERROR)
    assert r["pixel_ap"] == pytest.approx(brute_force_ap(masks, maps), abs=1e-12)
    assert r["pixel_f1_max"] == pytest.approx(brute_force_f1_max(masks, maps), abs=F1_EPS_ERROR)
    assert np.isnan(r["aupimo"])  # 192 normal pixels: a shared FPR of 1e-5 is out of reach
    assert set(metrics.METRIC_NAMES) - {"image_auroc_sum"} <= set(r)  # that one is the evaluator's
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
    rdjax.scoring.maps, batch by batch (two images at a time), summed on the host."""
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
    """Binned (streaming) pixel AUROC, AP, F1-max, F1 threshold and AUPRO against the exact
    ones on random maps of several shapes and on smooth maps like the model's (blurred
    noise plus blurred defects). The bins have relative width 2^-12, so a threshold moves
    by at most 2.4e-4 of its value and AUROC only by the (small) mass of pixel pairs sharing
    a bin. The binned AP and F1 are those of the scores rounded down to their bin's lower
    edge (test_binned_ap_is_the_ap_of_scores_rounded_to_their_bins): F1-max moves only by
    shifting the best threshold to the lowest score of its bin, AP only by the precision a
    positive gains or loses from the few pixels sharing its bin, at most their number over
    the number of pixels above it (here a bin holds at most about 1/200 of the pixels, most
    far fewer). 1e-3 is the tolerance the streaming path promises."""
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
    # the exact AUPRO equals the brute force's (test_aupro_matches_brute_force...), which
    # would take seconds here (one pass over all pixels per distinct score)
    assert stream.aupro() == pytest.approx(exact.aupro(), abs=1e-3)
    if kind == "maps":  # smooth maps; elsewhere the FPR-0.3 cut may fall between a bin and its threshold
        assert stream.aupro_200() == pytest.approx(exact.aupro_200(), abs=1e-3)
    assert stream.ap() == pytest.approx(exact.ap(), abs=1e-3)
    assert stream.f1_max() == pytest.approx(exact.f1_max(), abs=1e-3)
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


def test_binned_ap_is_the_ap_of_scores_rounded_to_their_bins():
    """The histograms' AP equals the brute-force AP of each pixel's bin index (every bin one
    group of tied scores), and their F1-max the brute-force F1-max of the same; summation
    order is the only difference (1e-12)."""
    rng = np.random.default_rng(7)
    masks = _blobs(rng, 4, 48)  # batches of the shape test_binned_pixel_metrics... compiled
    maps = (rng.lognormal(-2, 1, masks.shape) + masks * 0.05).astype(np.float32)
    stream = binned(maps, masks)
    index = np.searchsorted(stream.edges, maps, side="right") - 1
    assert stream.ap() == pytest.approx(brute_force_ap(masks, index), abs=1e-12)
    assert stream.f1_max() == pytest.approx(brute_force_f1_max(masks, index), abs=F1_EPS_ERROR)


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


# ----------------------------------------------------------------------------- AUPIMO


def _aupimo_maps(rng, num, size):
    """``num`` normal then ``num`` anomalous smooth maps with rectangular defects."""
    masks = np.zeros((2 * num, size, size), bool)
    for i in range(num, 2 * num):
        y, x = rng.integers(0, size - 8, 2)
        masks[i, y : y + rng.integers(3, 8), x : x + rng.integers(3, 8)] = True
    maps = ndimage.gaussian_filter(rng.random(masks.shape), (0, 2, 2)) + masks * rng.uniform(0, 0.1)
    return maps.astype(np.float32), masks, masks.any(axis=(1, 2)).astype(int)


@pytest.mark.parametrize("seed", range(2))
def test_aupimo_matches_brute_force(seed):
    """FPR bounds (1e-2, 1e-1) so that small maps reach them; 1000 thresholds. The two
    differ in the log's base (normalized away) and in summation order only (1e-12)."""
    maps, masks, labels = _aupimo_maps(np.random.default_rng(seed), 4, 24)
    labels[-1] = 1
    masks[-1] = False  # a label-1 image without ground truth: left out
    got = aupimo.aupimo_scores(maps, masks, labels, 1000, (1e-2, 1e-1))
    assert np.isnan(got[:4]).all() and np.isnan(got[-1]) and np.isfinite(got[4:-1]).all()
    expected = brute_force_aupimo(maps, masks, labels, 1000, (1e-2, 1e-1))
    assert metrics.aupimo(maps, masks, labels, 1000, (1e-2, 1e-1)) == pytest.approx(expected, abs=1e-12)


def test_aupimo_hand_computed():
    """`_integer_normal_image`: t = 900 meets FPR 0.1 and t = 990 FPR 0.01. The defect
    pixels score 2000 and 950: TPR 1 up to t = 950 (FPR 0.05), 1/2 from t = 951 (FPR
    0.049). In log10(FPR), with bounds (0.01, 0.1): 1/2 * log10(4.9) + 3/4 * log10(0.05 /
    0.049) (the trapezoid over the step) + 1 * log10(2), over log10(10) = 1."""
    expected = 0.5 * np.log10(4.9) + 0.75 * np.log10(0.05 / 0.049) + np.log10(2)
    got = metrics.aupimo(*_integer_normal_image([2000.0, 950.0]), 1000, (1e-2, 1e-1))
    assert got == pytest.approx(expected, abs=1e-12)


def _integer_normal_image(defect_scores):
    """The hand-computed cases' images: a normal one scoring 0..999, whose 1000 thresholds
    are those integers (shared FPR (1000 - t) / 1000, meeting 0.1, 0.04 and 0.01 exactly),
    and an anomalous one whose defect pixels score ``defect_scores``."""
    maps = np.stack([np.arange(1000.0).reshape(40, 25), np.zeros((40, 25))])
    masks = np.zeros((2, 40, 25), bool)
    masks[1, 0, : len(defect_scores)] = True
    maps[1, 0, : len(defect_scores)] = defect_scores
    return maps, masks, np.array([0, 1])


def test_aupimo_extremes_and_where_it_is_undefined():
    """Defects above every normal score: TPR 1 over exactly the bounds, AUPIMO 1 (1e-12:
    rounding of the logs); below every threshold: 0. With anomalib's bounds (1e-5, 1e-4),
    8 normal 32x32 images (8192 pixels) cannot reach a shared FPR of 1e-5, and anomalib
    refuses: NaN. Binned statistics give NaN too."""
    assert metrics.aupimo(*_integer_normal_image([2000.0]), 1000, (1e-2, 1e-1)) == pytest.approx(1.0, abs=1e-12)
    assert metrics.aupimo(*_integer_normal_image([-1.0]), 1000, (1e-2, 1e-1)) == 0.0
    maps, masks, labels = _aupimo_maps(np.random.default_rng(0), 8, 32)
    assert np.isnan(metrics.aupimo(maps, masks, labels))
    one_bin = dict(edges=np.array([0.0, 1.0]), neg=np.ones(1), pos=np.ones(1), pro=np.ones(1), num_regions=1)
    assert np.isnan(metrics.PixelStats(lo=0.0, hi=1.0, **one_bin).aupimo(labels))
    assert np.isnan(metrics.aupimo(maps, masks, np.zeros(16)))  # no anomalous image


def test_aupimo_needs_31_points_between_the_bounds():
    """With bounds (0.01, 0.04) the thresholds 960 to 990 lie between them, 31 points, the
    fewest anomalib computes with; with (0.01, 0.039), 961 to 990, 30 points: NaN. With
    anomalib's defaults, 30 normal 128x128 images (491 520 pixels: an FPR of 1e-5 is about
    5 of them) give a value."""
    case = _integer_normal_image([2000.0])
    assert metrics.aupimo(*case, 1000, (1e-2, 4e-2)) == pytest.approx(1.0, abs=1e-12)
    assert np.isnan(metrics.aupimo(*case, 1000, (1e-2, 3.9e-2)))
    maps, masks, labels = _aupimo_maps(np.random.default_rng(1), 30, 128)
    assert 0 < metrics.aupimo(maps + masks * 0.15, masks, labels) < 1


def _compute_pro_loop(masks, amaps, num_th=200):
    """Dinomaly's compute_pro as its code runs it: a pass over every pixel per threshold,
    each region's overlap (scipy's 8-connected labels, skimage's default connectivity),
    the FPR pooled over the images, points with FPR < 0.3 rescaled by their largest FPR."""
    lo, hi = amaps.min(), amaps.max()
    fprs, pros = [], []
    for th in np.arange(lo, hi, (hi - lo) / num_th):
        binary = amaps > th
        overlaps = []
        for b, m in zip(binary, masks):
            labeled, n = ndimage.label(m, structure=np.ones((3, 3), int))
            overlaps += [b[labeled == r].sum() / (labeled == r).sum() for r in range(1, n + 1)]
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(~masks, binary).sum() / (~masks).sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < 0.3
    return skm.auc(fprs[keep] / fprs[keep].max(), pros[keep])


@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_200_equals_dinomalys_compute_pro(seed):
    """Exact against the loop (rounding of the sums only: 1e-12); the binned form is
    checked on larger maps in test_binned_pixel_metrics_equal_exact_within_1e3."""
    rng = np.random.default_rng(seed)
    masks = _blobs(rng, 4, 24)
    maps = (ndimage.gaussian_filter(rng.random((4, 24, 24)), (0, 2, 2)) + masks * 0.05).astype(np.float32)
    want = _compute_pro_loop(masks, maps)
    assert metrics.aupro_200(maps, masks) == pytest.approx(want, abs=1e-12)
    assert abs(want - metrics.aupro(maps, masks)) > 1e-3  # a metric of its own, not the MVTec AUPRO
