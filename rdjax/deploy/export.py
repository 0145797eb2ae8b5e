"""Portable inference artifacts from a trained workdir (docs/export.md).

  rdjax export --workdir=DIR --out=model.jaxexport                 # jax.export, cpu+cuda+tpu
  rdjax export --workdir=DIR --out=model.onnx --format=onnx        # onnxruntime, OpenVINO
  ... --weights_dtype=float16                                      # half-size weights

Both artifacts map the model's inputs (batch, S, S, 3), S = the workdir's image_size and
any batch size, in its recipe's dtype (uint8, or float32 in [0, 1] for OpenCV's recipe;
rdjax.data.preprocess.Recipe), to (maps (batch, M, M) float32, scores (batch,) float32),
M = config.map_size, else S: normalization, the
teacher, the OCBE, the decoder, the maps, the upsampling, the blur and the image score
(rdjax.scoring.maps.image_scores with the max_ratio the thresholds were calibrated with), with the
weights inside. ``FILE.json`` beside it holds the input contract, the normalization, the
score's rule, the thresholds and how to decide (the same rule as rdjax.Predictor.predict).

Resizing to S is left to the caller, by the recipe FILE.json names (the model's official
pipeline's): images arrive in any size, and PIL's antialiasing filter has no exact
StableHLO or ONNX equivalent, so no artifact of a fixed program could take them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from rdjax import modes
from rdjax.errors import ConfigError, WorkdirError

if TYPE_CHECKING:
    from rdjax.deploy.predictor import Predictor

PLATFORMS = ("cpu", "cuda", "tpu")
FORMATS = ("jax", "onnx")
WEIGHTS_DTYPES = ("float32", "float16", "bfloat16")


def inference_fn(
    model: Predictor, weights_dtype: str = "float32"
) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """Model inputs -> (maps, scores), the weights closed over as constants; the scores
    by the model's max_ratio (rdjax.Predictor.max_ratio), which its eval step applies.

    With ``weights_dtype`` float16 or bfloat16 the constants are stored in that type and
    widened to float32 where they are used: half the file, float32 arithmetic (the map
    error this costs is measured in docs/export.md)."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ConfigError(f"weights_dtype {weights_dtype!r}: choose one of {', '.join(WEIGHTS_DTYPES)}")
    store = jnp.dtype(weights_dtype)
    teacher, student = (
        jax.tree_util.tree_map(lambda a: np.asarray(a).astype(store), v)
        for v in (model.teacher_vars, model.student_vars)
    )

    def run(images: jax.Array) -> tuple[jax.Array, jax.Array]:
        # astype on the stored constant is staged into the program (jnp.asarray(a, float32)
        # would convert on the host and store float32).
        widen = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a).astype(jnp.float32), tree)  # noqa: E731
        return model.eval_step(widen(teacher), widen(student), images)

    return run


def export_jax(
    model: Predictor, weights_dtype: str = "float32", platforms: tuple[str, ...] = PLATFORMS
) -> jax.export.Exported:
    """The inference function for every platform in ``platforms``, batch size symbolic.
    On the CPU it keeps rdjax's CPU lowering (chosen at run time by platform)."""
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, 3), model.recipe.dtype)
    return jax.export.export(jax.jit(inference_fn(model, weights_dtype)), platforms=platforms)(spec)


def export_onnx(model: Predictor, weights_dtype: str = "float32") -> bytes:
    """The inference function as an ONNX model (opset 23) with a dynamic batch axis,
    input 'images', outputs 'maps' and 'scores'.

    Converted by jax2onnx from the traced program, with XLA's plain convolutions
    (`lowering.portable`): the CPU matmul lowering is a choice made when XLA runs and has no
    ONNX form. Identity nodes are removed afterwards: onnxruntime 1.32's graph optimizer
    rejects the Identity that jax2onnx writes for `stop_gradient` on a constant."""
    try:
        import onnx_ir
        from jax2onnx import to_onnx
        from onnx_ir.passes.common import IdentityEliminationPass
    except ImportError as e:
        raise ConfigError(
            f"--format=onnx needs jax2onnx and onnx-ir ({e.name} is missing): "
            "pip install 'rdjax[onnx]' && pip install --no-deps jax2onnx==0.17.1"
        ) from None
    from rdjax.models import lowering

    spec = jax.ShapeDtypeStruct(("batch", model.image_size, model.image_size, 3), model.recipe.dtype)
    with lowering.portable(), _quiet("jax2onnx", "onnx_ir"):
        ir_model = to_onnx(
            inference_fn(model, weights_dtype),
            [spec],
            model_name="rdjax",
            return_mode="ir",
            input_names=["images"],
            output_names=["maps", "scores"],
        )
        IdentityEliminationPass()(ir_model)
        return onnx_ir.to_proto(ir_model).SerializeToString()


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Only errors from these loggers: jax2onnx logs a traceback for each of its example
    plugins whose library (equinox, dm-pix) is not installed, and onnx-ir a warning for
    each shape value whose element type the converter left open (hundreds of lines). The
    model is complete either way: the tests run it."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for log, _ in saved:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in saved:
            log.setLevel(level)


