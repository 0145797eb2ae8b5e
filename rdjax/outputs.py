"""Outputs a person reads: result tables (markdown) and pictures of the hardest cases."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from rdjax.metrics import METRIC_NAMES, PAPER_KEYS, TABLE_KEYS, nanmean, percent
from rdjax.workdir import atomic_path


def results_markdown(result: dict) -> str:
    lines = [
        f"# {result.get('category', '')} (epoch {result.get('epoch')})",
        "",
        "| " + " | ".join(METRIC_NAMES[k] for k in TABLE_KEYS) + " |",
        "|---" * len(TABLE_KEYS) + "|",
        "| " + " | ".join(percent(result.get(k)) for k in TABLE_KEYS) + " |",
        "",
        f"| defect type | images | {METRIC_NAMES['image_auroc']} |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {v['count']} | {percent(v['image_auroc'])} |" for t, v in result.get("per_type", {}).items()]
    if "threshold_note" in result:
        lines.append(f"\nDecisions: {result['threshold_note']}.")
    for w in result.get("warnings", []):
        lines.append(f"\n**Warning:** {w}")
    return "\n".join(lines) + "\n"


def summary_markdown(results: dict[str, dict], keys: tuple[str, ...] | None = None) -> str:
    """One table over categories with a mean row, in the paper's layout (percent)."""
    keys = keys or PAPER_KEYS
    lines = ["| category | " + " | ".join(METRIC_NAMES[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(percent(r.get(k)) for k in keys) + " |")
    means = [nanmean([r.get(k, np.nan) for r in results.values()]) for k in keys]
    lines.append("| **mean** | " + " | ".join(f"**{percent(m)}**" for m in means) + " |")
    on_test = [name for name, r in results.items() if r.get("calibration", {}).get("fitted_on_test_set")]
    if on_test:
        lines.append(f"\nDecision thresholds fitted on the test set ({', '.join(on_test)}): decisions on these "
                     "images are optimistic; the metrics above use no threshold.")  # fmt: skip
    return "\n".join(lines) + "\n"


def unified_markdown(result: dict) -> str:
    """A unified model's results: its categories' table, each on its own test split."""
    head = f"# one model for {len(result['categories'])} categories (epoch {result.get('epoch')})\n\n"
    table = summary_markdown({c: r for c, r in result["categories"].items() if "image_auroc" in r}, TABLE_KEYS)
    note = f"\nDecisions without a category: {result['threshold_note']}.\n" if "threshold_note" in result else ""
    return head + table + note


def fit_image(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 image at a map's ``shape``: where config.map_size gives maps of another size
    than the model's inputs, the picture shows the input resized to the map."""
    if image.shape[:2] == tuple(shape):
        return image
    from PIL import Image

    height, width = shape[:2]
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def overlay(image: np.ndarray, amap: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8 image blended half and half with the map in the 'jet' colour map (fixed lo..hi);
    an image of another size than the map (config.map_size) is resized to it first."""
    from matplotlib import colormaps

    image = fit_image(image, amap.shape)

    heat = colormaps["jet"](np.clip((amap - lo) / max(hi - lo, 1e-12), 0, 1))[..., :3]
    return (np.clip(0.5 * image.astype(np.float32) / 255.0 + 0.5 * heat, 0, 1) * 255).astype(np.uint8)


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The mask's pixels within ``width`` steps (4-neighbourhood) of a pixel outside it: an
    edge drawn inside the mask, so it never covers what lies outside. The image border
    counts as inside, so a mask reaching the border is not outlined along it."""
    inner = mask
    for _ in range(width):
        m = np.pad(inner, 1, mode="edge")
        inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def outcome(label: int, anomalous: bool | None) -> str:
    """What happened to a labelled image: true/false positive/negative ('anomalous' is
    the positive class), or its label alone where there is no threshold."""
    if anomalous is None:
        return "defective" if label else "good"
    return f"{'true' if bool(label) == bool(anomalous) else 'false'} {'positive' if anomalous else 'negative'}"


DECISION_COLOURS = {True: (190, 30, 30), False: (30, 130, 60), None: (90, 90, 90)}
MIN_PICTURE = 256  # px: a smaller image is enlarged (nearest neighbour) to this on its longer side
MIN_TEXT = 14  # px: the header's font size on the smallest pictures


@dataclasses.dataclass(frozen=True)
class _Marks:
    """A decision picture's mark sizes in pixels: fixed fractions of the body's height, so
    a 2,000 px picture reads as a 256 px one does, with floors for small pictures."""

    text: int  # font size
    line: int  # outline width
    radius: int  # the peak marker's radius
    ring: int  # its stroke
    bar: int  # the colour bar's width
    gap: int  # between panels

    @classmethod
    def for_height(cls, height: int) -> _Marks:
        return cls(
            text=max(MIN_TEXT, round(height * 0.035)),
            line=max(1, round(height / 350)),
            radius=max(8, round(height * 0.03)),
            ring=max(2, round(height / 400)),
            bar=max(12, round(height * 0.025)),
            gap=max(4, round(height / 100)),
        )


def _fit_left(text: str, font: Any, width: float) -> str:
    """``text`` cut at its start until it fits ``width`` px (a path's end says most)."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength("…" + text) > width:
        text = text[1:]
    return "…" + text


def decision_picture(
    image: np.ndarray,
    amap: np.ndarray,
    lo: float,
    hi: float,
    *,
    score: float,
    anomalous: bool | None = None,
    normalized: float | None = None,
    mask: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    caption: str = "",
) -> np.ndarray:
    """One image as a person checks it: a header with the decision (NG red, OK green, grey
    without a threshold), the score, the normalized score and the caption; the plain
    image (its ground truth ``truth`` outlined in red, where given) beside the image blended
    with its map on the run's one colour scale (lo..hi), with the mask's outline in white
    and the map's peak circled; and a colour bar with its range. The picture keeps the
    image's resolution (small images are enlarged, nearest neighbour, to MIN_PICTURE px),
    and its text, outlines, marker and bar grow with it (_Marks)."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    image = fit_image(image, amap.shape)
    h, w = amap.shape
    scale = max(1, -(-MIN_PICTURE // max(h, w)))
    bh, bw = h * scale, w * scale
    marks = _Marks.for_height(bh)
    native_line = max(1, round(marks.line / scale))
    plain = image.copy()
    if truth is not None:
        plain[outline(truth, native_line)] = (255, 0, 0)
    body = overlay(image, amap, lo, hi)
    if mask is not None:
        body[outline(mask, native_line)] = 255

    font = ImageFont.load_default(size=marks.text)
    small = ImageFont.load_default(size=max(MIN_TEXT, round(marks.text * 0.8)))
    pad, line_h = max(3, marks.text // 3), round(marks.text * 1.3)
    header = 2 * pad + 2 * line_h
    ticks = [(hi, 0), ((lo + hi) / 2, bh // 2), (lo, bh - 1)]
    label_w = max(int(small.getlength(f"{v:.3g}")) for v, _ in ticks) + 2 * pad
    bar_x = 2 * bw + 2 * marks.gap
    state = None if anomalous is None else bool(anomalous)
    verdict = {None: "", True: "NG   ", False: "OK   "}[state]
    first = f"{verdict}score {score:.4f}" + ("" if normalized is None else f"   normalized {normalized:.2f}")
    width = max(bar_x + marks.bar + marks.gap + label_w, int(font.getlength(first)) + 2 * pad)  # narrow images
    canvas = Image.new("RGB", (width, header + bh), (255, 255, 255))

    heat = Image.fromarray(body).resize((bw, bh), Image.Resampling.NEAREST)
    ring = ImageDraw.Draw(heat)  # on the overlay alone: a peak at its edge must not mark the plain image
    py, px = np.unravel_index(int(np.argmax(amap)), amap.shape)
    cx, cy, r, edge = (px + 0.5) * scale, (py + 0.5) * scale, marks.radius, max(1, marks.ring // 2)
    ring.ellipse((cx - r - edge, cy - r - edge, cx + r + edge, cy + r + edge), outline=(0, 0, 0), width=edge)
    ring.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(255, 255, 255), width=marks.ring)
    canvas.paste(Image.fromarray(plain).resize((bw, bh), Image.Resampling.NEAREST), (0, header))
    canvas.paste(heat, (bw + marks.gap, header))

    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, canvas.width, header - 1), fill=DECISION_COLOURS[state])
    draw.text((pad, pad), first, fill=(255, 255, 255), font=font)
    draw.text((pad, pad + line_h), _fit_left(caption, font, canvas.width - 2 * pad), fill=(255, 255, 255), font=font)

    ramp = colormaps["jet"](np.linspace(1, 0, bh))[:, :3]
    canvas.paste(
        Image.fromarray((np.repeat(ramp[:, None, :], marks.bar, axis=1) * 255).astype(np.uint8)), (bar_x, header)
    )
    for value, y in ticks:
        draw.line(
            (bar_x + marks.bar, header + y, bar_x + marks.bar + pad, header + y),
            fill=(0, 0, 0),
            width=max(1, marks.ring // 2),
        )
        anchor = "la" if y == 0 else "ld" if y == bh - 1 else "lm"
        draw.text((bar_x + marks.bar + pad + 2, header + y), f"{value:.3g}", fill=(0, 0, 0), font=small, anchor=anchor)
    return np.asarray(canvas)


def hardest_cases(labels: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest-scoring good images and the ``k`` lowest-scoring
    defective ones: the candidates for false positives and false negatives."""
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels != 0)
    return good[np.argsort(-scores[good], kind="stable")][:k], bad[np.argsort(scores[bad], kind="stable")][:k]


@dataclasses.dataclass
class Cases:
    """The hardest cases of an evaluation with their maps: all a report shows, and all
    it keeps (the other maps of the pass are gone)."""

    rows: np.ndarray
    images: np.ndarray  # uint8 (k, S, S, 3)
    masks: np.ndarray  # bool (k, S, S)
    maps: np.ndarray  # float32 (k, S, S)
    scores: np.ndarray
    filenames: list[str]
    labels: np.ndarray
    lo: float  # the colour scale: the lowest and highest pixel score of the whole pass
    hi: float


def write_overlays(directory: Path, cases: Cases, threshold: float | None) -> list[Path]:
    """A decision picture with the ground truth for each of the hardest cases, named by
    rank, outcome and file. Maps share one colour scale."""
    from PIL import Image

    paths = []
    for rank in range(len(cases.rows)):
        score = float(cases.scores[rank])
        anomalous = None if threshold is None else score >= threshold
        what = outcome(int(cases.labels[rank]), anomalous)
        picture = decision_picture(
            cases.images[rank],
            cases.maps[rank],
            cases.lo,
            cases.hi,
            score=score,
            anomalous=anomalous,
            truth=cases.masks[rank],
            caption=f"{what}: {cases.filenames[rank]}",
        )
        name = cases.filenames[rank].replace("/", "_").rsplit(".", 1)[0]
        path = directory / f"{rank:02d}_{what.replace(' ', '_')}_{name}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(picture).save(tmp)
        paths.append(path)
    return paths


def write_evaluation(workdir: Path, epoch: int, result: dict) -> Path:
    """An evaluation's result into eval/epoch_NNNN/metrics.json. Where it holds the
    metrics (an evaluation without them, by the evaluators' cadences, has none), also
    results.md there, and both copied to the workdir's top (the latest evaluation with
    metrics). Its calibration, where it has one, becomes calibration.json."""
    from rdjax.workdir import CALIBRATION, write_json, write_text

    out = evaluation_dir(workdir, epoch)
    if "calibration" in result:
        write_json(workdir / CALIBRATION, result["calibration"])
    write_json(out / "metrics.json", result)
    for category, part in result.get("categories", {}).items():  # the unified setting
        if "image_auroc" in part:
            write_text(out / category / "results.md", results_markdown(part))
    if "image_auroc" in result:
        table = unified_markdown(result) if "categories" in result else results_markdown(result)
        write_text(out / "results.md", table)
        write_json(workdir / "metrics.json", result)
        write_text(workdir / "results.md", table)
    return out


SELECTION_KEYS = PAPER_KEYS


def write_best_on_test(workdir: Path) -> dict | None:
    """best_on_test.json: the evaluation with the highest mean of image AUROC, pixel AUROC and
    AUPRO, as RD++'s official script keeps its checkpoint. That is a choice made on the
    test set, so the file says so; metrics.json stays the last evaluation."""
    from rdjax.workdir import read_json, write_json

    best = None
    for path in sorted((workdir / "eval").glob("epoch_*/metrics.json")):
        result = read_json(path)
        if not all(k in result for k in SELECTION_KEYS):
            continue
        score = sum(result[k] for k in SELECTION_KEYS) / len(SELECTION_KEYS)
        if best is None or score > best[0]:
            best = (score, result)
    if best is None:
        return None
    selected = {
        "selected_on": "the test set: the epoch with the best mean of image AUROC, pixel AUROC and AUPRO "
        "among the evaluated ones (RD++'s official protocol); not a held-out result",
        "epoch": best[1]["epoch"],
        **{k: best[1][k] for k in SELECTION_KEYS},
    }
    write_json(workdir / "best_on_test.json", selected)
    return selected


def evaluation_dir(workdir: Path, epoch: int) -> Path:
    return workdir / "eval" / f"epoch_{epoch:04d}"


# ----------------------------------------------------------------------------- predict's files

PREDICTION_FIELDS = ["file", "status", "score", "normalized_score", "decision", "reason"]


def write_prediction(
    out: Path, name: str, source: str, image: np.ndarray, pred: Any, i: int, lo_hi: tuple[float, float]
) -> dict:
    """Image ``i`` of a Prediction: OUT/overlays/<name>.png, OUT/masks/<name>_mask.png
    when calibrated; returns its scores.csv row."""
    from PIL import Image

    calibrated = pred.decisions is not None
    picture = decision_picture(
        image, pred.maps[i], *lo_hi, score=float(pred.scores[i]),
        anomalous=bool(pred.decisions[i]) if calibrated else None,
        normalized=float(pred.normalized_scores[i]) if calibrated else None,
        mask=pred.masks[i] if calibrated else None, caption=name,
    )  # fmt: skip
    overlay, mask_file = out / "overlays" / f"{name}.png", out / "masks" / f"{name}_mask.png"
    overlay.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(overlay) as tmp:
        Image.fromarray(picture).save(tmp)
    row = {"file": source, "status": "scored", "score": f"{pred.scores[i]:.6f}", "normalized_score": "",
           "decision": "", "reason": ""}  # fmt: skip
    if calibrated:
        mask_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(mask_file) as tmp:
            Image.fromarray((pred.masks[i] * 255).astype(np.uint8)).save(tmp)
        row["normalized_score"] = f"{pred.normalized_scores[i]:.6f}"
        row["decision"] = "anomalous" if pred.decisions[i] else "normal"
    return row


def skipped_row(source: str, reason: str) -> dict:
    """scores.csv's row for an input that could not be scored."""
    return {"file": source, "status": "skipped", "score": "", "normalized_score": "", "decision": "", "reason": reason}
