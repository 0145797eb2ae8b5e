"""Configs: where a config file is found, defaults for old workdirs, and the checks that
run before any work.

Configs are Python files (ml_collections), shipped inside the package as rdjax.configs
(the repository's configs/ folder). A config is named by path (`configs/mvtec.py`) or,
anywhere rdjax is installed, by name (`mvtec`).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import ml_collections

from rdjax.errors import ConfigError


def shipped() -> list[str]:
    """Names of the configs that ship with the package."""
    folder = importlib.resources.files("rdjax.configs")
    return sorted(p.name[:-3] for p in folder.iterdir() if p.name.endswith(".py") and not p.name.startswith("_"))


def resolve(name_or_path: str) -> Path:
    """A config file: an existing path, else a shipped config of that name (with or
    without '.py', or as 'configs/<name>.py' from outside the repository)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = path.name[:-3] if path.name.endswith(".py") else path.name
    if path.parent in (Path("."), Path("configs")) and name in shipped():
        return Path(str(importlib.resources.files("rdjax.configs") / f"{name}.py"))
    raise ConfigError(
        f"{name_or_path}: no such config file, and no shipped config of that name (shipped: {', '.join(shipped())})"
    )


def defaults() -> ml_collections.ConfigDict:
    from rdjax.configs import default

    return default.get_config()


def from_dict(saved: dict) -> ml_collections.ConfigDict:
    """A saved config (a workdir's config.json) over today's defaults: keys added to rdjax
    since the workdir was written take their default, which reproduces the old behaviour."""
    config = defaults()

    def merge(node: ml_collections.ConfigDict, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
                merge(node[key], value)
            else:
                node[key] = value

    with config.ignore_type():
        merge(config, saved)
    return config


def check_dtype(value: str, name: str = "config.dtype") -> None:
    """The compute dtypes a run may use (float64 is a test-only reference, see RD4AD)."""
    if value not in ("float32", "bfloat16"):
        raise ConfigError(f"{name}={value!r} is not supported; choose 'float32' or 'bfloat16'")


RESIZE_MODES = ("squeeze", "fit", "tile")  # rdjax.tiling
_POSITIVE = ("batch_size", "eval_batch_size", "num_epochs", "eval_every", "checkpoint_every", "keep_checkpoints")


def check(config: Any, device_count: int) -> None:
    """Fail before any work on settings that cannot run: one clear line each."""
    from rdjax.models.resnet import check_image_size
    from rdjax.registry import DATASETS, EVALUATORS, MODELS

    check_dtype(config.dtype)
    MODELS.get(config.model.name)(config.model.arch, config.dtype)  # unknown model or architecture
    DATASETS.get(config.dataset.name)
    for name in config.evaluators:
        EVALUATORS.get(name)
    names = list(config.evaluators)
    if "anomaly" not in names:
        raise ConfigError(f"config.evaluators={tuple(names)} must include 'anomaly' (the metrics every run reports)")
    if "report" in names and "calibration" in names and names.index("report") < names.index("calibration"):
        raise ConfigError("config.evaluators: 'calibration' must come before 'report', which draws its threshold")
    size = config.image_size
    check_image_size((1, size, size, 3))
    for key in _POSITIVE:
        if config[key] < 1:
            raise ConfigError(f"config.{key}={config[key]} must be at least 1")
    if config.batch_size % device_count:
        raise ConfigError(
            f"config.batch_size={config.batch_size} does not divide evenly over {device_count} devices; "
            f"use a multiple of {device_count}"
        )
    if config.threshold.method not in ("f1", "quantile"):
        raise ConfigError(f"config.threshold.method={config.threshold.method!r}; choose 'f1' or 'quantile'")
    if config.threshold.method == "quantile" and config.threshold.validation_size < 1:
        raise ConfigError(
            "config.threshold.method='quantile' needs config.threshold.validation_size >= 1 held-out images"
        )
    if config.feature_cache not in ("auto", "memory", "disk", "off"):
        raise ConfigError(f"config.feature_cache={config.feature_cache!r}; choose 'auto', 'memory', 'disk' or 'off'")
    if config.exact_metrics_max_pixels < 0:
        raise ConfigError(f"config.exact_metrics_max_pixels={config.exact_metrics_max_pixels} must be >= 0")
    if config.resize.mode not in RESIZE_MODES:
        raise ConfigError(f"config.resize.mode={config.resize.mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    if config.resize.tile_size < 0 or config.resize.overlap < 0:
        raise ConfigError("config.resize.tile_size and config.resize.overlap must be >= 0")
    if config.rdpp.accumulation < 1 or config.rdpp.proj_lr <= 0:
        raise ConfigError(
            f"config.rdpp.accumulation={config.rdpp.accumulation} must be >= 1 and "
            f"config.rdpp.proj_lr={config.rdpp.proj_lr} > 0"
        )
    if config.map_mode not in ("add", "mul"):
        raise ConfigError(f"config.map_mode={config.map_mode!r}; choose 'add' or 'mul'")
