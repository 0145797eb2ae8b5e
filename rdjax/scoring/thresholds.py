"""Decision thresholds and normalized scores, fitted after training (calibration.json).

Normalized scores map a raw score s to [0, 1] with the threshold t at exactly 0.5,
piecewise linearly between the calibration set's lowest score lo and highest score hi:
    s <= t:  0.5 * (s - lo) / (t - lo)
    s >  t:  0.5 + 0.5 * (s - t) / (hi - t)
clipped to [0, 1]. Scores of different categories become comparable: 0.5 is the
decision boundary everywhere, 0 the most normal calibration image, 1 the most anomalous.

The image threshold lies midway between two adjacent calibration scores (`midway`), never
on one: a threshold equal to a calibration image's score lets float32 rounding (another
runtime, another CPU, an exported artifact) flip that image's decision. An image called
anomalous always shows why (`explanation_masks`).

A threshold fitted on few images is warned about (`few_images`), and every report of
the decisions gives their counts on the test set (`confusion`). Pictures of maps put the
image threshold in the middle of their colour scale (`colour_scale`).

calibration.json has one schema (`problem`), checked where it is written (rdjax.train.hooks)
and where it is read (`read`): a NaN threshold decides every image normal, so no
calibration that is not the schema's is ever used.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rdjax import modes
from rdjax.errors import WorkdirError
from rdjax.runtime import disk
from rdjax.scoring.metrics import PixelStats, best_f1

MIN_CALIBRATION_IMAGES = 20
"""The fewest images a threshold may rest on without a warning. A threshold near the
highest of n good images' scores (the 0.99 quantile of fewer than 100 images is) lets a
new good image above it with probability about 1 / (n + 1): 20% with 4 images, below 5%
from 20 on. And that rate is itself uncertain: it is Beta(1, n)-distributed, whose spread
(about 1 / n) stays larger than the rate itself until n is in the tens. Below 20 a
threshold says little about where good parts end (a user trial: 4 held-out images, 37 of
39 good test images called anomalous)."""


def normalize_scores(scores: np.ndarray, threshold: float, lo: float, hi: float) -> np.ndarray:
    """See the module docstring for the formula."""
    s = np.asarray(scores, np.float64)
    below = 0.5 * (s - lo) / max(threshold - lo, 1e-12)
    above = 0.5 + 0.5 * (s - threshold) / max(hi - threshold, 1e-12)
    return np.clip(np.where(s <= threshold, below, above), 0.0, 1.0)


def midway(scores: np.ndarray, threshold: float) -> float:
    """The threshold moved to the middle of the gap that contains it, between the highest
    score below it and the lowest score at or above it: the same decisions on these
    scores, and as far from each of them as the gap allows. With no score below, it moves
    below the lowest score by half the smallest gap between distinct scores (or keeps its
    value if it lies below them all already)."""
    s = np.unique(np.asarray(scores, np.float64))
    above, below = s[s >= threshold], s[s < threshold]
    if len(above) == 0:
        return float(threshold)  # above every score: on none of them
    if len(below):
        return float((below[-1] + above[0]) / 2)
    if threshold < above[0]:
        return float(threshold)
    gap = float(np.min(np.diff(s))) if len(s) > 1 else max(abs(float(s[0])), 1e-12)
    return float(above[0] - gap / 2)


def explanation_masks(
    maps: list[np.ndarray], decisions: np.ndarray, pixel_threshold: float, image_threshold: float
) -> list[np.ndarray]:
    """Per image, the pixels to show: map >= pixel threshold; and for an image called
    anomalous, also the pixels at or above the image threshold, and at least the map's
    peak. The pixel threshold is fitted on pixels and often lies above the image
    threshold, so an image can be anomalous (its peak reaches the image threshold) with
    no pixel above the pixel threshold; its mask is then the region around the peak that
    reaches the image threshold (the peak alone where resizing the map to the input's
    resolution smoothed it below). So no anomalous decision comes with an empty mask."""
    out = []
    for amap, anomalous in zip(maps, decisions):
        mask = amap >= pixel_threshold
        if anomalous:
            mask |= amap >= min(image_threshold, float(amap.max()))
        out.append(mask)
    return out


def calibrate(
    method: str, scores: np.ndarray, labels: np.ndarray, pixels: PixelStats, quantile: float, source: str
) -> Calibration:
    """Image and pixel thresholds, and the range used for normalized scores.

    'f1': F1-optimal on a labelled set (image labels; pixel masks).
    'quantile': the given quantile of held-out normal images' scores (and of their pixels).
    Pixel thresholds come from ``pixels``, exact or binned (rdjax.scoring.metrics.PixelStats).
    """
    if modes.parse(modes.ThresholdMethod, method, "threshold method") is modes.ThresholdMethod.F1:
        image_t = midway(scores, best_f1(labels, scores)[1])
        pixel_t = pixels.best_f1()[1] if pixels.has_regions else pixels.quantile(0.99)
        kept_quantile = None
    else:
        image_t = midway(scores, float(np.quantile(scores, quantile)))
        pixel_t = pixels.quantile(quantile)
        kept_quantile = quantile
    return Calibration(
        image_threshold=image_t,
        pixel_threshold=pixel_t,
        score_min=float(np.min(scores)),
        score_max=float(np.max(scores)),
        pixel_min=pixels.lo,
        pixel_max=pixels.hi,
        method=method,
        source=source,
        quantile=kept_quantile,
        num_images=int(len(scores)),
    )


def describe(cal: dict) -> str:
    """Where a calibration's threshold came from, in one phrase for every report of its
    decisions. A threshold fitted on the test set flatters the decisions on that set."""
    if cal.get("fitted_on_test_set", cal["method"] == modes.ThresholdMethod.F1.value):
        return (
            f"threshold fitted on the test set (F1-optimal on {cal['source']}): "
            "decisions on these images are optimistic"
        )
    return f"threshold: quantile {cal.get('quantile', 'q')} of {cal['source']}, no test image used"


def few_images(cal: dict) -> str | None:
    """The warning for a threshold fitted on fewer than MIN_CALIBRATION_IMAGES images
    (calibration.json's 'num_images'; None without it, as in older files), else None."""
    count = cal.get("num_images")
    if count is None or count >= MIN_CALIBRATION_IMAGES:
        return None
    advice = (
        "add labelled test images"
        if cal.get("fitted_on_test_set", cal["method"] == modes.ThresholdMethod.F1.value)
        else "hold out more good images (config.threshold.validation_size, e.g. 20)"
    )
    return (
        f"the image threshold rests on {cal['source']}, fewer than {MIN_CALIBRATION_IMAGES}: "
        f"it says little about where good parts end, so expect false positives; {advice}"
    )


CONFUSION_KEYS = ("true_positives", "false_positives", "true_negatives", "false_negatives")


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    """The decisions at ``threshold`` (score >= threshold: anomalous, the positive class)
    against the labels (non-zero: defective), counted: CONFUSION_KEYS."""
    defective = np.asarray(labels).ravel() != 0
    anomalous = np.asarray(scores).ravel() >= threshold
    counts = (defective & anomalous, ~defective & anomalous, ~defective & ~anomalous, defective & ~anomalous)
    return {key: int(np.sum(c)) for key, c in zip(CONFUSION_KEYS, counts)}


def colour_scale(threshold: float) -> tuple[float, float]:
    """(lo, hi) of a picture of maps decided by ``threshold``: 0 to twice the image
    threshold, so the threshold is the middle of the colour bar. A map's peak is (for
    max_ratio 0) its image score, so an image called anomalous has its peak in the upper
    half, from yellow to red, and one called normal stays in the lower half: the colour
    agrees with the decision whatever the calibration's pixel range (maps, 1 - cosine,
    are >= 0). With max_ratio > 0 (Dinomaly's mean of the top 1%) the score lies at or
    below the peak, so an NG image still reaches the upper half, while an OK one may show
    a few hot pixels above the middle that the mean kept below the threshold. Scores of
    twice the threshold and more are all the top colour."""
    t = float(threshold)
    return (0.0, 2 * t) if t > 0 else (t - 1.0, t + 1.0)


# ----------------------------------------------------------------------------- the schema

NUMBERS = ("image_threshold", "pixel_threshold", "score_min", "score_max", "pixel_min", "pixel_max")
REQUIRED = (*NUMBERS, "method", "source", "step")  # every calibration.json since the first has them
OPTIONAL = ("epoch", "quantile", "num_images", "fitted_on_test_set", "resize", "max_ratio", "categories")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """calibration.json, one dataclass: written by `to_json` (the evaluator 'calibration'
    fits it, training adds the step it was fitted on, `fitted`) and read by `read`.

    An optional field left None is a key the file does not hold: ``quantile`` (the
    'quantile' method's only), and the keys newer than the first calibration.json, which
    older files lack and their readers default as they always did: ``num_images`` (no
    warning of few images), ``fitted_on_test_set`` (the 'f1' method's), ``resize`` and
    ``max_ratio`` (the workdir config's: rdjax.deploy.predictor), ``epoch``. ``step`` is
    None only before training records it; every file holds it (`problem`)."""

    image_threshold: float
    pixel_threshold: float
    score_min: float
    score_max: float
    pixel_min: float
    pixel_max: float
    method: str
    source: str
    step: int | None = None  # the checkpoint the thresholds were fitted on
    epoch: int | None = None
    quantile: float | None = None
    num_images: int | None = None
    fitted_on_test_set: bool | None = None
    resize: dict | None = None  # the config.resize the maps were made with
    max_ratio: float | None = None  # the image score's rule (rdjax.scoring.maps.image_scores)
    categories: dict[str, Calibration] | None = None  # a unified workdir's: each category's own

    @classmethod
    def from_json(cls, data: dict) -> Calibration:
        """The calibration of a dict that `problem` passed (calibration.json, or a result's)."""
        fields = {k: data[k] for k in (*REQUIRED, *OPTIONAL) if k in data}
        if "categories" in fields:
            fields["categories"] = {name: cls.from_json(part) for name, part in fields["categories"].items()}
        return cls(**fields)

    def to_json(self) -> dict:
        """The dict calibration.json holds: every field that is set (its keys sorted when
        written, rdjax.runtime.disk.write_json)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        if self.categories is not None:
            data["categories"] = {name: part.to_json() for name, part in self.categories.items()}
        return data

    def fitted(self, step: int, epoch: int, resize: dict, max_ratio: float) -> Calibration:
        """What training records with thresholds (and each category's): the step and epoch
        they were fitted on, the resize setting and the image score's rule of their maps."""
        parts = self.categories
        if parts is not None:
            parts = {name: part.fitted(step, epoch, resize, max_ratio) for name, part in parts.items()}
        return dataclasses.replace(
            self, step=step, epoch=epoch, resize=dict(resize), max_ratio=max_ratio, categories=parts
        )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def problem(cal: Any, top: bool = True) -> str | None:
    """What keeps ``cal`` (calibration.json, or a unified one's category under
    'categories') from deciding, in words, or None: it is an object of the known keys
    (REQUIRED, OPTIONAL; 'categories' at the top only), its thresholds and ranges finite
    numbers, 'step' (the checkpoint it was fitted on) a count, and so on."""
    if not isinstance(cal, dict):
        return f"expected an object of thresholds, found {json.dumps(cal)[:40]}"
    missing = [k for k in REQUIRED if k not in cal]
    if missing:
        return f"no {', '.join(repr(k) for k in missing)}"
    known = REQUIRED + OPTIONAL if top else REQUIRED + OPTIONAL[:-1]
    unknown = sorted(set(cal) - set(known))
    if unknown:
        return f"unknown key {unknown[0]!r}"
    methods = modes.values(modes.ThresholdMethod)
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        **{k: (_finite, "a finite number") for k in (*NUMBERS, "quantile", "max_ratio")},
        **{k: (_count, "a whole number >= 0") for k in ("step", "epoch", "num_images")},
        "method": (lambda v: v in methods, f"one of {', '.join(methods)}"),
        "source": (lambda v: isinstance(v, str), "text"),
        "fitted_on_test_set": (lambda v: isinstance(v, bool), "true or false"),
        "resize": (lambda v: isinstance(v, dict) and v.get("mode") in modes.values(modes.ResizeMode),
                   "an object with a resize mode"),
        "categories": (lambda v: isinstance(v, dict) and bool(v), "an object of categories"),
    }  # fmt: skip
    for key, (valid, wanted) in checks.items():
        if key in cal and not valid(cal[key]):
            return f"{key!r} is {json.dumps(cal[key])[:40]}, not {wanted}"
    for name, part in (cal.get("categories") or {}).items():
        wrong = problem(part, top=False)
        if wrong:
            return f"category {name!r}: {wrong}"
    return None


def read(path: Path, fix: str) -> Calibration:
    """calibration.json at ``path``, checked (`problem`); a WorkdirError naming the file,
    what is wrong and ``fix`` (the command that writes a good one) otherwise."""
    cal = disk.read_json(path)
    wrong = problem(cal)
    if wrong:
        raise WorkdirError(f"{path}: {wrong}: these thresholds cannot decide; {fix}")
    return Calibration.from_json(cal)
