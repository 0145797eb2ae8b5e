"""Pictures a person reads: the decision picture (the plain image beside its overlay, a
header, marks and a colour bar that grow with the picture), mask outlines, outcome labels,
and report.png's sheet."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image, ImageFont
from sklearn.metrics import roc_curve

from rdjax.outputs import pictures, sheet
from rdjax.outputs.pictures import Regions, Verdict
from rdjax.scoring import metrics
from rdjax.scoring.thresholds import describe

WHITE = (255, 255, 255)


def test_outline_is_the_masks_edge():
    mask = np.zeros((6, 6), bool)
    mask[1:4, 1:5] = True
    edge = pictures.outline(mask)
    inner = np.zeros((6, 6), bool)
    inner[2, 2:4] = True
    np.testing.assert_array_equal(edge, mask & ~inner)
    full = np.ones((4, 4), bool)
    assert not pictures.outline(full).any()  # the image border does not count as an edge


def test_a_wider_outline_is_drawn_inside_the_mask():
    mask = np.zeros((12, 12), bool)
    mask[1:11, 2:10] = True
    want = mask.copy()
    want[3:9, 4:8] = False  # two pixels in from every side
    np.testing.assert_array_equal(pictures.outline(mask, 2), want)


@pytest.mark.parametrize(
    "label,anomalous,want",
    [
        (1, True, "true positive"),
        (0, True, "false positive"),
        (0, False, "true negative"),
        (1, False, "false negative"),
        (0, None, "good"),
        (1, None, "defective"),
    ],
)
def test_outcome(label, anomalous, want):
    assert pictures.outcome(label, anomalous) == want


def _layout(picture: np.ndarray, colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """(header height, overlay panel's first column, colour bar's first column), found in
    the pixels: the header is the top rows in the decision colour at the right edge, and
    panels and bar are separated by columns that are white over the whole body."""
    header = int(np.argmin(np.all(picture[:, -1] == colour, axis=1)))
    blank = np.all(picture[header:] == 255, axis=(0, 2))
    starts = np.flatnonzero(~blank[1:] & blank[:-1]) + 1  # a drawn column after a white one
    return header, int(starts[0]), int(starts[1])


def _ink_rows(picture: np.ndarray, header: int) -> int:
    """The height of the header's first text line: its first run of rows holding white ink."""
    rows = np.any(np.all(picture[:header] > 200, axis=2), axis=1)
    first = int(np.argmax(rows))
    return int(np.argmin(rows[first:]))


