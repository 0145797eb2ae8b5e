"""Run in a subprocess with 8 host devices: `scale_probe.py OUT STEPS [MODEL]` runs STEPS
steps of rdjax's own jitted train step (a new batch each, the same start) on meshes of 1,
2 and 8 devices (Dinomaly: 1 and 2), all in float64, and saves to an .npz (each mesh is a
compilation of its own, the slowest part, so 4 devices, between 2 and 8, is left out):
  loss/N, grad/N/...            the first step's loss and gradients. The gradients are
                                read from Adam's first moment, which after one step is
                                (1 - b1) * g (RD4AD's b1 = 0.5: a multiplication by 0.5,
                                exact in floating point; Dinomaly's StableAdamW holds the
                                clipped gradient times 0.1, rounded once)
  param64/N/..., stats64/N/...  the parameters and BatchNorm statistics after STEPS steps
  start/...                     the parameters they started from
"""

import sys
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rdjax import config as config_lib
from rdjax.models.dinomaly import Dinomaly
from rdjax.models.rd4ad import RD4AD
from rdjax.runtime import state as state_lib
from rdjax.train import steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest
from conftest import random_variables  # noqa: E402

jax.config.update("jax_enable_x64", True)  # float64: the reference precision of these checks
SIZE = 32  # the smallest input the network takes: the checks are about sharding, not resolution


def _meshes(counts: tuple[int, ...]):
    for n in counts:
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        yield n, mesh, NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def _flat(prefix: str, tree) -> dict:
    return {
        f"{prefix}/{k}": np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()
    }


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), tree)


def _setup(name: str, dtype: str, batches: int):
    if name == "dinomaly":  # the tiny random ViT at 56 px: 4 x 4 patches
        # warmup_steps=0: the first step moves the parameters (warm-up starts at rate 0)
        model, size = Dinomaly("vit_tiny14_reg4", dtype, warmup_steps=0), 56
        teacher_vars, student_vars = _cast(Dinomaly("vit_tiny14_reg4").init(jax.random.key(0), size), dtype)
    else:
        model, size = RD4AD("resnet18", dtype), SIZE
        teacher_vars, student_vars = random_variables(RD4AD("resnet18"), SIZE, seed=0, dtype=dtype)
    features = jax.jit(model.teacher_features)
    feats = [
        _cast(
            features(teacher_vars, np.asarray(jax.random.normal(jax.random.key(i + 1), (8, size, size, 3)), dtype)),
            dtype,
        )
        for i in range(batches)
    ]
    return model, student_vars, feats


def run(count: int, name: str = "rd4ad") -> dict:
    model, student_vars, batches = _setup(name, "float64", count)
    config = config_lib.defaults()
    tx = model.optimizer(config, total_steps=10)
    result = _flat("start", student_vars["params"])
    for n, mesh, rep, dat in _meshes((1, 2) if name == "dinomaly" else (1, 2, 8)):
        step = steps.make_train_step(model, tx, mesh)
        state = jax.device_put(state_lib.create_train_state(student_vars, tx), rep)
        for i, feats in enumerate(batches):
            valid = jax.device_put(np.ones(len(feats[0]), np.float32), dat)
            state, loss = step(state, jax.device_put(feats, dat), valid)
            if i == 0:
                result[f"loss/{n}"] = np.asarray(loss)
                adam, b1 = (state.opt_state[1], 0.9) if name == "dinomaly" else (state.opt_state[0], 0.5)
                result.update(_flat(f"grad/{n}", jax.tree_util.tree_map(lambda m, b1=b1: m / (1 - b1), adam.mu)))
        result.update(_flat(f"param64/{n}", state.params))
        result.update(_flat(f"stats64/{n}", state.batch_stats))
    return result


if __name__ == "__main__":
    np.savez(sys.argv[1], **run(int(sys.argv[2]), *sys.argv[3:]))
