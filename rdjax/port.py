"""Import PyTorch weights: `rdjax port teacher` and `rdjax port <model>` (rd4ad, rdpp).

  rdjax port teacher --arch=wide_resnet50_2 --src=FILE|imagenet --out=DIR
  rdjax port rd4ad --arch=wide_resnet50_2 --teacher=FILE|imagenet|DIR --src=CKPT --out=WORKDIR

`teacher` writes an orbax teacher checkpoint any host can read without torch. A model
name writes a complete workdir (config, teacher, a step-0 checkpoint) holding the
official model, which evaluation, prediction and export treat like one trained here.
The conversion rules are the model's own (rdjax.models); the file reading is
rdjax.weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from rdjax import config as config_lib
from rdjax import steps, weights
from rdjax import teacher as teacher_lib
from rdjax import workdir as workdir_lib
from rdjax.errors import ConfigError, WorkdirError
from rdjax.models.resnet import check_image_size
from rdjax.registry import MODELS


def write_ported_workdir(
    out: str | os.PathLike, name: str, model: Any, image_size: int, teacher_vars: Any, student_vars: Any
) -> None:
    """An rdjax workdir holding an official model. Its checkpoint has the train state's
    format (a fresh optimizer state), so it also resumes like one trained here."""
    out = Path(out)
    config = config_lib.defaults()
    config.model.name = name
    config.model.arch = model.arch
    config.image_size = image_size
    config.model.teacher_weights = str((out / workdir_lib.TEACHER).resolve())
    tx = model.optimizer(config)
    state = steps.create_train_state(jax.tree_util.tree_map(jnp.asarray, student_vars), tx)
    workdir_lib.save_teacher(out / workdir_lib.TEACHER, model.arch, teacher_vars)
    with workdir_lib.checkpoint_manager(out, config.keep_checkpoints) as manager:
        workdir_lib.save_state(manager, 0, state)
    workdir_lib.save_config(out, config)


def port(what: str, arch: str, src: str, out: Path, teacher: str | None = None, image_size: int = 256) -> None:
    """Convert and write; nothing is written unless every check passed."""
    if out.exists():
        raise WorkdirError(f"{out}: already exists; choose a new output directory")
    if what == "teacher":
        model = MODELS.get("rd4ad")(arch)
        workdir_lib.save_teacher(out, arch, teacher_lib.from_source(model, src))
    else:
        model = MODELS.get(what)(arch)
        if teacher is None:
            raise ConfigError(f"rdjax port {what} needs --teacher (a weights file, 'imagenet' or a teacher directory)")
        check_image_size((1, image_size, image_size, 3))
        teacher_vars = teacher_lib.from_source(model, teacher)
        student_vars = model.port_official(weights.read_state_dict(src), source=src)
        write_ported_workdir(out, what, model, image_size, teacher_vars, student_vars)
    print(f"wrote {out}")


if __name__ == "__main__":
    from rdjax import cli

    sys.exit(cli.run(["port", *sys.argv[1:]]))