def test_decision_picture_shows_the_plain_image_beside_its_overlay():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    amap = np.zeros((64, 48), np.float32)
    amap[40, 10] = 2.0  # the peak
    mask = np.zeros((64, 48), bool)
    mask[5:15, 20:30] = True
    ng = pictures.decision_picture(
        image, amap, (0.0, 2.0), Verdict(2.0, anomalous=True, normalized=0.9), Regions(mask=mask)
    )
    ok = pictures.decision_picture(image, amap, (0.0, 2.0), Verdict(2.0, anomalous=False, normalized=0.4))
    assert ng.shape == ok.shape and ng.dtype == np.uint8
    header, right, bar = _layout(ng, pictures.DECISION_COLOURS[True])
    assert _layout(ok, pictures.DECISION_COLOURS[False]) == (header, right, bar)
    bh = ng.shape[0] - header
    scale = bh // 64
    assert bh == 64 * scale and bh >= 256  # small images are enlarged for the text to fit
    bw = 48 * scale
    plain = np.asarray(Image.fromarray(image).resize((bw, bh), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(ng[header:, :bw], plain)
    heat = np.asarray(
        Image.fromarray(pictures.overlay(image, amap, 0.0, 2.0)).resize((bw, bh), Image.Resampling.NEAREST)
    )
    # Without a mask, the right panel is the overlay except for the ring around the peak.
    panel = ok[header:, right : right + bw].astype(int)
    changed = np.any(panel != heat, axis=2)
    ys, xs = np.nonzero(changed)
    assert np.all(np.hypot(ys - 40.5 * scale, xs - 10.5 * scale) < 0.1 * bh)
    assert np.all(panel[ys, xs] == 255, axis=1).any()  # a white ring ...
    assert tuple(panel[int(40.5 * scale), int(10.5 * scale)]) == tuple(heat[int(40.5 * scale), int(10.5 * scale)])
    # ... the mask's outline in white on the overlay; inside it, the overlay.
    assert tuple(ng[header + 5 * scale, right + 25 * scale]) == WHITE
    assert tuple(ng[header + 10 * scale, right + 25 * scale]) == tuple(heat[10 * scale, 25 * scale])
    # The colour bar: the top of the scale (hi) at the top, lo at the bottom.
    top, bottom = ng[header, bar + 1], ng[-1, bar + 1]
    np.testing.assert_allclose(top, np.asarray(colormaps["jet"](1.0)[:3]) * 255, atol=1)
    np.testing.assert_allclose(bottom, np.asarray(colormaps["jet"](0.0)[:3]) * 255, atol=1)


def test_decision_picture_outlines_the_truth_in_red_on_the_plain_image():
    image = np.full((32, 32, 3), 100, np.uint8)
    truth = np.zeros((32, 32), bool)
    truth[8:20, 8:20] = True
    picture = pictures.decision_picture(image, np.zeros((32, 32)), (0.0, 1.0), Verdict(0.1), Regions(truth=truth))
    header, right, _ = _layout(picture, pictures.DECISION_COLOURS[None])
    scale = (picture.shape[0] - header) // 32
    left = picture[header:, : 32 * scale]
    assert tuple(left[8 * scale, 14 * scale]) == (255, 0, 0)
    assert tuple(left[14 * scale, 14 * scale]) == (100, 100, 100) and tuple(left[2, 2]) == (100, 100, 100)


def _gradient(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], -1).astype(np.uint8)


def _marks(h: int, w: int) -> dict[str, float]:
    """A decision picture of an h x w input with a square mask and a peak, measured: text
    height, outline width, colour bar width and peak ring radius, in picture pixels."""
    amap = np.zeros((h, w), np.float32)
    amap[h // 2, w // 4] = 1.0
    mask = np.zeros((h, w), bool)
    mask[h // 4 : h // 2 - h // 10, w // 2 : 3 * w // 4] = True
    pic = pictures.decision_picture(_gradient(h, w), amap, (0.0, 1.0), Verdict(0.5, anomalous=True, normalized=0.7),
                                    Regions(mask=mask), caption="a/b_png")  # fmt: skip
    header, right, bar = _layout(pic, pictures.DECISION_COLOURS[True])
    scale = (pic.shape[0] - header) / h
    column = pic[header:, right + int((5 * w // 8) * scale)]
    white = np.all(column == 255, axis=1)
    ring_row = pic[header + int((h // 2 + 0.5) * scale), right : right + round(w * scale)]  # through the peak
    ring = np.flatnonzero(np.all(ring_row == 255, axis=1))
    return {
        "height": pic.shape[0] - header,
        "text": _ink_rows(pic, header),
        "outline": int(white[int(h // 4 * scale) :].argmin()),  # the white run down from the mask's top edge
        "bar": int(np.argmax(np.all(pic[header + 5, bar:] == 255, axis=1))),
        "ring": (ring.max() - ring.min()) / 2,
    }


def test_decision_picture_marks_grow_with_the_picture():
    """On a 3000x2000 input the text, outlines, ring and bar are a fixed share of the
    picture, and on a 64 px one they keep a legible minimum."""
    tiny, mid, large = _marks(64, 64), _marks(400, 600), _marks(2000, 3000)
    assert large["height"] == 2000 and tiny["height"] >= 256
    assert large["text"] >= 0.02 * large["height"] and tiny["text"] >= 9
    assert large["outline"] >= 0.002 * large["height"] and large["outline"] > mid["outline"]
    assert large["bar"] >= 0.02 * large["height"] and large["bar"] > mid["bar"]
    assert large["ring"] >= 0.02 * large["height"] and large["ring"] > mid["ring"]


def test_a_long_caption_keeps_its_end():
    image = np.zeros((64, 64, 3), np.uint8)
    caption = "line3/" + "deep/" * 40 + "part_png"
    narrow = pictures.decision_picture(image, np.zeros((64, 64)), (0.0, 1.0), Verdict(0.1), caption=caption)
    short = pictures.decision_picture(image, np.zeros((64, 64)), (0.0, 1.0), Verdict(0.1), caption="part_png")
    assert narrow.shape == short.shape  # the caption does not widen the picture
    font = ImageFont.load_default(size=pictures.MIN_TEXT)
    cut = pictures._fit_left(caption, font, 300)
    assert cut.startswith("…") and cut.endswith("part_png") and font.getlength(cut) <= 300


def _report_inputs(n_good: int, n_bad: int, size: int = 32):
    rng = np.random.default_rng(1)
    labels = np.array([0] * n_good + [1] * n_bad)
    images = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)
    maps = rng.random((len(labels), size, size)).astype(np.float32) * (1 + labels[:, None, None])
    masks = np.zeros(maps.shape, bool)
    masks[labels == 1, 8:16, 8:16] = True
    scores = maps.reshape(len(labels), -1).max(1)
    pixels = metrics.PixelStats(lo=float(maps.min()), hi=float(maps.max()), maps=maps, masks=masks)
    good, bad = pictures.hardest_cases(labels, scores, 4)
    rows = np.concatenate([good, bad])
    cases = pictures.Cases(rows, images[rows], masks[rows], maps[rows], scores[rows], [f"{r}.png" for r in rows],
                          labels[rows], pixels.lo, pixels.hi)  # fmt: skip
    return labels, scores, pixels, cases


def _longest_white_band(path) -> float:
    """The tallest run of blank rows, as a share of the sheet's height."""
    png = np.asarray(Image.open(path).convert("RGB"))
    blank = np.all(png >= 250, axis=(1, 2))
    longest = run = 0
    for b in blank:
        run = run + 1 if b else 0
        longest = max(longest, run)
    return longest / len(blank)


def test_report_sheet_has_a_subtitle_and_no_empty_bands(tmp_path):
    labels, scores, pixels, cases = _report_inputs(6, 6)
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr_p, overlap = pixels.pro_curve
    cal = {"method": "quantile", "source": "5 held-out train/good images", "quantile": 0.9,
           "image_threshold": float(np.median(scores))}  # fmt: skip
    path = sheet.write_report(tmp_path / "r.png", sheet.ScoredSet(labels, scores, pixels), cases, cal,
                              sheet.Curves((fpr, tpr), (fpr_p[fpr_p <= 0.3], overlap[fpr_p <= 0.3])),
                              title="disk: rd4ad, epoch 3",
                               metrics={"image_auroc": 0.9876, "pixel_auroc": 0.5, "aupro": float("nan")})  # fmt: skip
    assert _longest_white_band(path) < 0.06
    lines = sheet.subtitle({"image_auroc": 0.9876, "pixel_auroc": 0.5, "aupro": float("nan")}, cal).splitlines()
    assert lines[0] == "image AUROC 98.8" and lines[1] == "pixel AUROC 50.0"  # a level a line; NaN left out
    assert lines[2].endswith(describe(cal))  # the threshold and where it came from
    # Good images only, no calibration, no curves: still a sheet, one row of cases.
    labels, scores, pixels, cases = _report_inputs(5, 0)
    path = sheet.write_report(
        tmp_path / "g.png", sheet.ScoredSet(labels, scores, pixels), cases, None, sheet.Curves(None, None)
    )
    assert _longest_white_band(path) < 0.06
