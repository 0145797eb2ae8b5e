"""What rdjax reads from workdirs written by earlier versions: every migration of an old
config.json lives here, so that the rest of the code reads today's layout only.

Each rule turns a saved key set into today's, with the behaviour the workdir was trained
with (never today's default where that would change a result)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from rdjax import modes

EVALUATORS = "evaluators"  # 0.2.0's tuple of evaluator names, before config.evals
# Before 0.6.0 every model read its inputs so: PIL's bilinear resize to image_size; and
# every epoch ran full batches only.
INPUT = {"filter": modes.ResizeFilter.PIL_BILINEAR.value, "resize": 0}
DROP_LAST = True
# Before 0.8.0 the map keys defaulted to RD4AD's recipe, not to the model's.
MAPS = {"map_mode": "add", "blur_sigma": 4.0, "blur_kernel": 0, "map_size": 0, "max_ratio": 0.0}


def evals_from_names(names: Any, shipped_evals: dict) -> dict:
    """0.2.0's config.evaluators (a tuple of names, run in order) as config.evals, with
    today's default settings (``shipped_evals``), which are 0.2.0's behaviour."""
    evals = {name: dict(shipped_evals.get(name, {"type": name})) for name in names}
    if "report" in evals and "calibration" not in evals:
        evals["report"].pop("threshold_from", None)
    return evals


def model_options(saved: dict, sections: Collection[str]) -> dict:
    """0.7.0 kept each model's options in a top-level section of the model's name
    (config.rdpp, config.dinomaly), every section in every config.json: the workdir's
    model's section becomes its options in config.model, the others go. A model section
    is a dict under a key today's config (``sections``: its top-level keys) lacks."""
    saved = dict(saved)
    model = dict(saved.get("model", {}))
    for key in [k for k, v in saved.items() if isinstance(v, dict) and k not in sections]:
        section = saved.pop(key)
        if key == model.get("name"):
            model.update(section)
    saved["model"] = model
    return saved


def migrate_config(saved: dict, shipped_evals: dict, sections: Collection[str]) -> dict:
    """A saved config.json's keys in today's layout: 0.2.0's config.evaluators becomes
    config.evals; 0.7.0's model sections become config.model's options (`model_options`);
    and a workdir written before config.input, config.drop_last or a map key reads as the
    recipe, the epochs and the maps it was trained with (INPUT, DROP_LAST, MAPS)."""
    saved = model_options(saved, sections)
    if EVALUATORS in saved:
        saved["evals"] = evals_from_names(saved.pop(EVALUATORS), shipped_evals)
    saved.setdefault("input", INPUT)
    saved.setdefault("drop_last", DROP_LAST)
    for key, value in MAPS.items():
        saved.setdefault(key, value)
    return saved
