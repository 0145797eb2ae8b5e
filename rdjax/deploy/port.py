"""Import PyTorch weights: `rdjax port teacher` and `rdjax port <model>` (rd4ad, rdpp, dinomaly).

  rdjax port teacher --arch=wide_resnet50_2 --src=FILE|imagenet --out=DIR
  rdjax port rd4ad --arch=wide_resnet50_2 --teacher=FILE|imagenet|DIR --src=CKPT --out=WORKDIR
  rdjax port dinomaly --arch=dinov2_vitb14_reg4 --src=VITILL_STATE_DICT --out=WORKDIR

`teacher` writes an orbax teacher checkpoint any host can read without torch. A model
name writes a complete workdir (config, teacher, a step-0 checkpoint) holding the
official model, which evaluation, prediction and export treat like one trained here.
The conversion rules are the model's own (rdjax.models); the file reading is
rdjax.runtime.weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags

from rdjax import config as config_lib
from rdjax.errors import ConfigError, PortError, WorkdirError
from rdjax.registry import DATASETS, MODELS, build_model, model_for_arch
from rdjax.runtime import weights
from rdjax.runtime import workdir as workdir_lib
from rdjax.train import teacher as teacher_lib


def port(
    what: str, arch: str, src: str, out: Path, teacher: str | None = None, image_size: int = 0, dataset: str = "mvtec"
) -> None:
    """Convert and write; nothing is written unless every check passed. The workdir's config
    is the model's official one (image_size 0: its size) on ``dataset``, which `rdjax eval`
    then reads without being told. A checkpoint that holds its teacher (Dinomaly's) needs
    no --teacher; given one, the two must be equal."""
    if out.exists():
        raise WorkdirError(f"{out}: already exists; choose a new output directory")
    DATASETS.get(dataset)
    if what == "teacher":
        model = model_for_arch(arch)(arch, "float32")
        workdir_lib.save_teacher(out, arch, teacher_lib.from_source(model, src))
    else:
        model = MODELS.get(what)(arch, "float32")
        config = config_lib.shipped_config(model.official_config)  # the official recipe, maps and scores
        if image_size and image_size != config.image_size and config.input.resize:  # the crop keeps its share
            config.input.resize = round(config.input.resize * image_size / config.image_size)
        image_size = image_size or config.image_size
        model.check_image_size(image_size)
        state_dict = weights.read_state_dict(src)
        inside = model.official_teacher(state_dict, source=src)
        if teacher is None and inside is None:
            raise ConfigError(f"rdjax port {what} needs --teacher (a weights file, 'imagenet' or a teacher directory)")
        teacher_vars = inside if teacher is None else teacher_lib.from_source(model, teacher)
        if inside is not None and teacher is not None and not _equal(inside, teacher_vars):
            raise PortError(f"{src}: its encoder differs from --teacher={teacher}; give one of them")
        student_vars = model.port_official(state_dict, source=src)
        config.model.name, config.model.arch, config.image_size = what, arch, image_size
        config.input.filter = model.input_filter  # the official code's recipe, which its weights were trained on
        if config.drop_last is None:
            config.drop_last = False  # the official epoch (Dinomaly's official config sets full batches only)
        config = config_lib.for_workdir(config, None, model)  # the map keys it leaves unset: the model's recipe
        model = build_model(config)  # with the official config's options, as a run builds it
        config.model.teacher_weights = str((out / workdir_lib.TEACHER).resolve())
        # Trained elsewhere: the evaluation names root and category; category '' marks a
        # port, whose dataset keys any evaluation may change (rdjax.config.check_rerun).
        config.dataset.name, config.dataset.root, config.dataset.category = dataset, "", ""
        # The official code trains on every train/good image: none are held out, so the
        # thresholds can only be fitted on the test set (labelled so wherever reported).
        config.threshold.method, config.threshold.validation_size = "f1", 0
        workdir_lib.write_ported(out, config, model.optimizer(config), teacher_vars, student_vars)
    print(f"wrote {out}")


def _equal(a: Any, b: Any) -> bool:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    """`rdjax port`'s flags (what to port is its one positional argument)."""
    flags.DEFINE_string(
        "arch",
        None,
        "Backbone: resnet18, resnet34, resnet50, wide_resnet50_2, wide_resnet101_2; Dinomaly: dinov2_vitb14_reg4, ...",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "src",
        None,
        "teacher: a .pth/.pt/.safetensors/.npz file or 'imagenet'; a model (rdjax port --help lists them): its "
        "official checkpoint.",
        flag_values=fv,
    )
    flags.DEFINE_string("out", None, "Output directory (must not exist).", flag_values=fv)
    flags.DEFINE_string(
        "teacher", None, "A model's teacher: a weights file, 'imagenet' or an rdjax teacher directory.", flag_values=fv
    )
    flags.DEFINE_integer(
        "image_size", 0, "Image size recorded in a ported workdir's config (0: the official config's).", flag_values=fv
    )
    flags.DEFINE_string(
        "dataset",
        "mvtec",
        "The dataset recorded in a ported workdir's config, which `rdjax eval` reads by default "
        "(mvtec: any folder in MVTec AD's layout).",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["arch", "src", "out"], flag_values=fv)


def main(fv: flags.FlagValues, args: list[str]) -> None:
    """`rdjax port WHAT`."""
    if len(args) != 1:
        raise ConfigError(
            f"rdjax port needs what to port: 'teacher' or a model name ({', '.join(MODELS.names())}), e.g. "
            "rdjax port rd4ad --arch=wide_resnet50_2 --teacher=imagenet --src=CKPT --out=WORKDIR"
        )
    port(args[0], fv.arch, fv.src, Path(fv.out), fv.teacher, fv.image_size, fv.dataset)
