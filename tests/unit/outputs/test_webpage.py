"""report.html in a real headless browser (Debian's chromium, driven by playwright): it
loads without console errors, shows one card per test image, recounts at the slider's
threshold what Python computes there, orders the cards by score, says where the threshold
came from, and shows hostile file names as text. Its curves carry numeric ticks, and its
thumbnails the heat map."""

from __future__ import annotations

import base64
import io
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

import rdjax
from rdjax.evaluators import EvalContext
from rdjax.evaluators import report as report_evaluator
from rdjax.outputs import webpage


def _open(browser, path: Path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, problems


def test_report_page_counts_what_python_counts(trained, browser, tmp_path):
    config, work, _ = trained
    page, problems = _open(browser, work / "eval" / "epoch_0003" / "report.html")
    files = sorted((Path(config.dataset.root) / "disk" / "test").rglob("*.png"))
    assert page.locator(".card").count() == len(files)
    labels = np.array([f.parent.name != "good" for f in files])
    scores = rdjax.load(work).predict([str(f) for f in files]).scores.astype(np.float64)
    ordered = np.sort(scores)
    # Thresholds midway between adjacent scores: predict's scores and the evaluation's
    # embedded ones differ by float32 rounding only, far less than these gaps.
    for k in (2, len(scores) // 2, len(scores) - 2):
        t = float((ordered[k - 1] + ordered[k]) / 2)
        page.locator("#threshold").fill(repr(t))
        anomalous = scores >= t
        want = {
            "tp": anomalous & labels,
            "fp": anomalous & ~labels,
            "tn": ~anomalous & ~labels,
            "fn": ~anomalous & labels,
        }
        for key, mask in want.items():
            assert int(page.locator(f"#{key}").text_content()) == int(mask.sum()), (t, key)
        assert page.locator(".card.fp").count() == int(want["fp"].sum())
    assert page.locator("svg polyline").count() == 2  # ROC and PRO curves
    # Each thumbnail is the image beside its heat map: two panels side by side.
    assert page.locator(".card img").first.evaluate("i => i.naturalWidth / i.naturalHeight") > 1.9
    screenshot = tmp_path / "report_html.png"  # kept where the test fails (pytest's tmp_path retention)
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    assert problems == []


def test_hostile_file_names_are_text(browser, tmp_path):
    hostile = ["<img src=x onerror=alert(1)>.png", "</script><script>alert(2)</script>.png", "a\"b'c&d.png"]
    images = lambda rows: np.zeros((len(rows), 32, 32, 3), np.uint8)  # noqa: E731
    result = {k: 0.5 for k in ("image_auroc", "pixel_auroc", "aupro", "pro_rd4ad_per_image", "image_f1_max")}
    page = webpage.Page(
        "<b>category</b>", np.array([0.1, 0.2, 0.3]), hostile, images, labels=np.array([0, 1, 1]), metrics=result,
        threshold=0.15, pictures={1: hostile[1]},
    )  # fmt: skip
    path = webpage.write_page(tmp_path / "r.html", page)
    page, problems = _open(browser, path)
    assert problems == []  # no alert ran, no script broke
    texts = page.locator(".card").all_text_contents()
    for name, text in zip(hostile, texts):
        assert name in text
    assert page.locator("img").count() == 3  # the thumbnails only: no injected image
    assert page.locator("h1").text_content() == "<b>category</b>"
    assert int(page.locator("#tp").text_content()) == 2 and int(page.locator("#tn").text_content()) == 1


def test_predict_page_decides_as_scores_csv_says(trained, browser, tmp_path):
    """`rdjax predict` writes report.html beside scores.csv: one card per image, each
    linking its decision picture, one card per skipped file outside the slider's counts,
    and at the calibrated threshold (the slider's start) the page counts the anomalous
    decisions scores.csv lists."""
    import csv

    from rdjax.deploy import predict

    config, work, _ = trained
    folder = tmp_path / "in"
    shutil.copytree(Path(config.dataset.root) / "disk" / "test", folder)
    (folder / "notes.txt").write_text("not an image")
    predict.predict_folder(str(work), str(folder), tmp_path / "out")
    every = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    rows = [r for r in every if r["status"] == "scored"]
    page, problems = _open(browser, tmp_path / "out" / "report.html")
    assert page.locator(".card").count() == len(rows) == len(list(folder.rglob("*.png"))) == len(every) - 1
    assert page.locator(".skipcard").count() == 1 and int(page.locator("#skipped").text_content()) == 1
    assert int(page.locator("#ng").text_content()) == sum(r["decision"] == "anomalous" for r in rows) > 0
    assert int(page.locator("#ok").text_content()) == sum(r["decision"] == "normal" for r in rows) > 0
    links = [page.locator(".card a").nth(i).get_attribute("href") for i in range(len(rows))]
    assert all((tmp_path / "out" / href).is_file() for href in links)
    assert problems == []


def test_slider_starts_at_a_threshold_beyond_every_score(browser, tmp_path):
    """A predict page of good parts only: the calibrated threshold lies above every score,
    and the page must still start there (a slider's value is clamped into its range)."""
    images = lambda rows: np.zeros((len(rows), 16, 16, 3), np.uint8)  # noqa: E731
    page = webpage.Page(
        "good parts", np.array([0.1, 0.2, 0.3]), ["a.png", "b.png", "c#1.png"], images, threshold=0.5,
        pictures={2: "overlays/c#1.png"},
    )  # fmt: skip
    path = webpage.write_page(tmp_path / "r.html", page)
    page, problems = _open(browser, path)
    assert problems == []
    assert int(page.locator("#ng").text_content()) == 0 and int(page.locator("#ok").text_content()) == 3
    assert page.locator(".card a").get_attribute("href") == "overlays/c%231.png"


def _ticks(svg: str) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(x-axis ticks, y-axis ticks) of an SVG curve as (position, value): the x axis's
    labels share the lowest line, the y axis's one column."""
    found = [
        (float(x), float(y), float(v))
        for x, y, v in re.findall(r'class="tick" x="([\d.]+)" y="([\d.]+)"[^>]*>([^<]+)<', svg)
    ]
    bottom = max(y for _, y, _ in found)
    return [(x, v) for x, y, v in found if y == bottom], [(y, v) for x, y, v in found if y != bottom]


def test_curves_have_numeric_tick_labels():
    x = np.linspace(0, 0.3, 31)
    svg = webpage._svg_curve(x, np.sqrt(x / 0.3), "PRO", "false positive rate", "per-region overlap", 0.3)
    xs, ys = _ticks(svg)
    assert [v for _, v in xs] == pytest.approx([0, 0.1, 0.2, 0.3]) and [v for _, v in ys] == pytest.approx(
        np.linspace(0, 1, 6)
    )
    assert np.all(np.diff([p for p, _ in xs]) > 0) and np.all(np.diff([p for p, _ in ys]) < 0)  # y grows upward
    # The curve is drawn on the same scale as its ticks: its last point (0.3, 1) lies at
    # the '0.3' tick's x and the '1' tick's height.
    last = re.search(r'points="[^"]* ([\d.]+),([\d.]+)"', svg)
    assert float(last[1]) == pytest.approx(xs[-1][0]) and float(last[2]) == pytest.approx(ys[-1][0] - 3.5)
    roc_x, _ = _ticks(webpage._svg_curve(x, x, "ROC", "fpr", "tpr"))
    assert [v for _, v in roc_x] == pytest.approx(np.linspace(0, 1, 6))


def _thumbnails(path: Path) -> list[np.ndarray]:
    from PIL import Image

    urls = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', path.read_text())
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(u))).convert("RGB")).astype(int) for u in urls]


