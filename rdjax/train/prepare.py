"""What a run works with (`Run`), built once by `setup`: the config resolved against the
workdir, the data, the teacher, the mesh, and the checks that fail before anything is
written."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from rdjax import config as config_lib
from rdjax import data, modes, registry
from rdjax import evaluators as evaluators_lib
from rdjax.data import pipeline
from rdjax.data.preprocess import Recipe, Split
from rdjax.errors import ConfigError, DataError
from rdjax.evaluators.calibration import calibration_split
from rdjax.models import Model
from rdjax.modes import FeatureCache
from rdjax.outputs import pictures
from rdjax.runtime import disk, sharding, weights
from rdjax.runtime import workdir as workdir_lib
from rdjax.scoring import thresholds as calibration_lib
from rdjax.train import cache, teacher
from rdjax.train.log import log, naming


@dataclasses.dataclass(frozen=True)
class Part:
    """One category's evaluation data: its test split and its held-out normal images."""

    test: Split
    validation: Split | None


@dataclasses.dataclass
class Run:
    """What one run works with, built once by `setup`: one category's data, or (the
    unified setting) every category's training images as one split and each category's
    evaluation data apart."""

    config: Any
    workdir: Path
    model: Model
    mesh: jax.sharding.Mesh
    put: Callable[[Any], Any]
    teacher_vars: Any
    warnings: list[str]
    train: Split
    parts: dict[str, Part]  # category -> its evaluation data
    unified: bool
    evaluators: dict[str, evaluators_lib.Evaluator]  # config.evals, built in run order
    feature_mode: str = FeatureCache.OFF.value  # config.feature_cache resolved (training only)
    feature_dir: Path | None = None  # where 'disk' keeps this process's share

    @property
    def steps_per_epoch(self) -> int:
        return max(pipeline.steps_per_epoch(len(self.train), self.config.batch_size, self.config.drop_last), 1)

    @property
    def total_steps(self) -> int:
        """The optimizer steps the run trains: config.total_steps, else num_epochs epochs."""
        return int(self.config.total_steps) or self.config.num_epochs * self.steps_per_epoch

    def epoch_steps(self, epoch: int) -> int:
        """Steps in ``epoch`` (1-based): all of them, but the last epoch of a run with
        config.total_steps stops there (an iteration-counted loop's last epoch)."""
        return max(min(self.steps_per_epoch, self.total_steps - (epoch - 1) * self.steps_per_epoch), 0)

    @property
    def eval_batch(self) -> int:
        return sharding.round_up(self.config.eval_batch_size, self.mesh.size)


def setup(config: Any, workdir: Path, writing: bool, dataset: data.Dataset | None = None) -> Run:
    """Check the config, load the data, then (and only then) touch the workdir: bad
    settings and bad data fail before anything is written. ``writing``: the run will
    write checkpoints, so the workdir must take them. With config.offline nothing here
    downloads (the teacher's weights, a TFDS dataset)."""
    with weights.offline_scope(config.offline):
        return _setup(config, workdir, writing, dataset)


def _setup(config: Any, workdir: Path, writing: bool, dataset: data.Dataset | None) -> Run:
    config, model = _resolved(config, workdir, writing)
    recipe = Recipe.from_config(config)
    crop = pictures.crop_note(recipe)
    if crop:
        log("note: %s", crop)
    dataset = dataset or registry.build_dataset(config.dataset)
    unified = modes.Setting(config.setting) is modes.Setting.UNIFIED
    train_split, parts = _load(config, dataset, recipe, _categories(config, workdir, dataset, unified), unified)
    config = _scheduled(config, train_split)
    _check_resize(config, parts)
    feature_mode, feature_dir = FeatureCache.OFF.value, None
    if writing:
        pipeline.lanes(len(train_split), config.batch_size, config.seed)  # fails if the batch is larger than the data
        feature_mode, feature_dir = cache.feature_mode(config, model, workdir, len(train_split))
    teacher_vars, warnings = _teacher(config, model, workdir, writing)
    mesh = sharding.make_mesh()
    return Run(
        config=config,
        workdir=workdir,
        model=model,
        mesh=mesh,
        put=functools.partial(sharding.put_batch, sharding=sharding.batch_sharding(mesh)),
        teacher_vars=jax.device_put(teacher_vars, sharding.replicated(mesh)),
        warnings=warnings,
        train=train_split,
        parts=parts,
        unified=unified,
        evaluators=evaluators_lib.build(config.evals, registry.EVALUATORS.get),
        feature_mode=feature_mode,
        feature_dir=feature_dir,
    )


