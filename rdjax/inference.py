"""Using a trained model: rdjax.load(workdir).predict(images), thresholds, normalized scores.

A workdir holds everything: config.json, the teacher, checkpoints and calibration.json
(thresholds written after training). Nothing else is needed, on any device.

Normalized scores map a raw score s to [0, 1] with the threshold t at exactly 0.5,
piecewise linearly between the calibration set's lowest score lo and highest score hi:
    s <= t:  0.5 * (s - lo) / (t - lo)
    s >  t:  0.5 + 0.5 * (s - t) / (hi - t)
clipped to [0, 1]. Scores of different categories become comparable: 0.5 is the
decision boundary everywhere, 0 the most normal calibration image, 1 the most anomalous.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from PIL import Image

from rdjax.data.preprocess import DataError, to_rgb

ImageLike = Any  # uint8 HxWx3 array, a batch of them, a PIL image, or a path


# ----------------------------------------------------------------------------- thresholds


def f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold of best F1 (scores >= threshold are anomalous)."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(np.asarray(labels).ravel(), np.asarray(scores).ravel())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def normalize_scores(scores: np.ndarray, threshold: float, lo: float, hi: float) -> np.ndarray:
    """See the module docstring for the formula."""
    s = np.asarray(scores, np.float64)
    below = 0.5 * (s - lo) / max(threshold - lo, 1e-12)
    above = 0.5 + 0.5 * (s - threshold) / max(hi - threshold, 1e-12)
    return np.clip(np.where(s <= threshold, below, above), 0.0, 1.0)


def calibrate(method: str, scores: np.ndarray, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray,
              quantile: float, source: str) -> dict:
    """Image and pixel thresholds, and the range used for normalized scores.

    'f1': F1-optimal on a labelled set (image labels; pixel masks).
    'quantile': the given quantile of held-out normal images' scores (and of their pixels).
    """
    if method == "f1":
        image_t = f1_threshold(labels, scores)
        pixel_t = f1_threshold(masks, maps) if np.asarray(masks).any() else float(np.quantile(maps, 0.99))
    elif method == "quantile":
        image_t = float(np.quantile(scores, quantile))
        pixel_t = float(np.quantile(maps, quantile))
    else:
        raise ValueError(f"unknown threshold method {method!r}; choose 'f1' or 'quantile'")
    return {
        "method": method,
        "source": source,
        "image_threshold": image_t,
        "pixel_threshold": pixel_t,
        "score_min": float(np.min(scores)),
        "score_max": float(np.max(scores)),
        "pixel_min": float(np.min(maps)),
        "pixel_max": float(np.max(maps)),
    }


# ----------------------------------------------------------------------------- inputs


def _to_array(item: ImageLike, name: str) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        try:
            data = Path(item).read_bytes()
        except OSError as e:
            raise DataError(f"{item}: cannot read ({e.strerror or e})") from None
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception as e:
            raise DataError(f"{item}: not a readable image ({type(e).__name__})") from None
        return np.asarray(to_rgb(img), np.uint8)
    if isinstance(item, Image.Image):
        return np.asarray(to_rgb(item), np.uint8)
    arr = np.asarray(item)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise DataError(f"{name}: expected a uint8 array of shape (H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def as_images(x: ImageLike | Sequence[ImageLike]) -> list[np.ndarray]:
    """Any supported input -> a list of uint8 HxWx3 arrays at their original size."""
    if isinstance(x, np.ndarray) and x.ndim == 4:
        return [_to_array(a, f"image {i}") for i, a in enumerate(x)]
    if isinstance(x, (list, tuple)):
        return [_to_array(a, f"image {i}") for i, a in enumerate(x)]
    return [_to_array(x, "image")]


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float map back to an image's (height, width), bilinear."""
    h, w = size
    if amap.shape == (h, w):
        return amap
    return np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass
class Prediction:
    """What predict returns, one entry per input image."""

    scores: np.ndarray  # (N,) raw image scores (max of the map)
    normalized_scores: np.ndarray | None  # (N,) in [0, 1], threshold at 0.5; None if uncalibrated
    decisions: np.ndarray | None  # (N,) bool, True = anomalous; None if uncalibrated
    maps: list[np.ndarray]  # per image, float32 (H, W) at the input's original resolution
    masks: list[np.ndarray] | None  # per image, bool (H, W), map >= pixel threshold