def contract(model: Predictor, fmt: str, weights_dtype: str) -> dict:
    """What a caller needs besides the artifact: the input contract, the outputs, the
    image score's rule (max_ratio) and the decision rule with its thresholds (FILE.json)."""
    side = int(model.config.map_size) or model.image_size  # the maps' side (config.map_size)
    cal = model.calibration
    ratio = model.max_ratio
    recipe = model.recipe
    steps = ["x / 255"] if recipe.dtype == np.uint8 else []  # float32 inputs are in [0, 1] already
    if recipe.imagenet_normalize:
        steps.append("ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)")
    rule = (
        "each map's maximum"
        if ratio == 0
        else f"the mean of each map's int(H * W * {ratio}) highest pixels (at least one)"
    )
    return {
        "format": fmt,
        "platforms": list(PLATFORMS) if fmt == "jax" else ["onnx"],
        "weights_dtype": weights_dtype,
        "compute_dtype": "float32" if fmt == "onnx" else str(model.config.dtype),
        "input": {
            "name": "images",
            "shape": ["batch", model.image_size, model.image_size, 3],
            "dtype": recipe.dtype.name,
            "channels": "RGB",
            "recipe": dataclasses.asdict(recipe),
            "resize": recipe.describe(),
            "normalization": "inside the artifact: " + (", then ".join(steps) or "none"),
        },
        "resize": {
            **model.resize.to_dict(),
            "note": "the setting the thresholds were calibrated with: 'squeeze' "
            "resizes each image to the input size; 'fit' and 'tile' run the artifact on windows and blend "
            "their maps (docs/usage.md, 'Large and non-square images')",
        },
        "outputs": {"maps": ["batch", side, side, "float32"], "scores": ["batch", "float32"]},
        "score": {
            "max_ratio": ratio,
            "rule": f"{rule}: inside the artifact for its maps; with resize 'fit' or 'tile', the caller "
            "applies it to the blended map at the scale it was computed",
        },
        "decision": (
            "each image by the thresholds of the category router.npz recognises (calibration's 'categories'): "
            if model.category == modes.AUTO
            else ""
        )
        + "anomalous when score >= image_threshold; pixels with map >= pixel_threshold are anomalous",
        "category": model.category,
        "model": model.config.model.name,
        "arch": model.config.model.arch,
        "step": model.step,
        "calibration": None if cal is None else cal.to_json(),
    }


def export_workdir(
    workdir: str, out: Path, fmt: str = "jax", weights_dtype: str = "float32", category: str | None = None
) -> None:
    """Write ``out`` and ``out``.json; checks every argument before anything is written.
    The JSON holds the workdir's calibration whole (a unified one's global and per-category
    thresholds); with ``category``, that category's thresholds alone, and its name. The
    artifact computes maps and scores only, so routing ('auto') stays with rdjax."""
    from rdjax.deploy import predictor
    from rdjax.runtime.disk import write_bytes, write_json

    if fmt not in FORMATS:
        raise ConfigError(f"--format={fmt}: choose one of {', '.join(FORMATS)}")
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ConfigError(f"--weights_dtype={weights_dtype}: choose one of {', '.join(WEIGHTS_DTYPES)}")
    if not out.parent.is_dir():
        raise WorkdirError(f"{out.parent}: no such folder for --out")
    if out.is_dir():
        raise WorkdirError(f"{out}: is a folder; --out names the file to write")
    if category == predictor.AUTO:
        raise ConfigError("--category=auto routes images inside rdjax; an export takes one category, or none")
    model = predictor.load(workdir, dtype="float32" if fmt == "onnx" else None, category=category)
    data = export_jax(model, weights_dtype).serialize() if fmt == "jax" else export_onnx(model, weights_dtype)
    write_bytes(out, bytes(data))
    write_json(out.with_name(out.name + ".json"), contract(model, fmt, weights_dtype))
    print(f"wrote {out} ({len(data) / 2**20:.1f} MiB, {fmt}, {weights_dtype} weights) and {out.name}.json")


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    """`rdjax export`'s flags."""
    flags.DEFINE_string("workdir", None, "A trained (or ported) rdjax workdir, or a package.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output file for the serialized function (its folder must exist).", flag_values=fv)
    flags.DEFINE_string(
        "format", "jax", "jax (jax.export for cpu, cuda and tpu) or onnx (onnxruntime, OpenVINO).", flag_values=fv
    )
    flags.DEFINE_string(
        "weights_dtype",
        "float32",
        "Stored weights: float32, float16 or bfloat16 (computed in float32 either way).",
        flag_values=fv,
    )
    flags.DEFINE_string("category", None, modes.CATEGORY_HELP, flag_values=fv)
    flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


def main(fv: flags.FlagValues, args: list[str]) -> None:
    """`rdjax export`."""
    export_workdir(fv.workdir, Path(fv.out), fv.format, fv.weights_dtype, fv.category)
