"""Decisions a line can rely on (issue 33): a threshold on few images is warned about,
the test images' decisions at it are counted wherever it is reported, a centre crop is
stated and shaded, report.png draws images and truth at the map's size, the colour
scale puts the threshold in its middle, a decision picture names whose threshold
decided, and no raw numpy warning reaches the user."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image
from sklearn.metrics import confusion_matrix

from rdjax.data.preprocess import Recipe
from rdjax.outputs import pictures, sheet, tables
from rdjax.outputs.pictures import Regions, Verdict
from rdjax.scoring import metrics
from rdjax.scoring import thresholds as calibration

from conftest import data_flags, rdjax_cli

# ----------------------------------------------------------------------------- thresholds on few images, counts


def test_confusion_counts_equal_sklearn():
    """Scores on the threshold count as anomalous (the decision rule, score >= t)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200), 2)  # ties, some exactly on the threshold
    counts = calibration.confusion(labels, scores, 0.5)
    tn, fp, fn, tp = confusion_matrix(labels, scores >= 0.5).ravel()
    assert counts == {"true_positives": tp, "false_positives": fp, "true_negatives": tn, "false_negatives": fn}
    assert np.sum(scores == 0.5) > 0
    # By hand: labels 0 0 0 1 1, threshold 0.3.
    hand = calibration.confusion(np.array([0, 0, 0, 1, 1]), np.array([0.1, 0.5, 0.3, 0.6, 0.15]), 0.3)
    assert hand == {"true_positives": 1, "false_positives": 2, "true_negatives": 1, "false_negatives": 1}


def _calibration(count: int, method: str = "quantile") -> dict:
    rng = np.random.default_rng(count)
    scores = rng.random(count)
    maps = rng.random((count, 4, 4))
    pixels = metrics.PixelStats(lo=float(maps.min()), hi=float(maps.max()), maps=maps, masks=np.zeros(maps.shape, bool))
    source = f"{count} held-out train/good images"
    return calibration.calibrate(method, scores, np.zeros(count, int), pixels, 0.99, source).to_json()


def test_a_threshold_on_fewer_than_twenty_images_is_warned_about():
    few, enough = _calibration(19), _calibration(20)
    assert few["num_images"] == 19 and enough["num_images"] == 20
    warning = calibration.few_images(few)
    assert warning is not None and "rests on 19 held-out train/good images, fewer than 20" in warning
    assert "validation_size" in warning  # what to do about it
    assert calibration.few_images(enough) is None
    assert calibration.few_images({k: v for k, v in few.items() if k != "num_images"}) is None  # an older file


def test_results_md_counts_the_decisions_and_warns():
    labels, scores = np.array([0, 0, 0, 1, 1]), np.array([0.1, 0.5, 0.3, 0.6, 0.15])
    cal = {**_calibration(4), "image_threshold": 0.3}
    result = {"category": "disk", "epoch": 3, "calibration": cal, "threshold_note": calibration.describe(cal),
              "confusion": calibration.confusion(labels, scores, 0.3), "warnings": []}  # fmt: skip
    text = tables.results_markdown(result)
    assert "At the image threshold 0.3, of 5 test images:" in text
    assert "| defective | 1 true positives | 1 false negatives |" in text
    assert "| good | 2 false positives | 1 true negatives |" in text
    assert text.count("**Warning:** the image threshold rests on 4 held-out train/good images") == 1
    assert "**Warning:**" not in tables.results_markdown({**result, "calibration": {**cal, "num_images": 25}})