def category_epochs(config: Any) -> Any:
    """config with num_epochs from num_epochs_by_category where the category has its own."""
    if modes.Setting(config.setting) is modes.Setting.UNIFIED:
        return config  # one schedule over the union
    epochs = config.num_epochs_by_category.get(config.dataset.category)
    if epochs is None or epochs == config.num_epochs:
        return config
    log("category %s: %d epochs (config.num_epochs_by_category, over num_epochs=%d)",
         config.dataset.category, epochs, config.num_epochs)  # fmt: skip
    config = config.copy_and_resolve_references()
    config.num_epochs = int(epochs)
    return config


def check_model_of(workdir: Path, config: Any, evaluating: bool) -> None:
    """A config that names another model than a trained workdir's, and carries the
    workdir's options (an evaluation's config is the workdir's own), is refused as
    config.check_rerun refuses another model, naming the model: the named model's own
    refusal would name one of the other model's options instead."""
    if not ((workdir / workdir_lib.CONFIG).is_file() or workdir_lib.categories(workdir)):
        return
    saved = workdir_lib.saved_config(workdir)
    if saved.model.name == config.model.name:
        return
    try:
        registry.build_model(config)
    except ConfigError:
        config_lib.check_rerun(workdir, saved, config, evaluating, registry.build_model(saved))


def _resolved(config: Any, workdir: Path, writing: bool) -> tuple[Any, Model]:
    """The checked config, resolved against a trained workdir's (its weights' settings
    stay as they are), and the model it builds."""
    config_lib.check(config, jax.device_count())
    check_model_of(workdir, config, evaluating=not writing)
    registry.check(config)
    model = registry.build_model(config)
    saved_config = workdir_lib.load_config(workdir) if (workdir / workdir_lib.CONFIG).is_file() else None
    config = config_lib.for_workdir(config, saved_config, model)
    if saved_config is not None:  # a trained workdir: its weights' settings stay as they are
        for note in config_lib.check_rerun(workdir, saved_config, config, evaluating=not writing, model=model):
            log("note: %s", note)
    return config, model


def _categories(config: Any, workdir: Path, dataset: data.Dataset, unified: bool) -> list[str]:
    """The categories the run covers: config.dataset.category, or every one (unified)."""
    categories = dataset.categories() if unified else [config.dataset.category]
    if not categories:
        raise DataError(f"{config.dataset.root}: no categories found (folders with train/ and test/)")
    if unified and not dataset.unifiable:
        raise ConfigError(
            f"config.setting='unified': dataset {config.dataset.name!r} has one-class problems, each class "
            "the others' anomalies; train them per category"
        )
    if unified:
        _check_categories(workdir, categories)
    return categories


def _load(
    config: Any, dataset: data.Dataset, recipe: Recipe, categories: list[str], unified: bool
) -> tuple[Split, dict[str, Part]]:
    """(the training split, each category's evaluation data)."""
    trains, parts = {}, {}
    for category in categories:  # each category holds out its own share of its train/good images
        with naming(category):
            train_split, test_split = dataset.load(category, recipe)
            trains[category], validation = data.hold_out(train_split, config.threshold.validation_size, config.seed)
            parts[category] = Part(test_split, validation)
            check_exact_metrics(config, max(len(test_split), len(validation or ())))
            warning = _few_images_warning(config, parts[category])
            if warning:
                log("warning: %s", warning)
    return (Split.concat(trains) if unified else trains[categories[0]]), parts


