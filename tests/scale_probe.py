"""Run in a subprocess with 8 host devices: `scale_probe.py OUT STEPS` runs STEPS steps of
rdjax's own jitted train step (a new batch each, the same start) on meshes of 1, 2 and 8
devices, all in float64, and saves to an .npz (each mesh is a compilation of its own, the
slowest part, so 4 devices, between 2 and 8, is left out):
  loss/N, grad/N/...            the first step's loss and gradients. The gradients are
                                read from Adam's first moment, which after one step is
                                exactly (1 - b1) * g (b1 = 0.5: a multiplication by 0.5,
                                exact in floating point)
  param64/N/..., stats64/N/...  the parameters and BatchNorm statistics after STEPS steps
  start/...                     the parameters they started from
"""

import sys

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rdjax import config as config_lib
from rdjax import state as state_lib
from rdjax import steps
from rdjax.models.rd4ad import RD4AD

from conftest import random_variables

jax.config.update("jax_enable_x64", True)  # float64: the reference precision of these checks
SIZE = 32  # the smallest input the network takes: the checks are about sharding, not resolution


def _meshes():
    for n in (1, 2, 8):
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        yield n, mesh, NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def _flat(prefix: str, tree) -> dict:
    return {
        f"{prefix}/{k}": np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()
    }


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), tree)


def _setup(dtype: str, batches: int):
    model = RD4AD("resnet18", dtype)
    teacher_vars, student_vars = random_variables(RD4AD("resnet18"), SIZE, seed=0, dtype=dtype)
    features = jax.jit(model.teacher_features)
    feats = [
        _cast(
            features(teacher_vars, np.asarray(jax.random.normal(jax.random.key(i + 1), (8, SIZE, SIZE, 3)), dtype)),
            dtype,
        )
        for i in range(batches)
    ]
    return model, student_vars, feats


def run(count: int) -> dict:
    model, student_vars, batches = _setup("float64", count)
    b1 = 0.5
    tx = model.optimizer(config_lib.defaults())
    result = _flat("start", student_vars["params"])
    for n, mesh, rep, dat in _meshes():
        step = steps.make_train_step(model, tx, mesh)
        state = jax.device_put(state_lib.create_train_state(student_vars, tx), rep)
        for i, feats in enumerate(batches):
            valid = jax.device_put(np.ones(len(feats[0]), np.float32), dat)
            state, loss = step(state, jax.device_put(feats, dat), valid)
            if i == 0:
                result[f"loss/{n}"] = np.asarray(loss)
                adam = state.opt_state[0]
                result.update(_flat(f"grad/{n}", jax.tree_util.tree_map(lambda m: m / (1 - b1), adam.mu)))
        result.update(_flat(f"param64/{n}", state.params))
        result.update(_flat(f"stats64/{n}", state.batch_stats))
    return result


if __name__ == "__main__":
    np.savez(sys.argv[1], **run(int(sys.argv[2])))