def test_unified_results_md_counts_each_categorys_decisions():
    cats = {"a": _calibration(30), "b": _calibration(5)}
    counts = {"a": (3, 1, 20, 2), "b": (4, 0, 5, 1)}
    keys = calibration.CONFUSION_KEYS
    result = {
        "epoch": 1,
        "categories": {
            c: {"image_auroc": 0.9, "calibration": cal, "confusion": dict(zip(keys, counts[c]))}
            for c, cal in cats.items()
        },  # fmt: skip
        "calibration": {**_calibration(35), "categories": cats},
        "confusion": dict(zip(keys, (7, 1, 25, 3))),
    }
    text = tables.unified_markdown(result)
    rows = {line.split("|")[1].strip(): [x.strip() for x in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| ") and "image threshold" not in line and line.count("|") == 8}  # fmt: skip
    assert rows["a"][1:] == ["30", "3", "1", "20", "2"] and rows["b"][1:] == ["5", "4", "0", "5", "1"]
    assert rows["**global**"][1:] == ["35", "7", "1", "25", "3"]
    assert rows["b"][0] == f"{cats['b']['image_threshold']:.6g}"
    warned = [line for line in text.splitlines() if line.startswith("**Warning**")]
    assert len(warned) == 1 and warned[0].startswith("**Warning** (b): the image threshold rests on 5")


def test_report_subtitle_counts_the_decisions_and_warns():
    cal = {**_calibration(4), "image_threshold": 0.3}
    counts = calibration.confusion(np.array([0, 0, 0, 1, 1]), np.array([0.1, 0.5, 0.3, 0.6, 0.15]), 0.3)
    lines = sheet.subtitle({"image_auroc": 0.9}, cal, counts).splitlines()
    want = "test images at the threshold: 1 true positives, 2 false positives, 1 true negatives, 1 false negatives"
    assert want in lines
    warning = lines[lines.index(want) + 1 :]
    assert warning[0].startswith("warning: the image threshold rests on 4 held-out")
    assert " ".join(warning) == f"warning: {calibration.few_images(cal)}"  # wrapped to stay on the sheet
    assert all(len(line) <= sheet.SUBTITLE_WIDTH for line in warning)


# ----------------------------------------------------------------------------- the crop, stated and shaded


def test_a_crop_of_more_than_five_percent_is_stated_with_the_fraction_seen():
    assert pictures.seen_fraction(Recipe(size=126, resize=448)) == pytest.approx((126 / 448) ** 2)
    note = pictures.crop_note(Recipe(size=126, resize=448))
    assert note is not None and "7.91% of its area (28.1% of each side)" in note and "config.input.resize" in note
    assert "76.6% of its area" in pictures.crop_note(Recipe(size=392, resize=448))  # Dinomaly's own recipe
    assert pictures.crop_note(Recipe(size=256, resize=262)) is None  # 4.5% cut
    assert pictures.crop_note(Recipe(size=256)) is None


def test_the_inspected_region_is_the_crops_place_on_the_image():
    """Recipe 80 -> crop 64 on a 64 px image: the crop starts at 8 of 80, so on the image
    at 8 * 64 / 80 = 6.4 -> 6 and ends at 72 * 64 / 80 = 57.6 -> 58 (rows and columns)."""
    region = pictures.inspected_region((64, 64), Recipe(size=64, resize=80))
    want = np.zeros((64, 64), bool)
    want[6:58, 6:58] = True
    np.testing.assert_array_equal(region, want)
    wide = pictures.inspected_region((40, 100), Recipe(size=64, resize=80))  # rows 4..36, columns 10..90
    assert wide[4:36, 10:90].all() and wide.sum() == 32 * 80
    assert pictures.inspected_region((30, 50), Recipe(size=64)).all()


def _panels(picture: np.ndarray, colour: tuple[int, int, int], height: int) -> tuple[int, int]:
    """(header height, the overlay panel's first column): the header is the top rows in the
    decision colour at the right edge; the overlay starts after the first all-white column."""
    header = int(np.argmin(np.all(picture[:, -1] == colour, axis=1)))
    body = picture[header : header + height]
    blank = np.all(body == 255, axis=(0, 2))
    return header, int(np.flatnonzero(~blank[1:] & blank[:-1])[0] + 1)


def _assert_shaded(panel: np.ndarray, plain: np.ndarray, outside: np.ndarray) -> None:
    """Outside the inspected region each pixel is the hatch's grey or the plain image
    darkened to 40%, or (where the peak lies near the region's edge) its ring's white or
    black: none is the overlay's colour."""
    dark = (plain.astype(np.float64) * 0.4).astype(np.uint8)
    hatch = np.all(panel == pictures.HATCH, axis=-1)
    darkened = np.all(panel == dark, axis=-1)
    ring = np.all(panel == 255, axis=-1) | np.all(panel == 0, axis=-1)
    assert np.all((hatch | darkened | ring)[outside])
    assert (hatch | darkened)[outside].mean() > 0.98  # a ring is a small share
    assert hatch[outside].mean() > 0.05 and darkened[outside].mean() > 0.5  # both show


def test_a_decision_picture_shades_what_the_model_did_not_see():
    rng = np.random.default_rng(2)
    image = rng.integers(60, 256, (64, 64, 3), dtype=np.uint8)
    inspected = pictures.inspected_region((64, 64), Recipe(size=64, resize=80))
    amap = np.where(inspected, rng.random((64, 64)), 0.0).astype(np.float32)  # as uncrop_map leaves it
    picture = pictures.decision_picture(
        image, amap, (0.0, 1.0), Verdict(float(amap.max())), Regions(inspected=inspected)
    )
    header, right = _panels(picture, pictures.DECISION_COLOURS[None], 256)
    scale = 4  # 64 px enlarged to 256
    panel = picture[header : header + 256, right : right + 256]
    big = lambda a: np.repeat(np.repeat(a, scale, 0), scale, 1)  # noqa: E731
    _assert_shaded(panel, big(image), ~big(inspected))
    heat = big(pictures.overlay(image, amap, 0.0, 1.0))
    inside = big(inspected)
    inside[96:160, 96:160] = False  # leave out the peak's ring
    same = np.all(panel == heat, axis=-1)
    assert same[inside].mean() > 0.97  # the overlay, but for the ring around the peak
    # Without the region, the border shows the map's 0 in the scale's colour: what the shading replaces.
    plain = pictures.decision_picture(image, amap, (0.0, 1.0), Verdict(float(amap.max())))
    assert np.all(plain[header : header + 256, right : right + 256][~big(inspected)] == heat[~big(inspected)])


# ----------------------------------------------------------------------------- colours, header, report.png


def test_the_colour_scale_puts_the_threshold_in_the_middle():
    """On a black image the overlay is half the map's 'jet' colour, so a pixel's colour
    gives its place on the scale: 0 to twice the threshold. The peak of an image called
    anomalous is in the upper half, that of one called normal in the lower half."""
    t = 0.113
    lo, hi = calibration.colour_scale(t)
    assert (lo, hi) == (0.0, pytest.approx(2 * t))
    black = np.zeros((32, 32, 3), np.uint8)
    for peak, anomalous in ((0.415, True), (0.8 * t, False), (1.2 * t, True)):
        amap = np.full((32, 32), 0.02, np.float32)
        amap[10, 20] = peak
        picture = pictures.decision_picture(black, amap, (lo, hi), Verdict(peak, anomalous=peak >= t, threshold=t))
        header, right = _panels(picture, pictures.DECISION_COLOURS[anomalous], 256)
        pixel = picture[header + 10 * 8 + 4, right + 20 * 8 + 4].astype(float)  # 32 px enlarged 8 times
        want = 0.5 * np.asarray(colormaps["jet"](min(peak / (2 * t), 1.0))[:3]) * 255
        # Blending rounds each channel to uint8 once after the colormap's own rounding: 1.5 levels.
        np.testing.assert_allclose(pixel, want, atol=1.5)
    # The bar's ticks: its top, the threshold at its middle row (255 / 2), its bottom.
    header, _ = _panels(picture, pictures.DECISION_COLOURS[True], 256)
    top = np.all(np.abs(picture[header].astype(int) - np.asarray(colormaps["jet"](1.0)[:3]) * 255) <= 1, axis=-1)
    beyond = int(np.flatnonzero(top)[-1]) + 1  # the first column right of the bar
    ticks = np.flatnonzero(np.all(picture[header : header + 256, beyond] == 0, axis=-1))
    assert set(ticks) == {0, 128, 255}


def test_the_header_names_whose_threshold_decided():
    lines = pictures.header_lines(Verdict(0.415, True, 0.93, 0.113, "bottle"), "a/part_png")
    assert lines == ["NG   score 0.4150 >= 0.113   normalized 0.93", "image threshold 0.113 of category bottle",
                     "a/part_png"]  # fmt: skip
    assert pictures.header_lines(Verdict(0.05, False, 0.2, 0.113, "global"), "x")[1] == (
        "image threshold 0.113 (global, over every category)"
    )
    assert pictures.header_lines(Verdict(0.05), "x") == ["score 0.0500", "x"]
    image, amap = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.float32)
    one, other = (
        pictures.decision_picture(image, amap, (0.0, 0.2), Verdict(0.05, anomalous=False, threshold=0.1, category=c))
        for c in ("bottle", "screw")
    )
    header, _ = _panels(one, pictures.DECISION_COLOURS[False], 256)
    assert header == _panels(other, pictures.DECISION_COLOURS[False], 256)[0]
    assert not np.array_equal(one[:header], other[:header]) and np.array_equal(one[header:], other[header:])


def _colour_box(sheet: np.ndarray, colour: tuple[int, int, int], after: int = 0) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the first run of columns right of ``after`` holding
    ``colour``, and of its rows there."""
    hits = np.all(np.abs(sheet.astype(int) - colour) <= 8, axis=-1)
    columns = np.flatnonzero(hits.any(axis=0) & (np.arange(sheet.shape[1]) > after))
    run = columns[: int(np.argmax(np.diff(columns) > 1)) + 1] if np.any(np.diff(columns) > 1) else columns
    rows = np.flatnonzero(hits[:, run].any(axis=1))
    return rows.min(), rows.max(), run.min(), run.max()


@pytest.mark.filterwarnings("error")
def test_report_draws_images_and_truth_at_the_maps_size(tmp_path):
    """32 px images (the first a plain green) with 64 px maps and masks (config.map_size):
    in the written sheet each image is drawn as large as its map, and the truth's red
    outline lies on the image, where the mask is. The second image's mask fills it (a
    tight crop can do that), which a contour of the mask alone warns about."""
    labels = np.array([1, 1])
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[0, ..., 1] = 255
    maps = np.zeros((2, 64, 64), np.float32)
    masks = np.zeros((2, 64, 64), bool)
    masks[0, 40:60, 40:60] = True  # inside a 64 px image only
    masks[1] = True
    scores = np.array([1.0, 2.0])
    pixels = metrics.PixelStats(lo=0.0, hi=1.0, maps=maps, masks=masks)
    cases = pictures.Cases(np.arange(2), images, masks, maps, scores, ["a.png", "b.png"], labels, 0.0, 1.0)
    no_curves = sheet.Curves(None, None)
    path = sheet.write_report(tmp_path / "r.png", sheet.ScoredSet(labels, scores, pixels), cases, None, no_curves)
    png = np.asarray(Image.open(path).convert("RGB"))
    top, bottom, left, right = _colour_box(png, (0, 255, 0))
    heat = _colour_box(png, tuple(int(255 * c) for c in colormaps["jet"](0.0)[:3]), after=right)  # its map
    # matplotlib places each panel on whole pixels of the sheet: a side may differ by a pixel at each end.
    assert abs((bottom - top) - (heat[1] - heat[0])) <= 2 and abs((right - left) - (heat[3] - heat[2])) <= 2
    red = np.all(np.abs(png.astype(int) - (255, 0, 0)) <= 40, axis=-1)
    ys, xs = np.nonzero(red[:, : heat[2]])  # left of the map: the image's panel (the colour bar holds red too)
    assert len(ys) and ys.min() >= top and ys.max() <= bottom and xs.min() >= left and xs.max() <= right
    # The outline sits where the mask is: from 40/64 to 60/64 of the image's side, within the
    # panel's pixel snapping (1 px) and the outline's own width (2 px).
    side = right - left + 1
    assert abs(xs.min() - (left + 40 / 64 * side)) <= 3 and abs(xs.max() - (left + 60 / 64 * side)) <= 3


# ----------------------------------------------------------------------------- no raw warnings


@pytest.mark.filterwarnings("error")
def test_metrics_raise_no_warnings_where_a_defect_fills_the_view():
    """A tight crop can leave a defect covering a whole input (the user trial's five
    'invalid value encountered in divide'): the paper's per-image PRO is undefined there,
    and is NaN without a warning; the other metrics and both calibrations are unmoved."""
    rng = np.random.default_rng(4)
    labels = np.array([0, 0, 0, 1, 1, 1])
    maps = rng.random((6, 16, 16)).astype(np.float32) * (1 + labels[:, None, None])
    masks = np.zeros(maps.shape, bool)
    masks[3] = True  # the whole view
    masks[4:, 4:9, 4:9] = True
    assert np.isnan(metrics.pro_rd4ad_image(maps[3], masks[3]))
    pro_images = np.array([metrics.pro_rd4ad_image(m, k) for m, k in zip(maps, masks)])
    assert np.isnan(pro_images[:4]).all() and np.isfinite(pro_images[4:]).all()
    scores = maps.reshape(6, -1).max(1)
    pixels = metrics.PixelStats(lo=float(maps.min()), hi=float(maps.max()), maps=maps, masks=masks)
    result = metrics.compute_all(scores, labels, ["good"] * 3 + ["hole"] * 3, pixels, pro_images)
    assert result["pro_rd4ad_per_image"] == pytest.approx(np.mean(pro_images[4:]))
    assert np.isfinite(result["aupro"]) and np.isfinite(result["pixel_auroc"])
    for method in ("f1", "quantile"):
        calibration.calibrate(method, scores, labels, pixels, 0.99, "6 labelled test images")


# ----------------------------------------------------------------------------- through the command line


def _counts_from_scores_csv(path: Path, threshold: float) -> dict[str, int]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    tn, fp, fn, tp = confusion_matrix(labels, scores >= threshold, labels=[0, 1]).ravel()
    return {"true_positives": tp, "false_positives": fp, "true_negatives": tn, "false_negatives": fn}


@pytest.mark.slow  # a training run (reusing the shared run's compiled programs) and a predict
def test_a_cropped_unified_run_on_few_held_out_images_says_so(trained, tmp_path):
    """`rdjax train` unified, with a centre crop (80 -> 64: 64% of each image seen) and
    thresholds on 4 held-out images: the run says both once when it starts; metrics.json
    and results.md count the test decisions, per category and globally, as scores.csv and
    calibration.json give them; no numpy warning from rdjax. `rdjax predict` then shades
    the border the model did not see."""
    config, _, _ = trained
    root = Path(config.dataset.root)
    work = tmp_path / "w"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = rdjax_cli("train", f"--workdir={work}", *data_flags(root), "--config.setting=unified",
                        "--config.input.resize=80", "--config.batch_size=6", "--config.threshold.method=quantile",
                        "--config.threshold.validation_size=4")  # fmt: skip
    assert out.code == 0, out.stderr[-3000:]
    raw = [w for w in caught if issubclass(w.category, RuntimeWarning) and "/rdjax/" in w.filename]
    assert not raw, [str(w.message) for w in raw]
    lines = out.stdout.splitlines()
    warned = [line for line in lines if "warning: the image threshold rests on 4 held-out train/good images" in line]
    assert len(warned) == 1 and warned[0].startswith("[disk] warning: ")
    noted = [line for line in lines if "note: the model sees the central 64x64 px of each image resized to 80x80"
             in line]  # fmt: skip
    assert len(noted) == 1 and "64% of its area (80% of each side)" in noted[0]

    result = json.loads((work / "metrics.json").read_text())
    cal = json.loads((work / "calibration.json").read_text())
    category = result["categories"]["disk"]
    want = _counts_from_scores_csv(work / "eval" / "epoch_0001" / "disk" / "scores.csv",
                                   cal["categories"]["disk"]["image_threshold"])  # fmt: skip
    assert category["confusion"] == want and sum(want.values()) == 13
    assert result["confusion"] == _counts_from_scores_csv(
        work / "eval" / "epoch_0001" / "disk" / "scores.csv", cal["image_threshold"]
    )
    assert cal["num_images"] == cal["categories"]["disk"]["num_images"] == 4
    own = (work / "eval" / "epoch_0001" / "disk" / "results.md").read_text()
    assert f"| defective | {want['true_positives']} true positives | {want['false_negatives']} false negatives |" in own
    assert "**Warning:** the image threshold rests on 4 held-out train/good images" in own
    table = (work / "results.md").read_text()
    assert "| disk | " + f"{cal['categories']['disk']['image_threshold']:.6g} | 4 | " in table
    assert "**Warning** (global): the image threshold rests on 4 held-out train/good images of 1 categories" in table

    inputs = tmp_path / "in"
    inputs.mkdir()
    source = root / "disk" / "test" / "good" / "000.png"
    shutil.copy(source, inputs / "good.png")
    predicted = rdjax_cli("predict", f"--workdir={work}", f"--input={inputs}", f"--output={tmp_path / 'out'}",
                          "--category=disk")  # fmt: skip
    assert predicted.code == 0, predicted.stderr[-3000:]
    picture = np.asarray(Image.open(tmp_path / "out" / "overlays" / "good_png.png").convert("RGB"))
    row = next(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    anomalous = row["decision"] == "anomalous"
    header, right = _panels(picture, pictures.DECISION_COLOURS[anomalous], 256)
    plain = np.asarray(Image.open(source).convert("RGB"))
    big = lambda a: np.repeat(np.repeat(a, 4, 0), 4, 1)  # noqa: E731  (64 px enlarged to 256)
    outside = np.ones((64, 64), bool)
    outside[6:58, 6:58] = False  # test_the_inspected_region_is_the_crops_place_on_the_image
    _assert_shaded(picture[header : header + 256, right : right + 256], big(plain), big(outside))
