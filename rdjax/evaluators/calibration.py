"""Evaluator 'calibration': the decision thresholds and normalization range
(calibration.json), by config.threshold's method, and a note of where the threshold came
from (metrics.json's threshold_note), which every report of the decisions repeats."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rdjax import modes
from rdjax.calibration import calibrate, describe
from rdjax.evaluators import EvalContext, EvaluatorType


class Calibration:
    needs: tuple[str, ...] = ()

    def __call__(self, context: EvalContext, needed: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        threshold = context.config.threshold
        if modes.ThresholdMethod(threshold.method) is modes.ThresholdMethod.QUANTILE:
            split = context.validation
            assert split is not None  # config.check: 'quantile' needs held-out images
            passed = context.run_pass(split)
            source = f"{len(split)} held-out train/good images"
        else:
            split, passed = context.test, context.test_pass
            source = f"{len(split)} labelled test images"
        cal = calibrate(threshold.method, passed.scores, split.labels, passed.pixels, threshold.quantile, source)
        cal["fitted_on_test_set"] = split is context.test
        return {"calibration": cal, "threshold_note": describe(cal)}


EVALUATOR: EvaluatorType = Calibration
