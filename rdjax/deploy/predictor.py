"""Using a trained model: rdjax.load(workdir_or_package).predict(images).

A workdir (or a package made from it, rdjax.deploy.package) holds everything: config.json, the
teacher, checkpoints and calibration.json (thresholds and the normalized-score range, see
rdjax.scoring.thresholds, and the resize and image-score rule they were fitted with). Nothing
else is needed, on any device, and no optimizer is built.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from rdjax import modes
from rdjax.data.preprocess import Recipe
from rdjax.deploy import loading
from rdjax.deploy.images import ImageLike, as_images
from rdjax.errors import ConfigError, DataError
from rdjax.modes import AUTO, GLOBAL
from rdjax.registry import build_model
from rdjax.runtime import sharding
from rdjax.runtime import workdir as workdir_lib
from rdjax.scoring import maps as maps_lib
from rdjax.scoring import router as router_lib
from rdjax.scoring import thresholds as calibration_lib
from rdjax.scoring import tiling
from rdjax.scoring.router import ROUTER, Router, load_router
from rdjax.scoring.thresholds import Calibration, explanation_masks, normalize_scores

ROUTER_HINT = f"{ROUTER} is written by the evaluation of a unified workdir: run `rdjax eval` on it"

# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass
class Prediction:
    """What predict returns, one entry per input image."""

    scores: np.ndarray  # (N,) raw image scores (rdjax.scoring.maps.image_scores with Predictor.max_ratio)
    normalized_scores: np.ndarray | None  # (N,) in [0, 1], threshold at 0.5; None if uncalibrated
    decisions: np.ndarray | None  # (N,) bool, True = anomalous; None if uncalibrated
    maps: list[np.ndarray]  # per image, float32 (H, W) at the input's original resolution
    masks: list[np.ndarray] | None  # per image, bool (H, W): rdjax.scoring.thresholds.explanation_masks
    categories: list[str] | None = None  # per image, whose thresholds decided: a category or GLOBAL
    thresholds: np.ndarray | None = None  # (N,) the image threshold that decided each image


@dataclasses.dataclass
class Predictor:
    """A trained model restored from a workdir or a package, ready for inference.

    ``calibration`` holds the thresholds that decide by default: the workdir's own, or
    for a unified one those of ``category`` (None: the global thresholds fitted over every
    category). ``calibrations`` is calibration.json whole, so that any call may decide
    with another category's thresholds (`thresholds`), or route each image to one
    (``category=AUTO``, rdjax.scoring.router)."""

    config: Any
    workdir: Path
    step: int
    teacher_vars: Any
    student_vars: Any
    calibration: Calibration | None
    eval_step: maps_lib.EvalStep = dataclasses.field(repr=False)
    _put: Callable = dataclasses.field(repr=False)
    calibrations: Calibration | None = None
    category: str | None = None
    router: Router | None = dataclasses.field(default=None, repr=False)

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def image_threshold(self) -> float | None:
        return None if self.calibration is None else self.calibration.image_threshold

    @property
    def categories(self) -> list[str]:
        """A unified model's categories (those with thresholds of their own), else []."""
        return sorted(self.calibrations.categories or {}) if self.calibrations is not None else []

    @property
    def decided_by(self) -> str:
        """Whose thresholds ``calibration`` holds: the category, GLOBAL for a unified
        model's global ones, or the workdir's own category."""
        if self.category is not None:
            return self.category
        return GLOBAL if self.categories else str(self.config.dataset.category or GLOBAL)

    def thresholds(self, category: str | None = None) -> tuple[str, Calibration | None]:
        """(whose, the calibration) that decide for ``category`` (None: the default)."""
        if category is None or category in (self.category, self.decided_by):
            return self.decided_by, self.calibration
        if category == GLOBAL:  # a unified model's global thresholds; a per-category workdir's own
            return (GLOBAL, self.calibrations) if self.categories else (self.decided_by, self.calibration)
        return category, category_calibration(self.workdir, self.calibrations, category)

    def check_category(self, category: str | None) -> None:
        """Raise ConfigError for a category this model cannot decide with."""
        if category == AUTO:
            if self.router is None:
                raise ConfigError(f"{self.workdir}: category 'auto' needs a router ({ROUTER_HINT})")
        elif category is not None:
            self.thresholds(category)

    @property
    def resize(self) -> Any:
        """The resize setting of the thresholds (calibration.json), else of the config."""
        cal = self.calibration
        if cal is not None and cal.resize is not None:
            return ml_collections.ConfigDict(cal.resize)
        return self.config.resize

    @property
    def max_ratio(self) -> float:
        """The image score's rule (rdjax.scoring.maps.image_scores) that the thresholds were
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

    def route(self, inputs: np.ndarray, batch_size: int | None = None) -> list[str]:
        """Each model input's category by the router (rdjax.scoring.router)."""
        if self.router is None:
            raise ConfigError(f"{self.workdir}: category 'auto' needs a router ({ROUTER_HINT})")
        bs = sharding.round_up(batch_size or int(self.config.eval_batch_size), jax.device_count())
        model = build_model(self.config)
        normalize = bool(self.config.imagenet_normalize)
        return self.router.route(router_lib.embeddings(model, normalize, self.teacher_vars, inputs, bs, self._put))

    def _squeezes(self, resize: str) -> bool:
        """Whether ``resize`` squeezes; 'fit' and 'tile' are refused where this model's
        inputs are centre-cropped or its maps resized (windows need neither)."""
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
        return squeeze

    def predict(
        self,
        x: ImageLike | Sequence[ImageLike],
        batch_size: int | None = None,
        resize: str | None = None,
        tile_size: int | None = None,
        overlap: int | None = None,
        category: str | None = None,
    ) -> Prediction:
        """Scores, maps at each input's own resolution, and masks/decisions when calibrated.

        ``x``: a uint8 HxWx3 array, a uint8 NxHxWx3 batch, a PIL image, a path, or a list
        of any of these (sizes may differ). Large inputs are batched automatically.
        ``resize``: 'squeeze' (the whole image to image_size, the paper's protocol),
        'fit' or 'tile' (windows of a proportionally scaled copy, blended; ``tile_size``
        native pixels per window, ``overlap`` native pixels between windows): see
        rdjax.scoring.tiling. Each left as None takes the setting the thresholds were calibrated
        with (calibration.json's 'resize'; else the workdir's config.resize). The image
        score always follows the thresholds' rule, `max_ratio`. ``category``: whose
        thresholds decide (a unified model's category, GLOBAL, or AUTO to route each
        image; None: the model's default, `category`).
        """
        images = as_images(x)
        if not images:
            raise DataError("predict() got no images")
        self.check_category(category)
        setting = self.resize
        resize = setting.mode if resize is None else resize
        tile_size = (setting.tile_size or None) if tile_size is None else tile_size
        overlap = setting.overlap if overlap is None else overlap
        squeeze = self._squeezes(resize)
        chosen = self.category if category is None else category
        inputs = self.preprocess(images) if squeeze or chosen == AUTO else None
        if squeeze:
            assert inputs is not None
            maps, scores = self.predict_resized(inputs, batch_size)
            full = [tiling.uncrop_map(m, a.shape[:2], self.recipe) for m, a in zip(maps, images)]
        else:
            run = lambda windows: self.predict_resized(windows, batch_size)[0]  # noqa: E731
            scales = [tiling.scale_for(resize, a.shape[:2], self.image_size, tile_size) for a in images]
            tiled = tiling.tiled_maps(images, self.recipe, scales, overlap, run)
            scores = tiling.blended_scores(tiled, self.max_ratio)
            full = [tiling.resize_map(m, a.shape[:2]) for m, a in zip(tiled, images)]
        if self.calibration is None:
            return Prediction(scores, None, None, full, None)
        if chosen == AUTO:
            assert inputs is not None
            names = self.route(inputs, batch_size)
        else:
            names = [self.thresholds(category)[0]] * len(images)
        return decide(scores, full, names, {n: self.thresholds(n)[1] for n in set(names)})

    def normalized_map(self, amap: np.ndarray, category: str | None = None) -> np.ndarray:
        """A map on the normalized pixel scale of ``category``'s thresholds (`thresholds`):
        0.5 at the pixel threshold."""
        cal = self.thresholds(category)[1]
        if cal is None:
            raise ConfigError(f"{self.workdir}: no calibration.json; train (or evaluate) first to calibrate")
        return normalize_scores(amap, cal.pixel_threshold, cal.pixel_min, cal.pixel_max)


