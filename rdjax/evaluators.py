"""Evaluators: what runs on an evaluation pass's maps and scores (config.evaluators).

Each is registered by name in `rdjax.registry.EVALUATORS` and takes an `EvalData`; it
returns entries for the result (metrics.json) and may write its own files into
``data.out_dir`` (set on process 0 only). The training loop does not know which exist.
  anomaly      image/pixel AUROC, AUPRO, the paper's PRO, F1-max, per-type AUROC, and the
               sum-of-map image AUROC of the novelty benchmarks
  calibration  the decision thresholds and normalization range (calibration.json)
  report       report.png, the hardest cases' pictures, report.html (every image, a
               threshold slider; rdjax.webpage) and scores.csv (every image's score)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import sklearn.metrics as skm

from rdjax import metrics, outputs, report, webpage
from rdjax.calibration import calibrate
from rdjax.data.preprocess import Split
from rdjax.evaluation import PassResult
from rdjax.registry import EVALUATORS
from rdjax.workdir import write_csv

NO_MASKS = "the anomalous test images have no masks: image-level metrics only"


@dataclasses.dataclass
class EvalData:
    config: Any
    test: Split
    result_pass: PassResult  # the test split's scores and pixel statistics
    run_pass: Callable[[Split], PassResult]  # an evaluation pass over another split (all processes call it)
    predict: Callable[[Split, np.ndarray], np.ndarray]  # (split, a few rows) -> their maps, as the pass made them
    validation: Split | None  # held-out normal training images, if any
    out_dir: Path | None  # this evaluation's folder (eval/epoch_NNNN) on process 0, else None
    result: dict  # what the evaluators before this one returned


@EVALUATORS.register("anomaly")
def anomaly(data: EvalData) -> dict:
    test, passed = data.test, data.result_pass
    result = metrics.compute_all(
        passed.scores, test.labels, test.defect_types, passed.pixels if test.has_masks else None, passed.pro_images
    )
    result["image_auroc_sum"] = metrics.auroc(test.labels, passed.sums)
    if not test.has_masks:
        result["warnings"] = [NO_MASKS]
    return result


@EVALUATORS.register("calibration")
def calibration(data: EvalData) -> dict:
    threshold = data.config.threshold
    if threshold.method == "quantile":
        held = data.validation
        passed = data.run_pass(held)
        cal = calibrate(
            "quantile",
            passed.scores,
            held.labels,
            passed.pixels,
            threshold.quantile,
            f"{len(held)} held-out train/good images",
        )
    else:
        test, passed = data.test, data.result_pass
        cal = calibrate(
            "f1", passed.scores, test.labels, passed.pixels, threshold.quantile, f"{len(test)} labelled test images"
        )
    return {"calibration": cal}


@EVALUATORS.register("report")
def report_pictures(data: EvalData) -> dict:
    """The hardest cases' maps are computed again (a few images): nothing else of the
    pass's maps is kept. Every process takes part in that computation."""
    test, passed = data.test, data.result_pass
    rows = np.concatenate(outputs.hardest_cases(test.labels, passed.scores, 4))
    images = test.images(rows)
    masks = test.masks(rows)
    maps = data.predict(test, rows)
    if data.out_dir is not None:
        cases = outputs.Cases(
            rows,
            images,
            masks,
            maps,
            passed.scores[rows],
            [test.filenames[i] for i in rows],
            test.labels[rows],
            passed.pixels.lo,
            passed.pixels.hi,
        )
        cal = data.result.get("calibration")
        threshold = None if cal is None else cal["image_threshold"]
        roc = None
        if test.labels.min() != test.labels.max():
            roc = tuple(skm.roc_curve(test.labels, passed.scores)[:2])
        pro = None
        if passed.pixels is not None and passed.pixels.has_regions:
            fpr, overlap = passed.pixels.pro_curve
            pro = (fpr[fpr <= 0.3], overlap[fpr <= 0.3])
        report.write_report(
            data.out_dir / "report.png", test.labels, passed.scores, passed.pixels, cases, cal, roc, pro
        )
        written = outputs.write_overlays(data.out_dir / "images", cases, threshold)
        title = f"{data.config.dataset.category}: evaluation {data.out_dir.name.replace('_', ' ')}"
        write_csv(
            data.out_dir / "scores.csv",
            ["file", "defect_type", "label", "score", "decision"],
            [
                {
                    "file": f,
                    "defect_type": d,
                    "label": int(y),
                    "score": f"{s:.6f}",
                    "decision": "" if threshold is None else ("anomalous" if s >= threshold else "normal"),
                }
                for f, d, y, s in zip(test.filenames, test.defect_types, test.labels, passed.scores)
            ],
        )
        webpage.write_page(
            data.out_dir / "report.html",
            title,
            data.result,
            test.labels,
            passed.scores,
            test.filenames,
            test.images,
            threshold,
            roc,
            pro,
            {int(r): f"images/{p.name}" for r, p in zip(rows, written)},
        )
    return {}


def run_all(names: Any, data: EvalData) -> dict:
    """The configured evaluators in order, each seeing the results of those before it.
    'warnings' lists are joined, every other key is set once."""
    for name in names:
        entries = EVALUATORS.get(name)(data)
        warnings = data.result.get("warnings", []) + entries.pop("warnings", [])
        data.result.update(entries, warnings=warnings)
    return data.result
