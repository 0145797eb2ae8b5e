"""Run in a subprocess with 8 host devices: `scale_probe.py OUT STEPS` saves to an .npz,
on meshes of 1, 2, 4 and 8 devices, all in float64:
  loss/N, grad/N/...     the loss and gradients of one step (same state, same global batch)
  param64/N/..., stats64/N/...  the parameters and BatchNorm statistics after STEPS train
                         steps (a new batch each) from the same state
"""

import sys

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rdjax import steps
from rdjax.models import RD4AD

jax.config.update("jax_enable_x64", True)  # float64: the reference precision of these checks
SIZE = 32  # the smallest input the network takes: the checks are about sharding, not resolution


def _meshes():
    for n in (1, 2, 4, 8):
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        yield n, mesh, NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def _flat(prefix: str, tree) -> dict:
    return {f"{prefix}/{k}": np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), tree)


def _setup(dtype: str, batches: int):
    model = RD4AD("resnet18", dtype)
    teacher_vars, student_vars = (_cast(v, dtype) for v in RD4AD("resnet18").init(jax.random.key(0), SIZE))
    features = jax.jit(model.teacher_features)
    feats = [_cast(features(teacher_vars, np.asarray(jax.random.normal(jax.random.key(i + 1), (8, SIZE, SIZE, 3)), dtype)),
                   dtype) for i in range(batches)]
    return model, student_vars, feats


def one_step() -> dict:
    model, student_vars, (feats,) = _setup("float64", 1)
    result = {}
    for n, mesh, rep, dat in _meshes():

        @jax.jit
        def grads(params, f):
            def loss(p):
                s, _ = model.student_features({"params": p, "batch_stats": student_vars["batch_stats"]}, f, train=True)
                return model.loss(f, s)
            return jax.value_and_grad(loss)(params)

        value, g = grads(jax.device_put(student_vars["params"], rep), jax.device_put(feats, dat))
        result[f"loss/{n}"] = np.asarray(value)
        result.update(_flat(f"grad/{n}", g))
    return result


def float64_steps(count: int) -> dict:
    model, student_vars, batches = _setup("float64", count)
    tx = steps.make_optimizer()
    result = {}
    for n, mesh, rep, dat in _meshes():
        step = steps.make_train_step(model, tx, mesh)
        state = jax.device_put(steps.create_train_state(student_vars, tx), rep)
        for feats in batches:
            state, _ = step(state, jax.device_put(feats, dat))
        result.update(_flat(f"param64/{n}", state.params))
        result.update(_flat(f"stats64/{n}", state.batch_stats))
    return result


if __name__ == "__main__":
    np.savez(sys.argv[1], **one_step(), **float64_steps(int(sys.argv[2])))