@dataclasses.dataclass
class Model:
    """A trained RD4AD model restored from a workdir, ready for inference."""

    config: Any
    workdir: Path
    step: int
    teacher_vars: Any
    student_vars: Any
    calibration: dict | None
    _eval_step: Any = dataclasses.field(repr=False)
    _put: Any = dataclasses.field(repr=False)

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def image_threshold(self) -> float | None:
        return None if self.calibration is None else self.calibration["image_threshold"]

    def preprocess(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """Resize with PIL's bilinear filter, exactly as training and evaluation do."""
        s = self.image_size
        return np.stack([np.asarray(Image.fromarray(a).resize((s, s), Image.BILINEAR), np.uint8) for a in images])

    def predict_resized(self, batch: np.ndarray, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Maps (at image_size) and scores of uint8 images already at image_size."""
        from rdjax.evaluate import predict_split

        bs = batch_size or int(self.config.eval_batch_size)
        bs = -(-bs // jax.device_count()) * jax.device_count()
        return predict_split(self._eval_step, self.teacher_vars, self.student_vars, batch, bs, self._put)

    def predict(self, x: ImageLike | Sequence[ImageLike], batch_size: int | None = None) -> Prediction:
        """Scores, maps at each input's own resolution, and masks/decisions when calibrated.

        ``x``: a uint8 HxWx3 array, a uint8 NxHxWx3 batch, a PIL image, a path, or a list
        of any of these (sizes may differ). Large inputs are batched automatically.
        """
        images = as_images(x)
        if not images:
            raise ValueError("predict() got no images")
        maps, scores = self.predict_resized(self.preprocess(images), batch_size)
        full = [resize_map(m, a.shape[:2]) for m, a in zip(maps, images)]
        cal = self.calibration
        if cal is None:
            return Prediction(scores, None, None, full, None)
        return Prediction(
            scores=scores,
            normalized_scores=normalize_scores(scores, cal["image_threshold"], cal["score_min"], cal["score_max"]),
            decisions=scores >= cal["image_threshold"],
            maps=full,
            masks=[m >= cal["pixel_threshold"] for m in full],
        )

    def normalized_map(self, amap: np.ndarray) -> np.ndarray:
        """A map on the normalized pixel scale: 0.5 at the pixel threshold."""
        cal = self.calibration
        if cal is None:
            raise ValueError(f"{self.workdir}: no calibration.json; train (or evaluate) first to calibrate")
        return normalize_scores(amap, cal["pixel_threshold"], cal["pixel_min"], cal["pixel_max"])


def load(workdir: str | os.PathLike, step: int | None = None, dtype: str | None = None) -> Model:
    """Restore the model in ``workdir`` (its latest checkpoint by default) on the available devices.

    ``dtype`` overrides the compute dtype the model was trained with: ``'bfloat16'`` runs a
    float32-trained model about twice as fast on CPUs with AVX512-BF16/AMX, with maps
    within a few percent (README, "Mixed precision"). The calibrated thresholds were fitted
    on maps of the training dtype, so images scored within that margin of a threshold may
    be decided differently.
    """
    from rdjax import checkpoint, evaluate, train
    from rdjax.data import pipeline
    from rdjax.models.rd4ad import RD4AD

    workdir = Path(workdir)
    config = checkpoint.load_config(workdir)
    if dtype is not None:
        config.dtype = dtype
    model = RD4AD(config.model.arch, config.dtype)
    mesh = pipeline.make_mesh()
    arch, teacher_vars = checkpoint.restore_teacher(workdir / "teacher")
    if arch != model.arch:
        raise ValueError(f"{workdir / 'teacher'}: holds a {arch} teacher but the config says {model.arch}")
    _, student_vars = jax.eval_shape(lambda: model.init(jax.random.key(0), 32))
    tx = train.make_optimizer(config.learning_rate, config.adam_b1, config.adam_b2)
    template = jax.eval_shape(lambda: train.create_train_state(student_vars, tx))
    template = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=pipeline.replicated(mesh)), template
    )
    with checkpoint.checkpoint_manager(workdir) as manager:
        latest = manager.latest_step() if step is None else step
        if latest is None:
            raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoint")
        state = checkpoint.restore_state(manager, template, latest)
    cal_path = workdir / "calibration.json"
    calibration = json.loads(cal_path.read_text()) if cal_path.is_file() else None
    return Model(
        config=config,
        workdir=workdir,
        step=int(latest),
        teacher_vars=jax.device_put(teacher_vars, pipeline.replicated(mesh)),
        student_vars=state.student_vars,
        calibration=calibration,
        _eval_step=evaluate.make_eval_step(model, config.map_mode, config.blur_sigma, config.imagenet_normalize),
        _put=lambda b: pipeline.put_batch(b, pipeline.batch_sharding(mesh)),
    )


def load_or_exit(workdir: str | os.PathLike, dtype: str | None = None) -> Model:
    """load() for the command-line tools: a bad workdir or dtype is one line on stderr and exit 1."""
    import sys

    try:
        return load(workdir, dtype=dtype)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
