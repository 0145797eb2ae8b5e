"""report.html in a real headless browser (Debian's chromium, driven by playwright): it
loads without console errors, shows one card per test image, recounts at the slider's
threshold what Python computes there, and shows hostile file names as text."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import rdjax
from rdjax import webpage


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "the browser tests need chromium: apt-get install -y chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


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
    import shutil

    from rdjax import predict

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
