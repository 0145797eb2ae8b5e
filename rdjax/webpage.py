"""An evaluation or a predict run as one self-contained HTML page (report.html) a
person can browse.

One card per image (a thumbnail, the file name, the label if known, the score, and a
link to its decision picture where there is one), the metrics table, the image ROC curve
and the PRO curve as inline SVG (evaluations), and a threshold slider: moving it
re-decides every card and recounts, in the browser from the scores embedded in the page,
true and false positives and negatives (labelled images) or anomalous and normal
decisions (predict). Every name from the data is escaped (file names are text, never markup), and
the embedded data is JSON with '<' escaped, so no file name can end the script.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rdjax.metrics import METRIC_NAMES, TABLE_KEYS
from rdjax.workdir import atomic_path

THUMBNAIL = 128  # px, the longer side of each card's picture
CURVE_POINTS = 400  # curves are thinned to about this many points


def _thumbnail(image: np.ndarray) -> str:
    from PIL import Image

    img = Image.fromarray(image)
    img.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _svg_curve(x: np.ndarray, y: np.ndarray, title: str, xlabel: str, ylabel: str, xmax: float = 1.0) -> str:
    step = max(1, len(x) // CURVE_POINTS)
    keep = np.r_[np.arange(0, len(x), step), len(x) - 1] if len(x) else np.array([], int)
    pts = " ".join(f"{40 + 200 * xi / xmax:.1f},{210 - 200 * yi:.1f}" for xi, yi in zip(x[keep], y[keep]))
    return (
        f'<figure class="curve"><svg width="250" height="240" viewBox="0 0 250 240">'
        f'<rect x="40" y="10" width="200" height="200" fill="none" stroke="#999"/>'
        f'<polyline points="{pts}" fill="none" stroke="#c33" stroke-width="2"/>'
        f'<text x="140" y="235" text-anchor="middle" font-size="11">{html.escape(xlabel)} (0 to {xmax:g})</text>'
        f'<text x="12" y="110" font-size="11" transform="rotate(-90 12 110)" text-anchor="middle">'
        f"{html.escape(ylabel)}</text></svg><figcaption>{html.escape(title)}</figcaption></figure>"
    )


_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
.curves{display:flex;gap:1.5em}.curve{margin:0}
#controls{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd}
#threshold{width:28em;vertical-align:middle}
.cards{display:flex;flex-wrap:wrap;gap:.6em;margin-top:1em}
.card{width:150px;border:3px solid #ccc;border-radius:4px;padding:4px;font-size:12px;overflow-wrap:anywhere}
.card img{max-width:100%}.card.tp{border-color:#1a7f37}.card.tn{border-color:#8c8}
.card.fp{border-color:#d93}.card.fn{border-color:#c22}.card.ng{border-color:#c22}.card.ok{border-color:#8c8}
.outcome{font-weight:bold}
.skipcard{width:150px;border:3px dashed #999;border-radius:4px;padding:4px;font-size:12px;overflow-wrap:anywhere}
.skipcard{color:#555}
"""

_SCRIPT = """
const data = JSON.parse(document.getElementById('data').textContent);
const slider = document.getElementById('threshold');
const cards = Array.from(document.querySelectorAll('.card'));
const names = {tp: 'true positive', fp: 'false positive', tn: 'true negative', fn: 'false negative',
               ng: 'anomalous', ok: 'normal'};
function update() {
  const t = parseFloat(slider.value);
  const counts = data.labels ? {tp: 0, fp: 0, tn: 0, fn: 0} : {ng: 0, ok: 0};
  cards.forEach((card, i) => {
    const anomalous = data.scores[i] >= t;
    const kind = !data.labels ? (anomalous ? 'ng' : 'ok')
      : anomalous ? (data.labels[i] ? 'tp' : 'fp') : (data.labels[i] ? 'fn' : 'tn');
    counts[kind] += 1;
    card.className = 'card ' + kind;
    card.querySelector('.outcome').textContent = (anomalous ? 'NG, ' : 'OK, ') + names[kind];
  });
  for (const k in counts) document.getElementById(k).textContent = counts[k];
  document.getElementById('value').textContent = t.toPrecision(6);
}
slider.addEventListener('input', update);
update();
"""


@dataclasses.dataclass(frozen=True)
class Page:
    """What report.html shows. ``labels``: 0 = good (None: unlabelled images, as predict
    scores them); ``images(rows)``: uint8 images of those rows, decoded on demand;
    ``metrics``: a result whose METRIC_NAMES entries make the table (None: no table);
    ``pictures``: row -> a decision picture's path relative to the page; ``skipped``:
    (name, reason) of each input that could not be scored, a card each, outside the
    slider's counts."""

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
            + "".join(f"<td>{100 * float(page.metrics[k]):.1f}</td>" for k in TABLE_KEYS)
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
    calibrated = "" if page.threshold is None else f"(calibrated: {page.threshold:.6g})"
    if page.skipped:
        counts += f', skipped <b id="skipped">{len(page.skipped)}</b>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(page.title)}</title><style>{_STYLE}</style></head>
<body><h1>{html.escape(page.title)}</h1>
{table}
<div class="curves">{"".join(curves)}</div>
<div id="controls"><label for="threshold">image threshold</label>
<input type="range" id="threshold" min="{lo!r}" max="{hi!r}" step="any" value="{start!r}">
<span id="value"></span> &nbsp; {counts}
{calibrated}</div>
<div class="cards">
"""


def _card(page: Page, row: int, image: np.ndarray, scores: np.ndarray) -> str:
    extra = ""
    if row in page.pictures:
        extra = f'<a href="{html.escape(urllib.parse.quote(page.pictures[row]), quote=True)}">decision picture</a>'
    label = "" if page.labels is None else ("defective, " if page.labels[row] else "good, ")
    return (
        f'<div class="card"><img alt="" src="{_thumbnail(image)}"><div>{html.escape(page.filenames[row])}'
        f"</div><div>{label}score {scores[row]:.5f}</div>"
        f'<div class="outcome"></div>{extra}</div>\n'
    )


def write_page(path: Path, page: Page, chunk: int = 16) -> Path:
    """The cards are decoded ``chunk`` images at a time and written as they are made, so
    memory does not grow with the number of images."""
    scores = np.asarray(page.scores, np.float64)
    labels = None if page.labels is None else [int(v != 0) for v in page.labels]
    data = json.dumps({"scores": scores.tolist(), "labels": labels}).replace("<", "\\u003c")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write(_head(page, scores))
        for begin in range(0, len(scores), chunk):
            rows = np.arange(begin, min(begin + chunk, len(scores)))
            for row, image in zip(rows, page.images(rows)):
                out.write(_card(page, int(row), image, scores))
        for name, reason in page.skipped:
            out.write(
                f'<div class="skipcard"><div>{html.escape(name)}</div><div>skipped: {html.escape(reason)}</div></div>\n'
            )
        out.write(f"""</div>
<script type="application/json" id="data">{data}</script>
<script>{_SCRIPT}</script>
</body></html>
""")
    return path
