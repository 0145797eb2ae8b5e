"""Evaluator 'anomaly': the seven metrics of the ADer / Dinomaly protocol (image and pixel
AUROC, AP, F1-max; AUPRO), the paper's PRO, AUPIMO, per-type AUROC, and the sum-of-map
image AUROC of the novelty benchmarks (keys: metrics.METRIC_NAMES)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rdjax.evaluators import EvalContext, EvaluatorType
from rdjax.scoring import metrics

NO_MASKS = "the anomalous test images have no masks: image-level metrics only"


class Anomaly:
    needs: tuple[str, ...] = ()

    def __call__(self, context: EvalContext, needed: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        test, passed = context.test, context.test_pass
        result = metrics.compute_all(
            passed.scores, test.labels, test.defect_types, passed.pixels if test.has_masks else None, passed.pro_images
        )
        result["image_auroc_sum"] = metrics.auroc(test.labels, passed.sums)
        if not test.has_masks:
            result["warnings"] = [NO_MASKS]
        return result


EVALUATOR: EvaluatorType = Anomaly
