"""An evaluation or a predict run as one self-contained HTML page (report.html) a
person can browse.

One card per image (a thumbnail of the image beside its heat map, the file name, the label
if known, the score, and a link to its decision picture where there is one), the metrics
table, the image ROC curve and the PRO curve as inline SVG with labelled axes
(evaluations), a threshold slider, and a control that orders the cards by score. Moving
the slider re-decides every card and recounts, in the browser from the scores embedded in
the page, true and false positives and negatives (labelled images) or anomalous and
normal decisions (predict). Beside the calibrated threshold the page says where it came
from, and marks one fitted on the test set itself. Every name from the data is escaped
(file names are text, never markup; a byte that is not UTF-8 is shown as \\xNN), and the
embedded data is JSON with '<' escaped, so no file name can end the script.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import importlib.resources
import io
import json
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rdjax.data.preprocess import printable
from rdjax.outputs.pictures import overlay
from rdjax.runtime.disk import atomic_path
from rdjax.scoring.metrics import METRIC_NAMES, TABLE_KEYS, percent
from rdjax.scoring.thresholds import describe

THUMBNAIL = 112  # px, the longer side of each of a card's two pictures (the image, its heat map)
CURVE_POINTS = 400  # curves are thinned to about this many points


def _text(text: str) -> str:
    """A name from the data (or a message holding one) as HTML text: escaped, and any
    byte that is not UTF-8 written as \\xNN (preprocess.printable), as scores.csv has it."""
    return html.escape(printable(text))


def shrink_map(amap: np.ndarray) -> np.ndarray:
    """A map at thumbnail size (float32, the longer side at most THUMBNAIL, averaged down):
    what a run keeps of each map for its page, instead of the full-resolution one."""
    from PIL import Image

    h, w = amap.shape
    k = max(h, w) / THUMBNAIL
    if k <= 1:
        return np.asarray(amap, np.float32)
    size = (max(1, round(w / k)), max(1, round(h / k)))
    return np.asarray(Image.fromarray(np.asarray(amap, np.float32)).resize(size, Image.Resampling.BILINEAR))


def _thumbnail(image: np.ndarray, amap: np.ndarray | None = None, lo: float = 0.0, hi: float = 1.0) -> str:
    """A JPEG data URL: the image fitted to THUMBNAIL px (small ones enlarged, so every card
    reads alike), and with a map the image beside its overlay (the map resized to the
    thumbnail, on the page's one colour scale lo..hi)."""
    from PIL import Image, ImageOps

    img = ImageOps.contain(Image.fromarray(image), (THUMBNAIL, THUMBNAIL), Image.Resampling.BICUBIC)
    if amap is not None:
        small = Image.fromarray(np.asarray(amap, np.float32)).resize(img.size, Image.Resampling.BILINEAR)
        heat = Image.fromarray(overlay(np.asarray(img), np.asarray(small), lo, hi))
        both = Image.new("RGB", (2 * img.width + 4, img.height), (255, 255, 255))
        both.paste(img, (0, 0))
        both.paste(heat, (img.width + 4, 0))
        img = both
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _svg_curve(x: np.ndarray, y: np.ndarray, title: str, xlabel: str, ylabel: str, xmax: float = 1.0) -> str:
    """A curve on [0, xmax] x [0, 1] with ticks and numeric labels on both axes."""
    left, top, size = 46, 10, 200
    step = max(1, len(x) // CURVE_POINTS)
    keep = np.r_[np.arange(0, len(x), step), len(x) - 1] if len(x) else np.array([], int)
    pts = " ".join(f"{left + size * xi / xmax:.1f},{top + size * (1 - yi):.1f}" for xi, yi in zip(x[keep], y[keep]))
    marks = []
    for v in np.linspace(0, xmax, 4 if xmax < 0.5 else 6):
        px = left + size * v / xmax
        marks.append(
            f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{top + size + 4}" stroke="#ddd"/>'
            f'<text class="tick" x="{px:.1f}" y="{top + size + 16}" text-anchor="middle" font-size="10">'
            f"{round(float(v), 6):g}</text>"
        )
    for v in np.linspace(0, 1, 6):
        py = top + size * (1 - v)
        marks.append(
            f'<line x1="{left - 4}" y1="{py:.1f}" x2="{left + size}" y2="{py:.1f}" stroke="#ddd"/>'
            f'<text class="tick" x="{left - 6}" y="{py + 3.5:.1f}" text-anchor="end" font-size="10">'
            f"{round(float(v), 6):g}</text>"
        )
    return (
        f'<figure class="curve"><svg width="256" height="252" viewBox="0 0 256 252">{"".join(marks)}'
        f'<rect x="{left}" y="{top}" width="{size}" height="{size}" fill="none" stroke="#999"/>'
        f'<polyline points="{pts}" fill="none" stroke="#c33" stroke-width="2"/>'
        f'<text x="{left + size / 2}" y="248" text-anchor="middle" font-size="11">{html.escape(xlabel)}</text>'
        f'<text x="12" y="{top + size / 2}" font-size="11" transform="rotate(-90 12 {top + size / 2})" '
        f'text-anchor="middle">{html.escape(ylabel)}</text></svg><figcaption>{html.escape(title)}</figcaption></figure>'
    )


def _asset(name: str) -> str:
    """A file of rdjax/outputs/assets: the page's style and script, kept as files so they can
    be linted and tested as such."""
    return (importlib.resources.files("rdjax.outputs") / "assets" / name).read_text(encoding="utf-8")


STYLE = _asset("report.css")
SCRIPT = _asset("report.js")


@dataclasses.dataclass(frozen=True)
class Page:
    """What report.html shows. ``labels``: 0 = good (None: unlabelled images, as predict
    scores them); ``images(rows)``: uint8 images of those rows, decoded on demand;
    ``maps(rows)``: their anomaly maps at any resolution (shrink_map's will do), shown
    over the thumbnails on the one colour scale ``colour_range`` (lo, hi) (None: plain
    thumbnails); ``metrics``: a result whose METRIC_NAMES entries make the table (None: no
    table); ``calibration``: the calibration the threshold came from (calibration.json's
    dict) to say so beside it (rdjax.scoring.thresholds.describe), marked where the test set
    chose it; ``pictures``: row -> a decision picture's path relative to the page;
    ``skipped``: (name, reason) of each input that could not be scored, a card each,
    outside the slider's counts."""

    title: str
    scores: np.ndarray
    filenames: Sequence[str]
    images: Callable[[np.ndarray], Sequence[np.ndarray] | np.ndarray]
    labels: np.ndarray | None = None
    metrics: Mapping[str, Any] | None = None
    threshold: float | None = None
    roc: tuple[np.ndarray, np.ndarray] | None = None
    pro: tuple[np.ndarray, np.ndarray] | None = None
    pictures: Mapping[int, str] = dataclasses.field(default_factory=dict)
    skipped: Sequence[tuple[str, str]] = ()
    maps: Callable[[np.ndarray], Sequence[np.ndarray] | np.ndarray] | None = None
    colour_range: tuple[float, float] | None = None
    calibration: Mapping[str, Any] | None = None


def _threshold_note(page: Page) -> str:
    if page.threshold is None:
        return ""
    note = f"(calibrated threshold {page.threshold:.6g})"
    cal = page.calibration
    if cal is None:
        return note
    # describe's rule: a calibration.json without 'fitted_on_test_set' is on the test set when it is F1's.
    optimistic = " optimistic" if cal.get("fitted_on_test_set", cal.get("method") == "f1") else ""
    return f'{note}<br><span class="origin{optimistic}" id="origin">{html.escape(describe(dict(cal)))}</span>'


def _head(page: Page, scores: np.ndarray) -> str:
    start = page.threshold if page.threshold is not None else float(np.median(scores)) if len(scores) else 0.0
    # The range holds the threshold too: a browser clamps a slider's value into its range,
    # which would re-decide images when every score lies on one side of the threshold.
    lo, hi = min([*scores.tolist(), start]), max([*scores.tolist(), start])
    table = ""
    if page.metrics is not None:
        table = (
            "<table><tr>"
            + "".join(f"<th>{METRIC_NAMES[k]}</th>" for k in TABLE_KEYS)
            + "</tr><tr>"
            + "".join(f"<td>{percent(page.metrics.get(k))}</td>" for k in TABLE_KEYS)
            + "</tr></table>"
        )
    curves = []
    if page.roc is not None:
        curves.append(_svg_curve(*page.roc, "ROC (images)", "false positive rate", "true positive rate"))
    if page.pro is not None:
        curves.append(_svg_curve(*page.pro, "PRO (pixels)", "false positive rate", "per-region overlap", 0.3))
    counts = (
        'true positives <b id="tp"></b>, false positives <b id="fp"></b>, true negatives <b id="tn">'
        '</b>, false negatives <b id="fn"></b>'
        if page.labels is not None
        else 'anomalous <b id="ng"></b>, normal <b id="ok"></b>'
    )
    if page.skipped:
        counts += f', skipped <b id="skipped">{len(page.skipped)}</b>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_text(page.title)}</title><style>
{STYLE}</style></head>
<body><h1>{_text(page.title)}</h1>
{table}
<div class="curves">{"".join(curves)}</div>
<div id="controls"><label for="threshold">image threshold</label>
<input type="range" id="threshold" min="{lo!r}" max="{hi!r}" step="any" value="{start!r}">
<span id="value"></span> &nbsp; {counts}
{_threshold_note(page)}<br><label for="order">order of the cards</label>
<select id="order"><option value="file">as listed</option><option value="up">score, lowest first</option>
<option value="down">score, highest first</option></select></div>
<div class="cards">
"""


def _card(page: Page, row: int, image: np.ndarray, amap: np.ndarray | None, scores: np.ndarray) -> str:
    extra = ""
    if row in page.pictures:
        extra = f'<a href="{html.escape(urllib.parse.quote(page.pictures[row]), quote=True)}">decision picture</a>'
    label = "" if page.labels is None else ("defective, " if page.labels[row] else "good, ")
    thumbnail = _thumbnail(image, amap, *(page.colour_range or (0.0, 1.0)))
    return (
        f'<div class="card"><img alt="" src="{thumbnail}"><div>{_text(page.filenames[row])}'
        f"</div><div>{label}score {scores[row]:.5f}</div>"
        f'<div class="outcome"></div>{extra}</div>\n'
    )


PAGE_CHUNK = 16  # cards made at a time


def chunks(n: int) -> list[np.ndarray]:
    """The rows of n cards in the groups write_page makes them in (Page.maps is called
    once per group, in this order: a collective maps function runs on every process)."""
    return [np.arange(begin, min(begin + PAGE_CHUNK, n)) for begin in range(0, n, PAGE_CHUNK)]


def write_page(path: Path, page: Page) -> Path:
    """The cards are decoded PAGE_CHUNK images at a time and written as they are made, so
    memory does not grow with the number of images."""
    if page.maps is not None and page.colour_range is None:
        raise ValueError("Page.maps needs Page.colour_range: every thumbnail's heat map shares one scale")
    scores = np.asarray(page.scores, np.float64)
    labels = None if page.labels is None else [int(v != 0) for v in page.labels]
    data = json.dumps({"scores": scores.tolist(), "labels": labels}).replace("<", "\\u003c")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write(_head(page, scores))
        for rows in chunks(len(scores)):
            maps: Sequence[np.ndarray | None] = [None] * len(rows) if page.maps is None else list(page.maps(rows))
            for row, image, amap in zip(rows, page.images(rows), maps):
                out.write(_card(page, int(row), image, amap, scores))
        for name, reason in page.skipped:
            out.write(f'<div class="skipcard"><div>{_text(name)}</div><div>skipped: {_text(reason)}</div></div>\n')
        out.write(f"""</div>
<script type="application/json" id="data">{data}</script>
<script>
{SCRIPT}</script>
</body></html>
""")
    return path
