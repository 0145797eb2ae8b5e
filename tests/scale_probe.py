"""Run in a subprocess with 8 host devices: one train step of the same state and batch on
meshes of 1, 2, 4 and 8 devices; saves loss, gradients and new parameters to an .npz."""

import sys

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rdjax import train
from rdjax.models import RD4AD


def main(out: str) -> None:
    model = RD4AD("resnet18")
    teacher_vars, student_vars = model.init(jax.random.key(0), 64)
    student_vars = jax.tree_util.tree_map(np.asarray, student_vars)
    images = jax.random.normal(jax.random.key(1), (8, 64, 64, 3))
    feats = jax.tree_util.tree_map(np.asarray, model.teacher_features(teacher_vars, images))
    tx = train.make_optimizer()
    result = {}
    for n in (1, 2, 4, 8):
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

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
        for k, v in traverse_util.flatten_dict(jax.device_get(g), sep="/").items():
            result[f"grad/{n}/{k}"] = np.asarray(v)
        for k, v in traverse_util.flatten_dict(jax.device_get(state.params), sep="/").items():
            result[f"param/{n}/{k}"] = np.asarray(v)
    np.savez(out, **result)


if __name__ == "__main__":
    main(sys.argv[1])
