"""Configs: where a config file is found, defaults for old workdirs, and the checks that
run before any work.

Configs are Python files (ml_collections), shipped inside the package as rdjax.configs
(the repository's configs/ folder). A config is named by path (`configs/mvtec.py`,
`./mine`) or, anywhere rdjax is installed, by name (`mvtec`): a bare name is always a
shipped config, never a file of that name in the current folder (`resolve`).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_collections

from rdjax import compat, modes
from rdjax.errors import ConfigError

if TYPE_CHECKING:
    from rdjax.models import Model


def shipped() -> list[str]:
    """Names of the configs that ship with the package."""
    folder = importlib.resources.files("rdjax.configs")
    return sorted(p.name[:-3] for p in folder.iterdir() if p.name.endswith(".py") and not p.name.startswith("_"))


def resolve(name_or_path: str) -> Path:
    """A config file. A path (it holds a '/' or ends in '.py') is that file, or where none
    exists, the shipped config of its name ('mvtec.py', 'configs/mvtec.py' from outside
    the repository). A bare name is a shipped config only: a config file runs its code,
    so a file named 'mvtec' in the current folder is never run unless pointed at
    ('./mvtec')."""
    shipped_names = shipped()
    if "/" not in name_or_path and not name_or_path.endswith(".py"):
        if name_or_path in shipped_names:
            return Path(str(importlib.resources.files("rdjax.configs") / f"{name_or_path}.py"))
        raise ConfigError(
            f"{name_or_path}: no shipped config of that name (shipped: {', '.join(shipped_names)}); "
            f"a config file of your own is named by its path: ./{name_or_path}"
        )
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = path.name[:-3] if path.name.endswith(".py") else path.name
    if path.parent in (Path("."), Path("configs")) and name in shipped_names:
        return Path(str(importlib.resources.files("rdjax.configs") / f"{name}.py"))
    raise ConfigError(
        f"{name_or_path}: no such config file, and no shipped config of that name (shipped: {', '.join(shipped_names)})"
    )


def defaults() -> ml_collections.ConfigDict:
    from rdjax.configs import default

    return default.get_config()


def shipped_config(name: str) -> ml_collections.ConfigDict:
    """A shipped config by name (rdjax.configs.<name>.get_config())."""
    if name not in shipped():
        raise ConfigError(f"no shipped config {name!r} (shipped: {', '.join(shipped())})")
    return importlib.import_module(f"rdjax.configs.{name}").get_config()


def from_dict(saved: dict) -> ml_collections.ConfigDict:
    """A saved config (a workdir's config.json) over today's defaults: keys added to rdjax
    since the workdir was written take their default, which reproduces the old behaviour.
    config.evals is taken whole (an evaluator left out stays out), and what an old
    workdir holds in an older layout (0.2.0's config.evaluators, 0.7.0's model sections)
    or lacks reads as it was trained (rdjax.compat), whatever today's defaults."""
    config = defaults()
    saved = compat.migrate_config(saved, config.evals.to_dict(), sections=list(config.keys()))

    def merge(node: ml_collections.ConfigDict, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict) and key != "evals":
                merge(node[key], value)
            else:
                node[key] = value

    with config.ignore_type():
        merge(config, saved)
    return config


_POSITIVE = ("batch_size", "eval_batch_size", "num_epochs", "eval_every", "checkpoint_every", "keep_checkpoints")


def check(config: Any, device_count: int) -> None:
    """Fail before any work on settings that cannot run: one clear line each, section by
    section. (The plug-in names and a model's options are checked by rdjax.registry.check;
    the map keys left to the model, once resolved, by `for_workdir`.)"""
    _check_run(config, device_count)
    _check_schedule(config)
    _check_threshold(config)
    _check_input(config)
    check_maps(config)
    _check_evals(config)


def _check_run(config: Any, device_count: int) -> None:
    """The dtype, the dataset's name, the sizes and counts, and the setting."""
    modes.parse(modes.Dtype, config.dtype, "config.dtype")
    if not config.dataset.name:  # a workdir written by `rdjax port` before it recorded one
        raise ConfigError(
            "config.dataset.name is empty: pass --config.dataset.name=NAME (mvtec for any folder in "
            "MVTec AD's layout; docs/config.md lists the datasets)"
        )
    for key in _POSITIVE:
        if config[key] < 1:
            raise ConfigError(f"config.{key}={config[key]} must be at least 1")
    if config.batch_size % device_count:
        raise ConfigError(
            f"config.batch_size={config.batch_size} does not divide evenly over {device_count} devices; "
            f"use a multiple of {device_count}"
        )
    modes.parse(modes.FeatureCache, config.feature_cache, "config.feature_cache")
    if config.exact_metrics_max_pixels < 0:
        raise ConfigError(f"config.exact_metrics_max_pixels={config.exact_metrics_max_pixels} must be >= 0")
    modes.parse(modes.Setting, config.setting, "config.setting")


def _check_schedule(config: Any) -> None:
    """The run's length and the learning-rate decay."""
    if config.total_steps < 0:
        raise ConfigError(f"config.total_steps={config.total_steps} must be >= 0 (0: num_epochs epochs)")
    if config.lr_decay_epoch < 0 or config.lr_decay_factor <= 0:
        raise ConfigError(
            f"config.lr_decay_epoch={config.lr_decay_epoch} must be >= 0 and "
            f"config.lr_decay_factor={config.lr_decay_factor} > 0"
        )


def _check_threshold(config: Any) -> None:
    method = modes.parse(modes.ThresholdMethod, config.threshold.method, "config.threshold.method")
    if method is modes.ThresholdMethod.QUANTILE and config.threshold.validation_size <= 0:
        raise ConfigError(
            "config.threshold.method='quantile' needs held-out images: config.threshold.validation_size > 0 "
            "(a fraction of train/good, or a number of images)"
        )


def _check_input(config: Any) -> None:
    """config.input (how a file becomes the model's input) and config.resize (how an
    evaluation tiles it)."""
    modes.parse(modes.ResizeMode, config.resize.mode, "config.resize.mode")
    if config.input.filter:
        modes.parse(modes.ResizeFilter, config.input.filter, "config.input.filter")
    if config.input.resize not in (0, config.image_size) and config.resize.mode != modes.ResizeMode.SQUEEZE:
        raise ConfigError(
            f"config.resize.mode={config.resize.mode!r} tiles the whole image, but config.input.resize="
            f"{config.input.resize} centre-crops it; use 'squeeze'"
        )
    if config.input.resize and config.input.resize < config.image_size:
        raise ConfigError(
            f"config.input.resize={config.input.resize} is smaller than config.image_size={config.image_size}, "
            "which it is centre-cropped to; use 0 (no crop) or a larger side"
        )
    if config.resize.tile_size < 0 or config.resize.overlap < 0:
        raise ConfigError("config.resize.tile_size and config.resize.overlap must be >= 0")
    if not 0 <= config.input.mask_threshold < 1:
        raise ConfigError(f"config.input.mask_threshold={config.input.mask_threshold} must be in [0, 1)")


def check_maps(config: Any) -> None:
    """The map keys that are set (None: the model's recipe, checked once resolved)."""
    size, kernel = config.map_size, config.blur_kernel
    if (size is not None and size < 0) or (kernel is not None and (kernel < 0 or (kernel and kernel % 2 == 0))):
        raise ConfigError(f"config.map_size={size} must be >= 0 and config.blur_kernel={kernel} 0 or an odd size")
    if size not in (None, 0, config.image_size) and config.resize.mode != modes.ResizeMode.SQUEEZE:
        raise ConfigError(
            f"config.resize.mode={config.resize.mode!r} blends maps at the input's size; config.map_size="
            f"{size} resizes them: use 'squeeze' or map_size=0"
        )
    if config.map_mode is not None:
        modes.parse(modes.MapMode, config.map_mode, "config.map_mode")
    if config.max_ratio is not None and not 0 <= config.max_ratio <= 1:
        raise ConfigError(f"config.max_ratio={config.max_ratio} must be 0 (the map's maximum) or a fraction in (0, 1]")


def _check_evals(config: Any) -> None:
    if compat.EVALUATORS in config:
        raise ConfigError("config.evaluators was replaced by config.evals in rdjax 0.3 (docs/config.md)")
    for name, setting in config.evals.items():
        if not hasattr(setting, "get") or setting.get("every", 0) < 0:
            raise ConfigError(f"config.evals.{name} must be a dict with 'type' and, if given, 'every' >= 0")


# config.model's keys that are not the model's options (rdjax.registry.build_model).
MODEL_KEYS = ("name", "arch", "teacher_weights")
# The map keys (None: the model's own, rdjax.models.MapRecipe) -> the recipe's fields.
MAP_KEYS = {"map_mode": "mode", "blur_sigma": "blur_sigma", "blur_kernel": "blur_kernel", "map_size": "size",
            "max_ratio": "max_ratio"}  # fmt: skip


# What a rerun on a trained workdir may change: the schedule, the optimizer's rates (the
# trained part stays valid; training on continues from it; a model adds its
# rerun_options), where data and caches live, and what is evaluated. Everything else
# (model, architecture, teacher, dataset and category, image size, dtype, normalization,
# maps, seed, batch, hold-out, ...) is what the trained weights or their calibration
# depend on, and must equal the workdir's config.json: a list of what may change, so a
# key added later is protected until someone decides otherwise.
SCHEDULE_KEYS = (
    "num_epochs", "total_steps", "num_epochs_by_category", "eval_every", "checkpoint_every", "keep_checkpoints",
    "profile_steps",
    "learning_rate", "adam_b1", "adam_b2",
    "feature_cache", "feature_cache_dir", "offline", "eval_batch_size", "exact_metrics_max_pixels",
    "report_best_on_test", "evals", "dataset.root", "dataset.data_dir", "dataset.train_dir",
    "dataset.test_good_dir", "dataset.test_anomalous_dir", "dataset.mask_dir",
)  # fmt: skip
# `eval` only: an evaluation refits calibration.json, which records these, and predict
# follows calibration.json; and it restores the trained weights with the workdir's own
# teacher, so what only training reads does not matter to it. `train` writes
# config.json, so there they stay frozen.
EVALUATION_KEYS = (
    "resize.mode", "resize.tile_size", "resize.overlap", "threshold.method", "threshold.quantile", "max_ratio",
)  # fmt: skip
TRAINING_KEYS = ("batch_size", "drop_last", "model.teacher_weights")


def _flat(config: Any) -> dict[str, Any]:
    """Dotted key -> value, as config.json holds it (tuples as lists)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and prefix + key not in SCHEDULE_KEYS:
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value

    walk(json.loads(config.to_json_best_effort()), "")
    return out


# The keys only training reads: an evaluation's results do not depend on them (the teacher it
# uses is the workdir's own, whatever teacher_weights named at training).
TRAINING_ONLY = (
    "num_epochs", "total_steps", "num_epochs_by_category", "eval_every", "checkpoint_every", "keep_checkpoints",
    "profile_steps", "learning_rate", "adam_b1", "adam_b2", "lr_decay_epoch", "lr_decay_factor", "feature_cache",
    "feature_cache_dir", "offline", "batch_size", "drop_last", "model.teacher_weights",
)  # fmt: skip


def evaluation_settings(config: Any, model: Model) -> dict[str, Any]:
    """Dotted key -> value of every key an evaluation reads (all but TRAINING_ONLY and the
    model's training_options)."""
    only = TRAINING_ONLY + _options(model.training_options)
    return {k: v for k, v in _flat(config).items() if not _training_only(k, only)}


def _training_only(key: str, only: tuple[str, ...] = TRAINING_ONLY) -> bool:
    return any(key == t or key.startswith(t + ".") for t in only)


def _options(names: Iterable[str]) -> tuple[str, ...]:
    """A model's option names as dotted config keys."""
    return tuple(f"model.{name}" for name in names)


def _model_option(key: str) -> bool:
    """A dotted key of a model's options (config.model's keys beyond MODEL_KEYS)."""
    return key.startswith("model.") and key.removeprefix("model.") not in MODEL_KEYS


def for_workdir(config: Any, saved: Any | None, model: Model) -> Any:
    """A copy of ``config`` with what it leaves to the workdir resolved, so that config.json
    records it and a rerun (resuming an older workdir too) keeps it: config.input.filter ''
    -> the trained workdir's (``saved``), else the model's own; config.drop_last None ->
    the workdir's, else False (the official epoch); a map key None -> the workdir's, else
    the model's map recipe. The resolved map keys are checked (`check_maps`)."""
    config = config.copy_and_resolve_references()
    if not config.input.filter:
        config.input.filter = saved.input.filter if saved is not None else model.input_filter
    if config.drop_last is None:
        config.drop_last = bool(saved.drop_last) if saved is not None else False
    recipe = dataclasses.asdict(model.map_recipe)
    for key, field in MAP_KEYS.items():
        if config[key] is None:
            config[key] = saved[key] if saved is not None else recipe[field]
    check_maps(config)
    return config


def _node(config: Any, key: str) -> tuple[Any, str]:
    """(the ConfigDict holding a dotted key, the key's last part)."""
    *parents, leaf = key.split(".")
    for part in parents:
        config = config[part]
    return config, leaf


def for_evaluation(config: Any, saved: Any, given: Iterable[str]) -> tuple[Any, list[str]]:
    """What `rdjax eval` runs with: the workdir's own config (``saved``), with the keys the
    user gave as --config.KEY flags (``given``) taken from ``config``, for check_rerun to
    judge. A --config file's values fill only what the workdir left empty (a port records
    no root or category); any other value of the file is the file's default, not a choice
    made for these weights, so it never blocks their evaluation. Returns the config and
    the keys whose file value went unused (they differ, and an evaluation reads them; a
    model's options, which only its optimizer reads, are never listed)."""
    given = set(given)
    out = saved.copy_and_resolve_references()
    before, unused = _flat(saved), []
    with out.ignore_type():
        for key, value in _flat(config).items():
            if before.get(key) == "" or any(key == g or g.startswith(key + ".") for g in given):
                node, leaf = _node(config, key)
                target, _ = _node(out, key)
                target[leaf] = node[leaf]
            elif value not in ("", None, before.get(key)) and not _training_only(key) and not _model_option(key):
                unused.append(key)
    return out, unused


# Listed first in a refusal: a changed model is the change that matters most.
_MODEL_KEYS = ("model.name", "model.arch")


def _order(key: str) -> tuple[int, str]:
    return (_MODEL_KEYS.index(key) if key in _MODEL_KEYS else len(_MODEL_KEYS), key)


def check_rerun(workdir: Any, saved: Any, config: Any, evaluating: bool, model: Model) -> list[str]:
    """Refuse a run whose config changes what a trained workdir's weights or calibration
    depend on (one line naming every such key with both values, the model's first),
    before anything is written; return a note for each other key that differs
    (num_epochs extended, a moved data folder). A ported workdir (category '': trained
    elsewhere) may be evaluated on any dataset. ``model``'s rerun_options may change too,
    and in an evaluation its training_options."""
    before, now = _flat(saved), _flat(config)
    free = SCHEDULE_KEYS + _options(model.rerun_options)
    if evaluating:
        free += EVALUATION_KEYS + TRAINING_KEYS + _options(model.training_options)
    ported = before.get("dataset.category") == ""
    notes, blocking = [], []
    for key in sorted(before.keys() | now.keys(), key=_order):
        old, new = before.get(key), now.get(key)
        if old == new or (key == "num_epochs" and now.get("total_steps")):  # derived from total_steps
            continue
        if key in free or (key.startswith("dataset.") and (old == "" or ported)):
            notes.append(f"config.{key}={new!r} (the workdir's config.json has {old!r})")
        else:
            blocking.append((key, old, new))
    if not blocking:
        return notes
    (key, old, new), *rest = blocking
    also = f" (and {'; '.join(f'config.{k}={n!r}, not {o!r}' for k, o, n in rest)})" if rest else ""
    them, s, was = ("them", "s", "they were") if rest else ("it", "", "it was")
    if evaluating:  # every key not given comes from the workdir: the same command without these flags works
        refused = {k for k, _, _ in blocking}
        data = [f"--config.{k}={shlex.quote(str(v))}" for k, v in now.items()
                if k.startswith("dataset.") and k not in refused and v not in ("", None, before.get(k))]  # fmt: skip
        command = " ".join(["rdjax eval", f"--workdir={shlex.quote(str(workdir))}", *data])
        fix = f"an evaluation may not change {them}; leave out the flag{s}: {command}"
    else:
        hint = " or evaluate it with `rdjax eval`" if any(k in EVALUATION_KEYS for k, _, _ in blocking) else ""
        fix = f"a rerun may not change {them} (use a new --workdir{hint}, or leave the key{s} as {was})"
    raise ConfigError(f"config.{key}={new!r}, but {workdir} was trained with {old!r}{also}: {fix}")
