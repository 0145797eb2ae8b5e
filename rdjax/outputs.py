"""Outputs a person reads: result tables (markdown) and pictures of the hardest cases."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from rdjax.metrics import METRIC_NAMES, PAPER_KEYS, TABLE_KEYS
from rdjax.workdir import atomic_path


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}"


def results_markdown(result: dict) -> str:
    lines = [
        f"# {result.get('category', '')} (epoch {result.get('epoch')})",
        "",
        "| " + " | ".join(METRIC_NAMES[k] for k in TABLE_KEYS) + " |",
        "|---" * len(TABLE_KEYS) + "|",
        "| " + " | ".join(_fmt(result.get(k)) for k in TABLE_KEYS) + " |",
        "",
        f"| defect type | images | {METRIC_NAMES['image_auroc']} |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {v['count']} | {_fmt(v['image_auroc'])} |" for t, v in result.get("per_type", {}).items()]
    for w in result.get("warnings", []):
        lines.append(f"\n**Warning:** {w}")
    return "\n".join(lines) + "\n"


def summary_markdown(results: dict[str, dict], keys: tuple[str, ...] | None = None) -> str:
    """One table over categories with a mean row, in the paper's layout (percent)."""
    keys = keys or PAPER_KEYS
    lines = ["| category | " + " | ".join(METRIC_NAMES[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    means = [float(np.nanmean([r[k] for r in results.values()])) for k in keys]
    lines.append("| **mean** | " + " | ".join(f"**{_fmt(m)}**" for m in means) + " |")
    return "\n".join(lines) + "\n"


def overlay(image: np.ndarray, amap: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8 image blended half and half with the map in the 'jet' colour map (fixed lo..hi)."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip((amap - lo) / max(hi - lo, 1e-12), 0, 1))[..., :3]
    return (np.clip(0.5 * image.astype(np.float32) / 255.0 + 0.5 * heat, 0, 1) * 255).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels that touch a pixel outside it (4-neighbourhood; the image border
    counts as inside, so a mask reaching the border is not outlined along it)."""
    m = np.pad(mask, 1, mode="edge")
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def outcome(label: int, anomalous: bool | None) -> str:
    """What happened to a labelled image: true/false positive/negative ('anomalous' is
    the positive class), or its label alone where there is no threshold."""
    if anomalous is None:
        return "defective" if label else "good"
    return f"{'true' if bool(label) == bool(anomalous) else 'false'} {'positive' if anomalous else 'negative'}"


DECISION_COLOURS = {True: (190, 30, 30), False: (30, 130, 60), None: (90, 90, 90)}


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
    without a threshold), the score and the normalized score; the image blended with its
    map on the run's one colour scale (lo..hi), the mask's outline in white and the map's
    peak marked; and a colour bar with its range. With a ground truth ``truth``, the
    image itself with the truth outlined in red comes first. Small images are enlarged
    (nearest neighbour) to at least 256 px so that the text fits."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    body = overlay(image, amap, lo, hi)
    if mask is not None:
        body[outline(mask)] = 255
    if truth is not None:
        plain = image.copy()
        plain[outline(truth)] = (255, 0, 0)
        body = np.concatenate([plain, np.full((amap.shape[0], 2, 3), 255, np.uint8), body], axis=1)
    h, w = body.shape[:2]
    scale = max(1, -(-256 // max(amap.shape)))
    body_img = Image.fromarray(body).resize((w * scale, h * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(body_img)
    py, px = np.unravel_index(int(np.argmax(amap)), amap.shape)
    px += w - amap.shape[1]  # the overlay is the rightmost panel
    cy, cx, r = (py + 0.5) * scale, (px + 0.5) * scale, max(4, scale * 3)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(255, 255, 255), width=2)
    draw.ellipse((cx - r - 2, cy - r - 2, cx + r + 2, cy + r + 2), outline=(0, 0, 0), width=1)

    font = ImageFont.load_default(size=13)
    line = 16
    header, bar_w, label_w = 2 * line + 6, 14, 58
    bh, bw = h * scale, w * scale
    canvas = Image.new("RGB", (bw + bar_w + label_w + 8, header + bh), (255, 255, 255))
    canvas.paste(body_img, (0, header))
    top = ImageDraw.Draw(canvas)
    state = None if anomalous is None else bool(anomalous)
    top.rectangle((0, 0, canvas.width, header - 1), fill=DECISION_COLOURS[state])
    verdict = {None: "", True: "NG  ", False: "OK  "}[state]
    first = f"{verdict}score {score:.4f}" + ("" if normalized is None else f"  normalized {normalized:.2f}")
    top.text((4, 3), first, fill=(255, 255, 255), font=font)
    top.text((4, 3 + line), caption[-(canvas.width // 7) :], fill=(255, 255, 255), font=font)
    ramp = colormaps["jet"](np.linspace(1, 0, bh))[:, :3]
    bar = (np.repeat(ramp[:, None, :], bar_w, axis=1) * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(bar), (bw + 4, header))
    top.text((bw + bar_w + 7, header), f"{hi:.3g}", fill=(0, 0, 0), font=font)
    top.text((bw + bar_w + 7, header + bh - line), f"{lo:.3g}", fill=(0, 0, 0), font=font)
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
    if "image_auroc" in result:
        table = results_markdown(result)
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


def write_prediction_summary(
    out: Path, title: str, rows: list[dict], scores: list[float], names: list[str], images: Any,
    threshold: float | None, skipped: list[tuple[str, str]],
) -> None:  # fmt: skip
    """OUT/scores.csv (a row per input file) and OUT/report.html (a card per input file;
    the scored ones' slider from the unrounded ``scores``)."""
    from rdjax import webpage
    from rdjax.workdir import write_csv

    write_csv(out / "scores.csv", PREDICTION_FIELDS, rows)
    pictures = {i: f"overlays/{n}.png" for i, n in enumerate(names)}
    page = webpage.Page(title, np.array(scores), names, images, threshold=threshold, pictures=pictures,
                        skipped=skipped)  # fmt: skip
    webpage.write_page(out / "report.html", page)
