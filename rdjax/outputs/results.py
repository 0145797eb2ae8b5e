"""Outputs a person reads: result tables (markdown) and pictures of the hardest cases."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from rdjax.data.preprocess import Recipe, printable
from rdjax.errors import WorkdirError
from rdjax.runtime.workdir import atomic_path
from rdjax.scoring.metrics import METRIC_NAMES, PAPER_KEYS, TABLE_KEYS, nanmean, percent
from rdjax.scoring.thresholds import CONFUSION_KEYS, colour_scale, few_images


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
    cal = result.get("calibration")
    if cal is not None and "confusion" in result:
        lines += ["", confusion_markdown(result["confusion"], cal["image_threshold"])]
    for w in [few_images(cal) if cal is not None else None, *result.get("warnings", [])]:
        if w:
            lines.append(f"\n**Warning:** {w}")
    return "\n".join(lines) + "\n"


def confusion_markdown(counts: dict[str, int], threshold: float) -> str:
    """The test images' decisions at the image threshold (calibration.confusion), as a
    table of label against decision."""
    total = sum(counts.values())
    return "\n".join([
        f"At the image threshold {threshold:.6g}, of {total} test images:",
        "",
        "| | called anomalous | called good |",
        "|---|---|---|",
        f"| defective | {counts['true_positives']} true positives | {counts['false_negatives']} false negatives |",
        f"| good | {counts['false_positives']} false positives | {counts['true_negatives']} true negatives |",
    ])  # fmt: skip


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
    return head + table + note + unified_decisions_markdown(result) + router_markdown(result)


def router_markdown(result: dict) -> str:
    """How often the category router (rdjax.scoring.router, predict's --category=auto) named each
    category's test images rightly."""
    accuracy = result.get("router_accuracy")
    if not accuracy:
        return ""
    parts = ", ".join(f"{c} {100 * a:.1f}%" for c, a in accuracy.items() if c != "all")
    recognised = f"{100 * accuracy['all']:.1f}% of the test images recognised ({parts})"
    return f"\nCategory router (`--category=auto`): {recognised}.\n"


def unified_decisions_markdown(result: dict) -> str:
    """Each category's test images decided by its own thresholds (calibration.json's
    'categories'), and all of them by the global one: the counts, and how many images
    each threshold rests on (a warning where too few, calibration.few_images)."""
    cal = result.get("calibration")
    if cal is None:
        return ""
    rows = [(c, r["calibration"], r.get("confusion")) for c, r in result["categories"].items() if "calibration" in r]
    rows.append(("**global**", cal, result.get("confusion")))
    lines = [
        "\n| thresholds of | image threshold | fitted on images | true positives | false positives "
        "| true negatives | false negatives |",
        "|---" * 7 + "|",
    ]
    for name, c, counts in rows:
        cells = [counts[k] if counts else "n/a" for k in CONFUSION_KEYS]
        lines.append(f"| {name} | {c['image_threshold']:.6g} | {c.get('num_images', 'n/a')} | "
                     + " | ".join(str(v) for v in cells) + " |")  # fmt: skip
    warnings = [(name, few_images(c)) for name, c, _ in rows]
    lines += [f"\n**Warning** ({name.strip('*')}): {w}" for name, w in warnings if w]
    return "\n".join(lines) + "\n"


CROP_NOTE_AREA = 0.05
"""A recipe's centre crop is stated when it cuts more than this share of an image's area.
5% of the area is a band of about 1.3% of the side along each edge (13 px of a 1024 px
part): framing margins are wider, and few marked defects are that thin. A larger crop
can hide a whole defect near an edge (Dinomaly's official 448 -> 392 cuts 23%; 448 ->
126 leaves 8% of the image)."""


def seen_fraction(recipe: Recipe) -> float:
    """The share of an image's area the model sees through the recipe's centre crop."""
    side = recipe.resize or recipe.size
    return min(1.0, (recipe.size / side) ** 2)


def crop_note(recipe: Recipe) -> str | None:
    """What a run says when it starts where the recipe's crop cuts more than CROP_NOTE_AREA
    of each image, else None."""
    seen = seen_fraction(recipe)
    if 1 - seen <= CROP_NOTE_AREA:
        return None
    side = recipe.resize
    return (
        f"the model sees the central {recipe.size}x{recipe.size} px of each image resized to {side}x{side}: "
        f"{100 * seen:.3g}% of its area ({100 * recipe.size / side:.3g}% of each side); the border outside "
        f"is not inspected (config.input.resize={side}, config.image_size={recipe.size})"
    )


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


SHADE = 0.4  # brightness kept where the model did not look: darkened ...
HATCH = (150, 150, 150)  # ... and crossed by grey diagonal lines, unlike any colour of the map's scale


def shade_uninspected(panel: np.ndarray, image: np.ndarray, inspected: np.ndarray) -> np.ndarray:
    """``panel`` (uint8 H x W x 3) with what the model did not inspect (outside the bool
    ``inspected``, e.g. the border a centre crop cut away) replaced by the ``image``
    darkened to SHADE and hatched: a map is 0 there, which the colour scale would draw as
    'inspected and fine'. The hatch's lines are 1 / 8 of their spacing wide, the spacing
    2% of the panel's height (at least 6 px), so they read at any resolution."""
    h, w = inspected.shape
    spacing = max(6, round(0.02 * h))
    yy, xx = np.mgrid[0:h, 0:w]
    hatch = (yy + xx) % spacing < max(1, spacing // 8)
    out = panel.copy()
    outside = ~inspected
    out[outside] = (image[outside] * SHADE).astype(np.uint8)
    out[outside & hatch] = HATCH
    return out


def inspected_region(shape: tuple[int, int], recipe: Recipe) -> np.ndarray:
    """bool (H, W): the part of an image of ``shape`` the model saw through the recipe's
    centre crop (all of it without a crop), as rdjax.scoring.tiling.uncrop_map places a map."""
    from rdjax.scoring.tiling import uncrop_map

    return uncrop_map(np.ones((recipe.size, recipe.size), np.float32), shape, recipe) > 0.5


def header_lines(
    score: float,
    anomalous: bool | None,
    normalized: float | None,
    threshold: float | None,
    category: str | None,
    caption: str,
) -> list[str]:
    """A decision picture's header: the decision and the score against the threshold
    that decided it, with whose threshold that is (``category``: a category, 'global' for
    a unified model's global one, None when not known), then the caption."""
    verdict = {None: "", True: "NG   ", False: "OK   "}[anomalous]
    against = "" if threshold is None or anomalous is None else f" {'>=' if anomalous else '<'} {threshold:.4g}"
    first = f"{verdict}score {score:.4f}{against}" + ("" if normalized is None else f"   normalized {normalized:.2f}")
    if threshold is None:
        return [first, caption]
    whose = {None: "", "global": " (global, over every category)"}.get(category, f" of category {category}")
    return [first, f"image threshold {threshold:.4g}{whose}", caption]


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
    threshold: float | None = None,
    category: str | None = None,
    inspected: np.ndarray | None = None,
) -> np.ndarray:
    """One image as a person checks it: a header (`header_lines`: the decision, NG red, OK
    green, grey without a threshold; the score against the ``threshold`` that decided and
    whose it is, ``category``; the normalized score; the caption); the plain image (its
    ground truth ``truth`` outlined in red, where given) beside the image blended with its
    map on the colour scale lo..hi (calibration.colour_scale: the threshold in the
    middle), with the mask's outline in white, the map's peak circled and what the model
    did not see (outside the bool ``inspected``, at the map's size) shaded
    (`shade_uninspected`); and a colour bar with its range and the threshold marked. The
    picture keeps the image's resolution (small images are enlarged, nearest neighbour,
    to MIN_PICTURE px), and its text, outlines, marker and bar grow with it (_Marks)."""
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
    if inspected is not None:
        body = shade_uninspected(body, image, inspected)
        amap = np.where(inspected, amap, -np.inf)  # the peak marked is one the model saw

    font = ImageFont.load_default(size=marks.text)
    small = ImageFont.load_default(size=max(MIN_TEXT, round(marks.text * 0.8)))
    pad, line_h = max(3, marks.text // 3), round(marks.text * 1.3)
    state = None if anomalous is None else bool(anomalous)
    lines = header_lines(score, state, normalized, threshold, category, caption)
    header = 2 * pad + len(lines) * line_h
    if threshold is None:
        ticks = [(hi, 0, ""), ((lo + hi) / 2, bh // 2, ""), (lo, bh - 1, "")]
    else:
        at = int(np.clip(round((hi - threshold) / max(hi - lo, 1e-12) * (bh - 1)), 0, bh - 1))
        ticks = [(hi, 0, ""), (threshold, at, " threshold"), (lo, bh - 1, "")]
    label_w = max(int(small.getlength(f"{v:.3g}{what}")) for v, _, what in ticks) + 2 * pad
    bar_x = 2 * bw + 2 * marks.gap
    text_w = max(int(font.getlength(line)) for line in lines[:-1]) + 2 * pad  # the caption is cut to fit
    width = max(bar_x + marks.bar + marks.gap + label_w, text_w)  # narrow images
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
    for k, line in enumerate(lines[:-1]):
        draw.text((pad, pad + k * line_h), line, fill=(255, 255, 255), font=font)
    caption_y = pad + (len(lines) - 1) * line_h
    draw.text((pad, caption_y), _fit_left(lines[-1], font, canvas.width - 2 * pad), fill=(255, 255, 255), font=font)

    ramp = colormaps["jet"](np.linspace(1, 0, bh))[:, :3]
    canvas.paste(
        Image.fromarray((np.repeat(ramp[:, None, :], marks.bar, axis=1) * 255).astype(np.uint8)), (bar_x, header)
    )
    for value, y, what in ticks:
        draw.line(
            (bar_x + marks.bar, header + y, bar_x + marks.bar + pad, header + y),
            fill=(0, 0, 0),
            width=max(1, marks.ring // 2),
        )
        anchor = "la" if y == 0 else "ld" if y == bh - 1 else "lm"
        label = f"{value:.3g}{what}"
        draw.text((bar_x + marks.bar + pad + 2, header + y), label, fill=(0, 0, 0), font=small, anchor=anchor)
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
    lo: float  # the colour scale: calibration.colour_scale of the threshold, else the pass's pixel range
    hi: float


def write_overlays(directory: Path, cases: Cases, threshold: float | None, category: str | None = None) -> list[Path]:
    """A decision picture with the ground truth for each of the hardest cases, named by
    rank, outcome and file, its header naming ``category``'s ``threshold``. Maps share
    one colour scale (cases.lo..hi)."""
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
            threshold=threshold,
            category=category,
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
    from rdjax.runtime.workdir import CALIBRATION, write_json, write_text

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
    from rdjax.runtime.workdir import read_json, write_json

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

# 'category' and 'threshold': whose image threshold decided the row, and its value.
PREDICTION_FIELDS = ["file", "status", "score", "normalized_score", "decision", "category", "threshold", "reason"]


def write_prediction(
    out: Path,
    name: str,
    source: str,
    image: np.ndarray,
    pred: Any,
    i: int,
    lo_hi: tuple[float, float],
    recipe: Recipe | None = None,
) -> dict:
    """Image ``i`` of a Prediction: OUT/overlays/<name>.png, OUT/masks/<name>_mask.png
    when calibrated; returns its scores.csv row. The picture's colour scale is that of
    the threshold that decided the image (calibration.colour_scale), else ``lo_hi`` (the
    run's); what the ``recipe``'s centre crop kept from the model is shaded."""
    from PIL import Image

    calibrated = pred.decisions is not None
    threshold = float(pred.thresholds[i]) if calibrated else None
    picture = decision_picture(
        image, pred.maps[i], *(lo_hi if threshold is None else colour_scale(threshold)), score=float(pred.scores[i]),
        anomalous=bool(pred.decisions[i]) if calibrated else None,
        normalized=float(pred.normalized_scores[i]) if calibrated else None,
        mask=pred.masks[i] if calibrated else None, caption=name, threshold=threshold,
        category=pred.categories[i] if calibrated else None,
        inspected=None if recipe is None else inspected_region(pred.maps[i].shape, recipe),
    )  # fmt: skip
    overlay, mask_file = inside(out, f"overlays/{name}.png"), inside(out, f"masks/{name}_mask.png")
    overlay.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(overlay) as tmp:
        Image.fromarray(picture).save(tmp)
    row = {"file": source, "status": "scored", "score": f"{pred.scores[i]:.6f}", "normalized_score": "",
           "decision": "", "category": "", "threshold": "", "reason": ""}  # fmt: skip
    if calibrated:
        mask_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(mask_file) as tmp:
            Image.fromarray((pred.masks[i] * 255).astype(np.uint8)).save(tmp)
        row["normalized_score"] = f"{pred.normalized_scores[i]:.6f}"
        row["decision"] = "anomalous" if pred.decisions[i] else "normal"
        row["category"], row["threshold"] = pred.categories[i], f"{pred.thresholds[i]:.6f}"
    return row


def inside(out: Path, relative: str) -> Path:
    """``out / relative``, refused unless it resolves (links and '..' followed) to a path
    within ``out``: predict never writes beside or above its --output."""
    path = out / relative
    if not path.resolve().is_relative_to(out.resolve()):
        raise WorkdirError(
            f"{printable(str(path))}: lies outside --output={printable(str(out))}; nothing written there"
        )
    return path


def skipped_row(source: str, reason: str) -> dict:
    """scores.csv's row for an input that could not be scored."""
    return {**dict.fromkeys(PREDICTION_FIELDS, ""), "file": source, "status": "skipped", "reason": reason}
