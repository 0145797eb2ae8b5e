"""Images in, answers out: a batch's Prediction split per image, a request's category and
query switches checked, and the JSON answer of a scored image (its map as a PNG of 8-bit
levels)."""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from rdjax.errors import ConfigError, one_line
from rdjax.serve.limits import RequestError

if TYPE_CHECKING:
    from rdjax.deploy.predictor import Prediction, Predictor


@dataclasses.dataclass(frozen=True)
class Scored:
    """One image's share of a batch's Prediction."""

    score: float
    map: np.ndarray  # float32 (H, W) at the image's resolution
    routed: str | None = None  # its category by the router, where the batch was routed


def split(prediction: Prediction, routed: bool) -> list[Scored]:
    names = prediction.categories if routed else None
    return [
        Scored(score=float(prediction.scores[i]), map=m, routed=None if names is None else names[i])
        for i, m in enumerate(prediction.maps)
    ]


def choose(model: Predictor, category: str | None) -> str | None:
    """A request's category (None: the server's default), checked: a RequestError 400 for
    one the model cannot decide with."""
    if category is None:
        return model.category
    try:
        model.check_category(category)
    except ConfigError as e:
        raise RequestError(400, f"?category={category}: {one_line(e)}") from None
    return category


# The map becomes levels a band of rows at a time: the float64 temporaries of the scaling
# (several per pixel) then cost a band's pixels, not the image's.
BAND_PIXELS = 2**20


def map_levels(model: Predictor, amap: np.ndarray, category: str | None) -> tuple[np.ndarray, dict]:
    """The map as 8-bit levels and how to read them: calibrated, the normalized pixel scale
    of the deciding category (level / 255, the pixel threshold at 0.5); uncalibrated, the
    image's own min..max."""
    scale: Callable[[np.ndarray], np.ndarray]
    if model.calibration is not None:
        scale, info = lambda band: model.normalized_map(band, category), {"scale": "normalized", "min": 0.0, "max": 1.0}
    else:
        lo, hi = float(amap.min()), float(amap.max())
        scale, info = lambda band: (band - lo) / max(hi - lo, 1e-12), {"scale": "raw", "min": lo, "max": hi}
    levels = np.empty(amap.shape, np.uint8)
    rows = max(1, BAND_PIXELS // amap.shape[1])
    for top in range(0, amap.shape[0], rows):  # elementwise, so the bands' levels are the whole map's
        levels[top : top + rows] = np.round(np.clip(scale(amap[top : top + rows]), 0.0, 1.0) * 255.0)
    return levels, info


def answer(model: Predictor, scored: Scored, with_map: bool, category: str | None = None) -> dict:
    """The JSON body of a scored image, decided by ``category``'s thresholds (`choose`;
    AUTO: the category the router gave it)."""
    from PIL import Image

    from rdjax.deploy.predictor import AUTO, normalized_score

    if not np.isfinite(scored.score):  # NaN >= threshold is False: never call such an image normal
        raise RequestError(500, f"the model gave a non-finite score ({scored.score}) for this image")
    name, cal = model.thresholds(scored.routed if category == AUTO else category)
    height, width = scored.map.shape
    body: dict[str, Any] = {
        "score": scored.score,
        "normalized_score": None,
        "decision": None,
        "category": name,
        "threshold": None,
        "width": width,
        "height": height,
        "step": model.step,
    }
    if cal is not None:
        t = float(cal.image_threshold)
        body.update(
            normalized_score=float(normalized_score(scored.score, cal)),
            decision="anomalous" if scored.score >= t else "normal",
            threshold=t,
        )
    if with_map:
        levels, info = map_levels(model, scored.map, name)
        buf = io.BytesIO()
        Image.fromarray(levels, mode="L").save(buf, format="PNG")
        body["map"] = {"png": base64.b64encode(buf.getvalue()).decode("ascii"), **info}
    return body


def query_switch(value: str | None, name: str) -> bool:
    """A query switch: absent, 0, false or no is off; present alone, 1, true or yes is on."""
    if value is None or value.lower() in ("0", "false", "no"):
        return False
    if value.lower() in ("", "1", "true", "yes"):
        return True
    raise RequestError(400, f"?{name}={value}: use {name}=1 or {name}=0")
