"""What rdjax reads from workdirs written by earlier versions: every migration of an old
config.json lives here, so that the rest of the code reads today's layout only.

Each rule turns a saved key set into today's, with the behaviour the workdir was trained
with (never today's default where that would change a result)."""

from __future__ import annotations

from typing import Any

from rdjax import modes

EVALUATORS = "evaluators"  # 0.2.0's tuple of evaluator names, before config.evals
# Before 0.6.0 every model read its inputs so: PIL's bilinear resize to image_size; and
# every epoch ran full batches only.
INPUT = {"filter": modes.ResizeFilter.PIL_BILINEAR.value, "resize": 0}
DROP_LAST = True


def evals_from_names(names: Any, shipped_evals: dict) -> dict:
    """0.2.0's config.evaluators (a tuple of names, run in order) as config.evals, with
    today's default settings (``shipped_evals``), which are 0.2.0's behaviour."""
    evals = {name: dict(shipped_evals.get(name, {"type": name})) for name in names}
    if "report" in evals and "calibration" not in evals:
        evals["report"].pop("threshold_from", None)
    return evals


def migrate_config(saved: dict, shipped_evals: dict) -> dict:
    """A saved config.json's keys in today's layout: 0.2.0's config.evaluators becomes
    config.evals, and a workdir written before config.input and config.drop_last reads as
    the recipe and the epochs it was trained with (INPUT, DROP_LAST)."""
    saved = dict(saved)
    if EVALUATORS in saved:
        saved["evals"] = evals_from_names(saved.pop(EVALUATORS), shipped_evals)
    saved.setdefault("input", INPUT)
    saved.setdefault("drop_last", DROP_LAST)
    return saved
