"""Evaluator 'report': report.png, the hardest cases' decision pictures, report.html
(every image with its heat map, a threshold slider; rdjax.outputs.webpage) and scores.csv (every
image's score).

Settings: ``hardest`` (cases of each kind pictured), ``metrics_from`` (the evaluator
whose metrics head the page) and ``threshold_from`` (the evaluator whose 'calibration'
draws the decisions; '' for none)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import sklearn.metrics as skm

from rdjax.data.preprocess import Recipe, to_display
from rdjax.evaluators import EvalContext, EvaluatorType
from rdjax.outputs import pictures, sheet, webpage
from rdjax.runtime.disk import write_csv
from rdjax.scoring.maps import map_masks
from rdjax.scoring.thresholds import colour_scale


class Report:
    def __init__(self, hardest: int = 4, metrics_from: str = "anomaly", threshold_from: str = "") -> None:
        self.hardest = hardest
        self.metrics_from = metrics_from
        self.threshold_from = threshold_from
        self.needs = tuple(n for n in (metrics_from, threshold_from) if n)

    def __call__(self, context: EvalContext, needed: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """The hardest cases' maps are computed again (a few images), and every image's map
        where the pass did not keep them (binned pixel statistics), for the page's
        thumbnails. Every process takes part in those computations."""
        test, passed = context.test, context.test_pass
        rows = np.concatenate(pictures.hardest_cases(test.labels, passed.scores, self.hardest))
        maps = context.predict(test, rows)
        thumbnail_maps = _thumbnail_maps(context)
        if context.out_dir is None:
            for group in webpage.chunks(len(test)):  # process 0's page computes them: take part
                thumbnail_maps(group)
            return {}
        config = context.config
        cal = needed[self.threshold_from].get("calibration") if self.threshold_from else None
        threshold = None if cal is None else cal["image_threshold"]
        masks = map_masks(test.masks(rows), config.map_size)
        lo, hi = (passed.pixels.lo, passed.pixels.hi) if threshold is None else colour_scale(threshold)
        cases = pictures.Cases(
            rows, to_display(test.images(rows)), masks, maps, passed.scores[rows],
            [test.filenames[i] for i in rows], test.labels[rows], lo, hi,
        )  # fmt: skip
        curves = _curves(test.labels, passed)
        out = context.out_dir
        title = f"{config.dataset.category}: {config.model.name} {config.model.arch}, epoch {context.epoch}"
        seen = pictures.seen_fraction(Recipe.from_config(config))
        if 1 - seen > pictures.CROP_NOTE_AREA:  # the pictures show the crop alone: say what it leaves out
            title += f" (the model sees the central {100 * seen:.3g}% of each image's area)"
        metrics = needed[self.metrics_from] if self.metrics_from else None
        scored = sheet.ScoredSet(test.labels, passed.scores, passed.pixels)
        sheet.write_report(out / "report.png", scored, cases, cal, curves, title=title, metrics=metrics)
        written = pictures.write_overlays(out / "images", cases, threshold, str(config.dataset.category))
        _write_scores(out / "scores.csv", test, passed.scores, threshold)
        page = webpage.Page(
            title=title, scores=passed.scores, filenames=test.filenames, labels=test.labels,
            images=lambda rows: to_display(test.images(rows)),
            metrics=metrics, threshold=threshold, roc=curves.roc, pro=curves.pro,
            pictures={int(r): f"images/{p.name}" for r, p in zip(rows, written)},
            maps=thumbnail_maps, colour_range=(lo, hi), calibration=cal,
        )  # fmt: skip
        webpage.write_page(out / "report.html", page)
        return {}


def _curves(labels: np.ndarray, passed: Any) -> sheet.Curves:
    """The image ROC curve (None with one class only) and the PRO curve up to FPR 0.3 (None
    without regions), computed once for report.png and report.html."""
    roc = None
    if labels.min() != labels.max():
        roc = tuple(skm.roc_curve(labels, passed.scores)[:2])
    pro = None
    if passed.pixels.has_regions:
        fpr, overlap = passed.pixels.pro_curve
        pro = (fpr[fpr <= 0.3], overlap[fpr <= 0.3])
    return sheet.Curves(roc, pro)


def _thumbnail_maps(context: EvalContext) -> Callable[[np.ndarray], np.ndarray]:
    """rows -> their maps for the page's thumbnails: the pass's own where it kept them
    (exact pixel statistics), else computed again for those rows only when the page asks
    (at thumbnail size, webpage.shrink_map), so host memory does not grow with the test
    set. Computing them is collective: every process calls it for webpage.chunks."""
    kept = context.test_pass.pixels.maps
    if kept is not None:
        return lambda rows: kept[rows]
    test = context.test
    return lambda rows: np.stack([webpage.shrink_map(m) for m in context.predict(test, rows)])


def _write_scores(path: Path, test: Any, scores: np.ndarray, threshold: float | None) -> None:
    def decision(s: float) -> str:
        return "" if threshold is None else ("anomalous" if s >= threshold else "normal")

    rows = [
        {"file": f, "defect_type": d, "label": int(y), "score": f"{s:.6f}", "decision": decision(s)}
        for f, d, y, s in zip(test.filenames, test.defect_types, test.labels, scores)
    ]
    write_csv(path, ["file", "defect_type", "label", "score", "decision"], rows)


EVALUATOR: EvaluatorType = Report