def recorded_max_ratio(calibration: Calibration | None, config: Any) -> float:
    """The max_ratio of the thresholds: calibration.json's, else (uncalibrated, or a
    calibration.json older than the key) the workdir config's, which defaults to 0."""
    if calibration is not None and calibration.max_ratio is not None:
        return float(calibration.max_ratio)
    return float(config.max_ratio)


def category_calibration(workdir: Path, calibration: Calibration | None, category: str) -> Calibration:
    """One category's thresholds of a unified workdir's calibration.json."""
    known = None if calibration is None else calibration.categories
    if not known:
        raise ConfigError(f"{workdir}: not a calibrated unified workdir; its thresholds have no categories")
    if category not in known:
        raise ConfigError(f"{workdir}: no category {category!r}; its categories: {', '.join(sorted(known))}")
    return known[category]


def normalized_score(score: float | np.ndarray, cal: Calibration) -> np.ndarray:
    """Image scores on the normalized scale of one calibration (0.5 at its threshold)."""
    return normalize_scores(np.asarray(score), cal.image_threshold, cal.score_min, cal.score_max)


def decide(
    scores: np.ndarray, maps: list[np.ndarray], names: list[str], calibrations: dict[str, Calibration | None]
) -> Prediction:
    """Each image decided by the thresholds of its category (``names``; their
    calibrations by name): normalized scores, decisions and explanation masks."""
    if any(c is None for c in calibrations.values()):
        return Prediction(scores, None, None, maps, None)
    cals = [calibrations[n] for n in names]
    thresholds = np.array([c.image_threshold for c in cals], np.float64)  # type: ignore[union-attr]
    decisions = scores >= thresholds
    normalized = np.array([normalized_score(s, c) for s, c in zip(scores, cals)])  # type: ignore[arg-type]
    masks = [explanation_masks([m], d[None], c.pixel_threshold, c.image_threshold)[0]  # type: ignore[union-attr]
             for m, d, c in zip(maps, decisions, cals)]  # fmt: skip
    return Prediction(scores, normalized, decisions, maps, masks, list(names), thresholds)


