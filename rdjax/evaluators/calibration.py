"""Evaluator 'calibration': the decision thresholds and normalization range
(calibration.json), by config.threshold's method, a note of where the threshold came
from (metrics.json's threshold_note), which every report of the decisions repeats, and
the test images' decisions at it (metrics.json's confusion: rdjax.scoring.thresholds.confusion)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from rdjax import modes
from rdjax.data.preprocess import Split
from rdjax.evaluators import EvalContext, EvaluatorType
from rdjax.scoring.thresholds import calibrate, confusion, describe


def calibration_split(config: Any, test: Split, validation: Split | None) -> tuple[Split, str]:
    """The images the thresholds are fitted on, and the phrase that names them (the
    calibration's 'source'): the held-out good images ('quantile'), or the labelled test
    images ('f1'). A run states a threshold on too few of them when it starts."""
    if modes.ThresholdMethod(config.threshold.method) is modes.ThresholdMethod.QUANTILE:
        assert validation is not None  # config.check: 'quantile' needs held-out images
        return validation, f"{len(validation)} held-out train/good images"
    return test, f"{len(test)} labelled test images"


class Calibration:
    needs: tuple[str, ...] = ()

    def __call__(self, context: EvalContext, needed: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        threshold = context.config.threshold
        split, source = calibration_split(context.config, context.test, context.validation)
        passed = context.test_pass if split is context.test else context.run_pass(split)
        cal = calibrate(threshold.method, passed.scores, split.labels, passed.pixels, threshold.quantile, source)
        cal = dataclasses.replace(cal, fitted_on_test_set=split is context.test)
        counts = confusion(context.test.labels, context.test_pass.scores, cal.image_threshold)
        # The result holds calibration.json's dict (metrics.json); training adds its step (Calibration.fitted).
        return {"calibration": cal.to_json(), "threshold_note": describe(cal.to_json()), "confusion": counts}


EVALUATOR: EvaluatorType = Calibration
