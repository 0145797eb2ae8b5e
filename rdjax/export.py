"""Serialize the whole inference function with jax.export (StableHLO).

  rdjax export --workdir=DIR --out=model.jaxexport

The artifact maps uint8 images (batch, S, S, 3), S = the workdir's image_size and any
batch size, to (maps (batch, S, S) float32, scores (batch,) float32): normalization, the
teacher, the OCBE, the decoder, the maps, the upsampling, the blur and the max. The
weights are inside it. Running it needs jax only, not rdjax:

    from jax import export
    exported = export.deserialize(open("model.jaxexport", "rb").read())
    maps, scores = exported.call(images_uint8)

Resizing to S is left to the caller (rdjax uses PIL's bilinear resize, the official
pipeline's), because PIL's antialiasing filter has no exact StableHLO equivalent.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rdjax.errors import WorkdirError


def export_model(model: Any) -> jax.export.Exported:
    """The model's full inference path with its weights as constants, batch size symbolic."""
    teacher = jax.tree_util.tree_map(np.asarray, model.teacher_vars)
    student = jax.tree_util.tree_map(np.asarray, model.student_vars)
    (batch,) = jax.export.symbolic_shape("batch")
    size = model.image_size
    spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    return jax.export.export(jax.jit(lambda images: model.eval_step(teacher, student, images)))(spec)


def export_workdir(workdir: str, out: Path) -> None:
    """Write ``out`` and ``out``.json (the input contract, the step and the calibration)."""
    from rdjax import inference
    from rdjax.workdir import write_bytes, write_json

    if not out.parent.is_dir():
        raise WorkdirError(f"{out.parent}: no such folder for --out")
    if out.is_dir():
        raise WorkdirError(f"{out}: is a folder; --out names the file to write")
    model = inference.load(workdir)
    data = export_model(model).serialize()
    meta = {"input": ["batch", model.image_size, model.image_size, 3], "input_dtype": "uint8",
            "outputs": ["maps (batch, S, S) float32", "scores (batch,) float32"],
            "model": model.config.model.name, "arch": model.config.model.arch, "step": model.step,
            "calibration": model.calibration}
    write_bytes(out, data)
    write_json(out.with_name(out.name + ".json"), meta)
    print(f"wrote {out} ({len(data) / 2**20:.1f} MiB) and {out.name}.json")


if __name__ == "__main__":
    from rdjax import cli

    sys.exit(cli.run(["export", *sys.argv[1:]]))