def disagreement(calibrations: Calibration | None, category: str | None) -> str | None:
    """The warning for a unified model that decides with its global thresholds while its
    categories' own differ (each product's defects judged against another's scale), with
    the numbers; None where nothing is at stake."""
    known = (None if calibrations is None else calibrations.categories) or {}
    if calibrations is None or category is not None or not known:
        return None
    top = float(calibrations.image_threshold)
    own = {c: float(v.image_threshold) for c, v in sorted(known.items())}
    if all(np.isclose(t, top, rtol=1e-6, atol=0) for t in own.values()):
        return None
    listed = ", ".join(f"{c} {t:.6g}" for c, t in own.items())
    return (
        f"this unified model decides with its global image threshold {top:.6g}, but its categories' own "
        f"thresholds differ ({listed}): choose one with --category=NAME (serve: ?category=NAME), "
        f"or --category=auto to recognise each image's category"
    )


def load(
    workdir: str | os.PathLike, step: int | None = None, dtype: str | None = None, category: str | None = None
) -> Predictor:
    """Restore the model in ``workdir`` (its latest checkpoint by default), or in a package
    (`rdjax package`), on the available devices. Nothing damaged or mismatched loads: the
    weights are checked against their recorded checksums (rdjax.runtime.disk), calibration.json
    against its schema (rdjax.scoring.thresholds.read) and its step against the weights'
    (rdjax.deploy.loading.check_fitted), each failure one WorkdirError line.

    ``category``: a unified workdir's category whose thresholds decide by default
    (calibration.json's 'categories'), GLOBAL, or AUTO (each image routed, rdjax.scoring.router);
    without it a package decides with the category it was packaged for, and any other
    unified model with its global thresholds, saying so once on stderr where the
    categories' own thresholds differ (`disagreement`).

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
    model = build_model(config)  # MODEL(arch, dtype, **options), as the run built it
    mesh = sharding.make_mesh()
    package = workdir_lib.is_package(workdir)
    fix = "make the package again with `rdjax package`" if package else f"refit them: rdjax eval --workdir={workdir}"
    cal_path = workdir / workdir_lib.CALIBRATION
    calibrations = calibration_lib.read(cal_path, fix) if cal_path.is_file() else None  # before the weights: cheaper
    teacher_vars = workdir_lib.restore_teacher(workdir / workdir_lib.TEACHER, model.arch)
    step, student_vars = loading.restore_student(workdir, model, mesh, step, calibrations, fix)
    if category is None and package:
        category = loading.packaged_category(workdir)
    if not (calibrations and calibrations.categories) and category in (GLOBAL, str(config.dataset.category)):
        category = None  # a per-category workdir's own thresholds, however named
    calibration = calibrations
    if category not in (None, AUTO, GLOBAL):
        calibration = category_calibration(workdir, calibrations, category)
    router = load_router(workdir / ROUTER)
    if category == AUTO and router is None:
        raise ConfigError(f"{workdir}: category 'auto' needs a router ({ROUTER_HINT})")
    warning = disagreement(calibrations, category)
    if warning:
        print(f"warning: {workdir}: {warning}", file=sys.stderr)
    return Predictor(
        config=config,
        workdir=workdir,
        step=step,
        teacher_vars=jax.device_put(teacher_vars, sharding.replicated(mesh)),
        student_vars=student_vars,
        calibration=calibration,
        eval_step=maps_lib.eval_step_for(model, config, max_ratio=recorded_max_ratio(calibration, config)),
        _put=lambda b: sharding.put_batch(b, sharding.batch_sharding(mesh)),
        calibrations=calibrations,
        category=category,
        router=router,
    )
