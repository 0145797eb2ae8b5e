"""Using a trained model: rdjax.load(workdir_or_package).predict(images).

A workdir (or a package made from it, rdjax.package) holds everything: config.json, the
teacher, checkpoints and calibration.json (thresholds and the normalized-score range, see
rdjax.calibration, and the resize and image-score rule they were fitted with). Nothing
else is needed, on any device, and no optimizer is built.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

from rdjax import maps as maps_lib
from rdjax import modes, sharding, tiling
from rdjax import workdir as workdir_lib
from rdjax.calibration import explanation_masks, normalize_scores
from rdjax.data.preprocess import Recipe, open_image, to_rgb
from rdjax.errors import ConfigError, DataError
from rdjax.registry import MODELS

ImageLike = Any  # uint8 HxWx3 array, a batch of them, a PIL image, or a path


# ----------------------------------------------------------------------------- inputs


def _to_array(item: ImageLike, name: str) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        try:
            data = Path(item).read_bytes()
        except OSError as e:
            raise DataError(f"{item}: cannot read ({e.strerror or e})") from None
        item = open_image(data, str(item))
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


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass
class Prediction:
    """What predict returns, one entry per input image."""

    scores: np.ndarray  # (N,) raw image scores (rdjax.maps.image_scores with Model.max_ratio)
    normalized_scores: np.ndarray | None  # (N,) in [0, 1], threshold at 0.5; None if uncalibrated
    decisions: np.ndarray | None  # (N,) bool, True = anomalous; None if uncalibrated
    maps: list[np.ndarray]  # per image, float32 (H, W) at the input's original resolution
    masks: list[np.ndarray] | None  # per image, bool (H, W): rdjax.calibration.explanation_masks


@dataclasses.dataclass
class Model:
    """A trained RD4AD model restored from a workdir, ready for inference."""

    config: Any
    workdir: Path
    step: int
    teacher_vars: Any
    student_vars: Any
    calibration: dict | None
    eval_step: maps_lib.EvalStep = dataclasses.field(repr=False)
    _put: Callable = dataclasses.field(repr=False)

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def image_threshold(self) -> float | None:
        return None if self.calibration is None else self.calibration["image_threshold"]

    @property
    def resize(self) -> Any:
        """The resize setting of the thresholds (calibration.json), else of the config."""
        cal = self.calibration
        if cal is not None and "resize" in cal:
            return ml_collections.ConfigDict(cal["resize"])
        return self.config.resize

    @property
    def max_ratio(self) -> float:
        """The image score's rule (rdjax.maps.image_scores) that the thresholds were
        calibrated with, which the eval step applies: `recorded_max_ratio`."""
        return self.eval_step.max_ratio

    @property
    def recipe(self) -> Recipe:
        """How a file becomes this model's input, as training and evaluation made it."""
        return Recipe.from_config(self.config)

    def preprocess(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """uint8 images of any size -> the model's inputs, by its recipe."""
        recipe = self.recipe
        return np.stack([recipe.image(a) for a in images])

    def predict_resized(self, batch: np.ndarray, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Maps (at image_size, or config.map_size) and scores of model inputs (`preprocess`)."""
        bs = sharding.round_up(batch_size or int(self.config.eval_batch_size), jax.device_count())
        step = lambda x: self.eval_step(self.teacher_vars, self.student_vars, x)
        maps, scores = sharding.map_global_batches(step, batch, bs, self._put, "predicting")
        return maps, scores

    def predict(
        self,
        x: ImageLike | Sequence[ImageLike],
        batch_size: int | None = None,
        resize: str | None = None,
        tile_size: int | None = None,
        overlap: int | None = None,
    ) -> Prediction:
        """Scores, maps at each input's own resolution, and masks/decisions when calibrated.

        ``x``: a uint8 HxWx3 array, a uint8 NxHxWx3 batch, a PIL image, a path, or a list
        of any of these (sizes may differ). Large inputs are batched automatically.
        ``resize``: 'squeeze' (the whole image to image_size, the paper's protocol),
        'fit' or 'tile' (windows of a proportionally scaled copy, blended; ``tile_size``
        native pixels per window, ``overlap`` native pixels between windows): see
        rdjax.tiling. Each left as None takes the setting the thresholds were calibrated
        with (calibration.json's 'resize'; else the workdir's config.resize). The image
        score always follows the thresholds' rule, `max_ratio`.
        """
        images = as_images(x)
        if not images:
            raise DataError("predict() got no images")
        setting = self.resize
        resize = setting.mode if resize is None else resize
        tile_size = (setting.tile_size or None) if tile_size is None else tile_size
        overlap = setting.overlap if overlap is None else overlap
        squeeze = modes.parse(modes.ResizeMode, resize, "resize") is modes.ResizeMode.SQUEEZE
        if not squeeze and self.recipe.resize not in (0, self.image_size):
            raise ConfigError(
                f"resize={resize!r} tiles the whole image, but this model's inputs are centre-cropped "
                f"(config.input.resize={self.recipe.resize}); use 'squeeze'"
            )
        if not squeeze and int(self.config.map_size) not in (0, self.image_size):
            raise ConfigError(
                f"resize={resize!r} blends maps at the input's size, but this model's maps are resized "
                f"(config.map_size={self.config.map_size}); use 'squeeze'"
            )
        if squeeze:
            maps, scores = self.predict_resized(self.preprocess(images), batch_size)
            full = [tiling.uncrop_map(m, a.shape[:2], self.recipe) for m, a in zip(maps, images)]
        else:
            run = lambda windows: self.predict_resized(windows, batch_size)[0]  # noqa: E731
            scales = [tiling.scale_for(resize, a.shape[:2], self.image_size, tile_size) for a in images]
            tiled = tiling.tiled_maps(images, self.recipe, scales, overlap, run)
            scores = tiling.blended_scores(tiled, self.max_ratio)
            full = [tiling.resize_map(m, a.shape[:2]) for m, a in zip(tiled, images)]
        cal = self.calibration
        if cal is None:
            return Prediction(scores, None, None, full, None)
        decisions = scores >= cal["image_threshold"]
        return Prediction(
            scores=scores,
            normalized_scores=normalize_scores(scores, cal["image_threshold"], cal["score_min"], cal["score_max"]),
            decisions=decisions,
            maps=full,
            masks=explanation_masks(full, decisions, cal["pixel_threshold"], cal["image_threshold"]),
        )

    def normalized_map(self, amap: np.ndarray) -> np.ndarray:
        """A map on the normalized pixel scale: 0.5 at the pixel threshold."""
        cal = self.calibration
        if cal is None:
            raise ConfigError(f"{self.workdir}: no calibration.json; train (or evaluate) first to calibrate")
        return normalize_scores(amap, cal["pixel_threshold"], cal["pixel_min"], cal["pixel_max"])


def recorded_max_ratio(calibration: dict | None, config: Any) -> float:
    """The max_ratio of the thresholds: calibration.json's, else (uncalibrated, or a
    calibration.json older than the key) the workdir config's, which defaults to 0."""
    if calibration is not None and "max_ratio" in calibration:
        return float(calibration["max_ratio"])
    return float(config.max_ratio)


def category_calibration(workdir: Path, calibration: dict | None, category: str) -> dict:
    """One category's thresholds of a unified workdir's calibration.json."""
    known = (calibration or {}).get("categories")
    if not known:
        raise ConfigError(f"{workdir}: not a calibrated unified workdir; its thresholds have no categories")
    if category not in known:
        raise ConfigError(f"{workdir}: no category {category!r}; its categories: {', '.join(sorted(known))}")
    return dict(known[category])


def load(
    workdir: str | os.PathLike, step: int | None = None, dtype: str | None = None, category: str | None = None
) -> Model:
    """Restore the model in ``workdir`` (its latest checkpoint by default), or in a package
    (`rdjax package`), on the available devices.

    ``category``: a unified workdir's category whose thresholds decide (calibration.json's
    'categories'); without it a unified model decides with its global thresholds.

    ``dtype`` overrides the compute dtype the model was trained with: ``'bfloat16'`` runs a
    float32-trained model faster on CPUs with AVX512-BF16/AMX, with maps within a few
    percent (docs/scaling.md, "Mixed precision"). The calibrated thresholds were fitted on
    maps of the training dtype, so images scored within that margin of a threshold may
    be decided differently.
    """
    workdir = Path(workdir)
    config = workdir_lib.load_config(workdir)
    if dtype is not None:
        modes.parse(modes.Dtype, dtype, "dtype")
        config.dtype = dtype
    model = MODELS.get(config.model.name)(config.model.arch, config.dtype)
    mesh = sharding.make_mesh()
    teacher_vars = workdir_lib.restore_teacher(workdir / workdir_lib.TEACHER, model.arch)
    if workdir_lib.is_package(workdir):
        if step is not None:
            raise ConfigError(f"{workdir}: a package holds one step ({step} was asked for)")
        step, student_vars = workdir_lib.restore_package_student(workdir, model.abstract_variables()[1])
        student_vars = jax.device_put(student_vars, sharding.replicated(mesh))
    else:
        step, student_vars = workdir_lib.restore_student(
            workdir, model.abstract_variables()[1], sharding.replicated(mesh), step
        )
    cal_path = workdir / workdir_lib.CALIBRATION
    calibration = workdir_lib.read_json(cal_path) if cal_path.is_file() else None
    if category is not None:
        calibration = category_calibration(workdir, calibration, category)
    return Model(
        config=config,
        workdir=workdir,
        step=step,
        teacher_vars=jax.device_put(teacher_vars, sharding.replicated(mesh)),
        student_vars=student_vars,
        calibration=calibration,
        eval_step=maps_lib.eval_step_for(model, config, max_ratio=recorded_max_ratio(calibration, config)),
        _put=lambda b: sharding.put_batch(b, sharding.batch_sharding(mesh)),
    )