def _scheduled(config: Any, train_split: Split) -> Any:
    """An iteration-counted schedule (config.total_steps): as many epochs as its steps take."""
    if config.total_steps > 0:
        spe = max(pipeline.steps_per_epoch(len(train_split), config.batch_size, config.drop_last), 1)
        config = config.copy_and_resolve_references()
        config.num_epochs = -(-int(config.total_steps) // spe)
    return config


def _check_resize(config: Any, parts: dict[str, Part]) -> None:
    """'fit' and 'tile' need the images at their own size, which the last category's
    test split stands for."""
    test_split = list(parts.values())[-1].test
    if modes.ResizeMode(config.resize.mode) is not modes.ResizeMode.SQUEEZE and test_split.read_native is None:
        raise ConfigError(
            f"config.resize.mode={config.resize.mode!r}: dataset {config.dataset.name!r} has no images "
            "beyond image_size to tile; use 'squeeze'"
        )


def _teacher(config: Any, model: Model, workdir: Path, writing: bool) -> tuple[Any, list[str]]:
    """The teacher's variables and their warnings; a run that writes checks the workdir's
    room first, and the teacher is saved there where it is not yet."""
    teacher_vars, warnings, saved = teacher.for_run(config, model, workdir)  # a bad weights file fails here
    if writing:
        student = model.abstract_variables()[1]
        params = sum(x.size for x in jax.tree_util.tree_leaves(student))
        disk.check_writable(workdir, params * 4 * 3 * 2)  # params + Adam's two moments, float32, twice
    if not saved:
        workdir_lib.save_teacher(workdir / workdir_lib.TEACHER, model.arch, teacher_vars)  # every process takes part
    return teacher_vars, warnings


def _check_categories(workdir: Path, categories: list[str]) -> None:
    """A unified workdir's model and global thresholds belong to the categories it was
    calibrated on (calibration.json's 'categories'): a root that gained or lost one, or
    another dataset.category list, would change the union silently."""
    path = workdir / workdir_lib.CALIBRATION
    known = sorted(disk.read_json(path).get("categories", {})) if path.is_file() else []
    if known and known != sorted(categories):
        raise DataError(
            f"{workdir} was trained on the categories {', '.join(known)}, but this run has "
            f"{', '.join(sorted(categories))}: use a new --workdir, or pass --config.dataset.category="
            f"{','.join(known)} with the dataset's folders as they were"
        )


def _few_images_warning(config: Any, part: Part) -> str | None:
    """A category's thresholds will rest on too few images (thresholds.few_images): said
    once when the run starts, not at every evaluation. A unified model's global threshold
    rests on more images than any category's, so its categories' warnings cover it."""
    if not any(evaluators_lib.type_of(n, s) == "calibration" for n, s in config.evals.items()):
        return None
    split, source = calibration_split(config, part.test, part.validation)
    return calibration_lib.few_images({"num_images": len(split), "source": source, "method": config.threshold.method})


EXACT_BYTES_PER_PIXEL = 48  # maps and masks kept, then the exact metrics' sort and float64 weights


def check_exact_metrics(config: Any, images: int) -> None:
    """Exact pixel metrics keep every map: refuse before any work where that cannot fit."""
    pixels = images * map_side(config) ** 2
    need, have = EXACT_BYTES_PER_PIXEL * pixels, cache.available_memory()
    if pixels <= config.exact_metrics_max_pixels and need > have:
        raise ConfigError(
            f"exact pixel metrics over {pixels} pixels need about {need / 2**30:.1f} GiB but "
            f"{have / 2**30:.1f} GiB are available; lower config.exact_metrics_max_pixels (binned metrics)"
        )


def map_side(config: Any) -> int:
    """The side of the maps the metrics compare: config.map_size, else the input's."""
    return int(config.map_size) or int(config.image_size)
