"""The files an evaluation or a predict run writes: metrics.json and results.md per
evaluation, best_on_test.json, and predict's overlays, masks and scores.csv rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rdjax.data.preprocess import Recipe, printable
from rdjax.errors import WorkdirError
from rdjax.outputs.pictures import Regions, Verdict, decision_picture, inspected_region
from rdjax.outputs.tables import results_markdown, unified_markdown
from rdjax.runtime.disk import atomic_path
from rdjax.scoring.metrics import PAPER_KEYS
from rdjax.scoring.thresholds import colour_scale


def write_evaluation(workdir: Path, epoch: int, result: dict) -> Path:
    """An evaluation's result into eval/epoch_NNNN/metrics.json. Where it holds the
    metrics (an evaluation without them, by the evaluators' cadences, has none), also
    results.md there, and both copied to the workdir's top (the latest evaluation with
    metrics). Its calibration, where it has one, becomes calibration.json."""
    from rdjax.runtime.disk import write_json, write_text
    from rdjax.runtime.workdir import CALIBRATION

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
    from rdjax.runtime.disk import read_json, write_json

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
    the threshold that decided the image (thresholds.colour_scale), else ``lo_hi`` (the
    run's); what the ``recipe``'s centre crop kept from the model is shaded."""
    from PIL import Image

    calibrated = pred.decisions is not None
    threshold = float(pred.thresholds[i]) if calibrated else None
    verdict = Verdict(
        float(pred.scores[i]),
        anomalous=bool(pred.decisions[i]) if calibrated else None,
        normalized=float(pred.normalized_scores[i]) if calibrated else None,
        threshold=threshold,
        category=pred.categories[i] if calibrated else None,
    )
    regions = Regions(
        mask=pred.masks[i] if calibrated else None,
        inspected=None if recipe is None else inspected_region(pred.maps[i].shape, recipe),
    )
    lo_hi = lo_hi if threshold is None else colour_scale(threshold)
    picture = decision_picture(image, pred.maps[i], lo_hi, verdict, regions, caption=name)
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
