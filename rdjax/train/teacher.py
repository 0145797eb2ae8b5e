"""The frozen teacher of a run: from the workdir, a weights file, ImageNet, or random.

A run saves its teacher into the workdir once, so resuming, evaluating and predicting
never need the original weights file again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from absl import logging

from rdjax.errors import ConfigError
from rdjax.models import Model
from rdjax.pytrees import Variables
from rdjax.runtime import weights
from rdjax.runtime import workdir as workdir_lib

RANDOM_WARNING = (
    "the teacher is RANDOM (config.model.teacher_weights='none'): results are not comparable with the paper"
)


def from_source(model: Model, source: str) -> Variables:
    """Teacher variables from 'imagenet' (downloaded once into the cache, unless
    offline, rdjax.runtime.weights.offline), a .pth/.pt/.safetensors/.npz file, or an rdjax
    teacher directory."""
    if source == "imagenet":
        if model.imagenet_file is None:
            raise ConfigError(f"model {type(model).__name__} has no ImageNet teacher; give a weights file")
        path = weights.download(model.imagenet_file)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            return workdir_lib.restore_teacher(path, model.arch)
    return model.port_teacher(weights.read_state_dict(path), source=str(path))


def for_run(config: Any, model: Model, workdir: Path) -> tuple[Variables, list[str], bool]:
    """The workdir's own teacher if it has one (resume, eval), else
    config.model.teacher_weights. Returns (variables, the warnings to report, whether it
    is already in the workdir); the caller saves it there once the workdir is checked."""
    teacher_dir = workdir / workdir_lib.TEACHER
    source = config.model.teacher_weights
    if teacher_dir.exists():
        variables = workdir_lib.restore_teacher(teacher_dir, model.arch)
        if (workdir / workdir_lib.CONFIG).is_file():  # where the saved teacher came from
            source = workdir_lib.load_config(workdir).model.teacher_weights
    else:
        if source == "none":
            variables, _ = model.init(jax.random.key(config.seed), config.image_size)
        else:
            variables = from_source(model, source)
    saved = teacher_dir.exists()
    if source != "none":
        return variables, [], saved
    logging.warning("=" * 70)
    logging.warning("RANDOM TEACHER: %s", RANDOM_WARNING)
    logging.warning("=" * 70)
    return variables, [RANDOM_WARNING], saved
