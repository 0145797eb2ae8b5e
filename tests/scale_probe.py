"""Run in a subprocess with 8 host devices; saves its results to an .npz.

  scale_probe.py OUT           one train step of the same state and batch on meshes of
                               1, 2, 4 and 8 devices, float32: loss, gradients, new params
  scale_probe.py OUT --steps N N train steps (a new batch each) on the same meshes in
                               float64: the final params
"""

import sys

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rdjax import train
from rdjax.models import RD4AD


def _meshes():
    for n in (1, 2, 4, 8):
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        yield n, mesh, NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def _flat(prefix: str, tree) -> dict:
    return {f"{prefix}/{k}": np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}


def one_step() -> dict:
    model = RD4AD("resnet18")
    teacher_vars, student_vars = model.init(jax.random.key(0), 64)
    student_vars = jax.tree_util.tree_map(np.asarray, student_vars)
    images = jax.random.normal(jax.random.key(1), (8, 64, 64, 3))
    feats = jax.tree_util.tree_map(np.asarray, model.teacher_features(teacher_vars, images))
    tx = train.make_optimizer()
    result = {}
    for n, mesh, rep, dat in _meshes():

        @jax.jit
        def grads(params, f):
            def loss(p):
                s, _ = model.student_features({"params": p, "batch_stats": student_vars["batch_stats"]}, f, train=True)
                return train.cosine_distance_loss(f, s)
            return jax.value_and_grad(loss)(params)

        value, g = grads(jax.device_put(student_vars["params"], rep), jax.device_put(feats, dat))
        state = jax.device_put(train.create_train_state(student_vars, tx), rep)
        state, _ = train.make_train_step(model, tx, mesh)(state, jax.device_put(feats, dat))
        result[f"loss/{n}"] = np.asarray(value)
        result.update(_flat(f"grad/{n}", g))
        result.update(_flat(f"param/{n}", state.params))
    return result


def float64_steps(steps: int) -> dict:
    jax.config.update("jax_enable_x64", True)
    model = RD4AD("resnet18", "float64")
    to64 = lambda tree: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)  # noqa: E731
    teacher_vars, student_vars = map(to64, model.init(jax.random.key(0), 64))
    features = jax.jit(model.teacher_features)
    batches = [
        to64(features(teacher_vars, np.asarray(jax.random.normal(jax.random.key(i), (8, 64, 64, 3)), np.float64)))
        for i in range(steps)
    ]
    tx = train.make_optimizer()
    result = {}
    for n, mesh, rep, dat in _meshes():
        step = train.make_train_step(model, tx, mesh)
        state = jax.device_put(train.create_train_state(student_vars, tx), rep)
        for feats in batches:
            state, _ = step(state, jax.device_put(feats, dat))
        result.update(_flat(f"param64/{n}", state.params))
        result.update(_flat(f"stats64/{n}", state.batch_stats))
    return result


if __name__ == "__main__":
    out = sys.argv[1]
    np.savez(out, **(float64_steps(int(sys.argv[3])) if sys.argv[2:3] == ["--steps"] else one_step()))