def test_thumbnails_show_the_heat_map_where_it_is_hot(tmp_path):
    """The card's picture is the plain image beside its overlay: the overlay is red where
    the map is hot, blue where it is cold, and the plain half shows neither."""
    image = np.full((64, 64, 3), 128, np.uint8)
    amap = np.zeros((64, 64), np.float32)
    amap[:32, :32] = 1.0  # hot top-left quadrant
    images = lambda rows: np.stack([image] * len(rows))  # noqa: E731
    maps = lambda rows: np.stack([amap] * len(rows))  # noqa: E731
    path = webpage.write_page(
        tmp_path / "r.html", webpage.Page("t", np.array([0.5]), ["a.png"], images, maps=maps, colour_range=(0.0, 1.0))
    )
    (thumb,) = _thumbnails(path)
    h, w = thumb.shape[:2]
    half = (w - 4) // 2
    assert h == webpage.THUMBNAIL and half == webpage.THUMBNAIL
    plain, heat = thumb[:, :half], thumb[:, -half:]
    assert np.abs(plain - 128).max() < 12  # the plain image, up to JPEG
    hot, cold = heat[h // 8, half // 8], heat[-h // 8, -half // 8]
    assert hot[0] > hot[2] + 60 and cold[2] > cold[0] + 60
    plain_only = webpage.write_page(tmp_path / "p.html", webpage.Page("t", np.array([0.5]), ["a.png"], images))
    assert _thumbnails(plain_only)[0].shape[1] == webpage.THUMBNAIL
    with pytest.raises(ValueError, match="colour_range"):
        webpage.write_page(tmp_path / "x.html", webpage.Page("t", np.array([0.5]), ["a.png"], images, maps=maps))


def test_sort_control_orders_cards_by_score(browser, tmp_path):
    """Ascending, descending and back to the listed order; the skipped cards stay last and
    the slider still decides each card by its own score after a reordering."""
    scores = np.array([0.5, 0.1, 0.9, 0.3, 0.7])
    names = [f"{i}.png" for i in range(len(scores))]
    images = lambda rows: np.zeros((len(rows), 16, 16, 3), np.uint8)  # noqa: E731
    path = webpage.write_page(
        tmp_path / "r.html",
        webpage.Page("sorting", scores, names, images, labels=np.array([0, 0, 1, 0, 1]), threshold=0.6,
                     skipped=[("notes.txt", "not an image file (.txt)")]),
    )  # fmt: skip
    page, problems = _open(browser, path)

    def shown() -> list[str]:
        return page.locator(".cards > div").evaluate_all(
            "cs => cs.map(c => c.classList.contains('skipcard') ? 'skipped' : c.children[1].textContent)"
        )

    page.select_option("#order", "up")
    assert shown() == [names[i] for i in np.argsort(scores)] + ["skipped"]
    page.locator("#threshold").fill("0.4")
    by_card = page.locator(".card").evaluate_all(
        "cs => cs.map(c => [parseFloat(c.children[2].textContent.split('score ')[1]), c.className])"
    )
    assert [("fp" in cls or "tp" in cls) for _, cls in by_card] == [s >= 0.4 for s, _ in by_card]
    page.select_option("#order", "down")
    assert shown() == [names[i] for i in np.argsort(-scores)] + ["skipped"]
    page.select_option("#order", "file")
    assert shown() == names + ["skipped"]
    assert problems == []


@pytest.mark.parametrize("on_test_set", [True, False])
def test_page_says_where_the_threshold_came_from(browser, tmp_path, on_test_set):
    """Beside the threshold, calibration.describe's phrase; marked as optimistic only
    where the test set chose the threshold."""
    from rdjax.scoring.thresholds import describe

    cal = (
        {"method": "f1", "source": "5 labelled test images", "fitted_on_test_set": True}
        if on_test_set
        else {"method": "quantile", "source": "20 held-out train/good images", "quantile": 0.99,
              "fitted_on_test_set": False}
    )  # fmt: skip
    cal["image_threshold"] = 0.2
    images = lambda rows: np.zeros((len(rows), 16, 16, 3), np.uint8)  # noqa: E731
    path = webpage.write_page(
        tmp_path / "r.html",
        webpage.Page("t", np.array([0.1, 0.3]), ["a.png", "b.png"], images, threshold=0.2, calibration=cal),
    )
    page, problems = _open(browser, path)
    origin = page.locator("#origin")
    assert origin.is_visible() and problems == []
    assert origin.text_content() == describe(cal)
    marked = page.locator("#origin.optimistic")
    if on_test_set:
        assert "test set" in describe(cal) and marked.count() == 1
        assert marked.evaluate("e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"
    else:
        assert "0.99" in describe(cal) and "20 held-out train/good images" in describe(cal) and marked.count() == 0


def test_evaluation_thumbnails_recompute_only_maps_the_pass_did_not_keep():
    """Binned pixel statistics keep no maps: the report computes a test image's map again
    only when the page asks for its chunk, so nothing per image is kept in between; exact
    ones are reused without computing anything."""
    n = webpage.PAGE_CHUNK + 3
    maps = np.random.default_rng(0).random((n, 8, 8)).astype(np.float32)
    asked: list[np.ndarray] = []

    def predict(split, rows):
        asked.append(rows)
        return maps[rows]

    def context(kept):
        passed = types.SimpleNamespace(pixels=types.SimpleNamespace(maps=kept))
        return EvalContext(None, list(range(n)), passed, None, predict, None, None)

    thumbnails = report_evaluator._thumbnail_maps(context(None))
    assert asked == []  # nothing before the page asks
    groups = webpage.chunks(n)
    assert [len(g) for g in groups] == [webpage.PAGE_CHUNK, 3]
    for group in groups:
        np.testing.assert_array_equal(thumbnails(group), maps[group])  # 8x8 maps are their own thumbnails
    np.testing.assert_array_equal(np.concatenate(asked), np.arange(n))  # every image once, in the page's order
    asked.clear()
    np.testing.assert_array_equal(report_evaluator._thumbnail_maps(context(maps))(np.array([3])), maps[[3]])
    assert asked == []
    big = np.zeros((1000, 500), np.float32)
    big[:500] = 1.0
    small = webpage.shrink_map(big)
    assert max(small.shape) == webpage.THUMBNAIL and small.mean() == pytest.approx(0.5, abs=0.01)
