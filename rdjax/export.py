"""Serialize the whole inference function with jax.export (StableHLO).

  python -m rdjax.export --workdir=DIR --out=model.jaxexport

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

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained (or ported) rdjax workdir.")
flags.DEFINE_string("out", None, "Output file for the serialized function.")
flags.mark_flags_as_required(["workdir", "out"])


def export_model(model) -> jax.export.Exported:
    """The model's full inference path with its weights as constants, batch size symbolic."""
    from rdjax import evaluate
    from rdjax.models.rd4ad import RD4AD

    config = model.config
    net = RD4AD(config.model.arch, config.dtype)
    teacher = jax.tree_util.tree_map(np.asarray, model.teacher_vars)
    student = jax.tree_util.tree_map(np.asarray, model.student_vars)
    eval_step = evaluate.make_eval_step(net, config.map_mode, config.blur_sigma, config.imagenet_normalize)
    (batch,) = jax.export.symbolic_shape("batch")
    size = int(config.image_size)
    spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    return jax.export.export(jax.jit(lambda images: eval_step(teacher, student, images)))(spec)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from rdjax import inference

    model = inference.load_or_exit(FLAGS.workdir)
    out = Path(FLAGS.out)
    data = export_model(model).serialize()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    meta = {"input": ["batch", model.image_size, model.image_size, 3], "input_dtype": "uint8",
            "outputs": ["maps (batch, S, S) float32", "scores (batch,) float32"],
            "arch": model.config.model.arch, "step": model.step, "calibration": model.calibration}
    out.with_name(out.name + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out} ({len(data) / 2**20:.1f} MiB) and {out.name}.json")


if __name__ == "__main__":
    app.run(main)
