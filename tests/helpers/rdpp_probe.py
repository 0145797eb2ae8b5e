"""Run in a subprocess with 2 host devices: `rdpp_probe.py OUT` runs 2 RD++ steps from
uint8 images (teacher on the clean and the noised copy, MPL, Sinkhorn, one optimizer step
of 2 accumulated batches) on meshes of 1 and 2 devices in float64 from the same start,
and saves the start's parameters and the parameters and BatchNorm statistics of each to an
.npz (start/..., param/N/..., stats/N/...)."""

import sys
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rdjax import config as config_lib
from rdjax.models.rdpp import RDPP
from rdjax.runtime import state as state_lib
from rdjax.train import steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest
from conftest import random_variables  # noqa: E402

jax.config.update("jax_enable_x64", True)  # float64: the reference precision of these checks
SIZE = 32


def _flat(prefix: str, tree) -> dict:
    return {
        f"{prefix}/{k}": np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()
    }


def run() -> dict:
    model = RDPP("resnet18", "float64")
    teacher_vars, student_vars = random_variables(RDPP("resnet18"), SIZE, seed=0)
    tx = model.optimizer(config_lib.defaults())
    images = [np.random.default_rng(i).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8) for i in range(2)]
    result = _flat("start", student_vars["params"])
    for n in (1, 2):
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        step = steps.make_image_train_step(model, tx, mesh, True, seed=3)
        state = jax.device_put(state_lib.create_train_state(student_vars, tx), rep)
        teacher = jax.device_put(teacher_vars, rep)
        for batch in images:
            state, _ = step(
                state, teacher, jax.device_put(batch, dat), jax.device_put(np.ones(len(batch), np.float32), dat)
            )
        result.update(_flat(f"param/{n}", state.params))
        result.update(_flat(f"stats/{n}", state.batch_stats))
    return result


if __name__ == "__main__":
    np.savez(sys.argv[1], **run())
