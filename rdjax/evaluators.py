"""Evaluators: what runs on an evaluation pass's maps and scores (config.evaluators).

Each is registered by name in `rdjax.registry.EVALUATORS` and takes an `EvalData`; it
returns entries for the result (metrics.json) and may write its own files into
``data.out_dir`` (set on process 0 only). The training loop does not know which exist.
  anomaly      image/pixel AUROC, AUPRO, the paper's PRO, F1-max, per-type AUROC, and the
               sum-of-map image AUROC of the novelty benchmarks
  calibration  the decision thresholds and normalization range (calibration.json)
  report       report.png and the hardest cases' pictures
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rdjax import metrics, outputs, report
from rdjax.calibration import calibrate
from rdjax.data.preprocess import Split
from rdjax.registry import EVALUATORS

NO_MASKS = "the anomalous test images have no masks: image-level metrics only"


@dataclasses.dataclass
class EvalData:
    config: Any
    test: Split
    maps: np.ndarray  # (N, S, S) float32
    scores: np.ndarray  # (N,)
    predict: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # uint8 images -> (maps, scores)
    validation: Split | None  # held-out normal training images, if any
    out_dir: Path | None  # this evaluation's folder (eval/epoch_NNNN) on process 0, else None
    result: dict  # what the evaluators before this one returned


@EVALUATORS.register("anomaly")
def anomaly(data: EvalData) -> dict:
    test = data.test
    result = metrics.compute_all(data.maps, data.scores, test.masks, test.labels, test.defect_types,
                                 pixel=test.has_masks)
    result["image_auroc_sum"] = metrics.auroc(test.labels, data.maps.sum(axis=(1, 2)))
    if not test.has_masks:
        result["warnings"] = [NO_MASKS]
    return result


@EVALUATORS.register("calibration")
def calibration(data: EvalData) -> dict:
    threshold = data.config.threshold
    if threshold.method == "quantile":
        held = data.validation
        maps, scores = data.predict(held.images)
        cal = calibrate("quantile", scores, held.labels, maps, held.masks, threshold.quantile,
                        f"{len(held)} held-out train/good images")
    else:
        test = data.test
        cal = calibrate("f1", data.scores, test.labels, data.maps, test.masks, threshold.quantile,
                        f"{len(test)} labelled test images")
    return {"calibration": cal}


@EVALUATORS.register("report")
def report_pictures(data: EvalData) -> dict:
    if data.out_dir is not None:
        report.write_report(data.out_dir / "report.png", data.test, data.maps, data.scores, data.result.get("calibration"))
        outputs.write_overlays(data.out_dir / "images", data.test, data.maps, data.scores)
    return {}


def run_all(names: Any, data: EvalData) -> dict:
    """The configured evaluators in order, each seeing the results of those before it.
    'warnings' lists are joined, every other key is set once."""
    for name in names:
        entries = EVALUATORS.get(name)(data)
        warnings = data.result.get("warnings", []) + entries.pop("warnings", [])
        data.result.update(entries, warnings=warnings)
    return data.result
