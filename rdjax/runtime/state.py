"""The train state: what trains (the student) and its optimizer state, what a checkpoint
holds (workdir.save_state keeps the optimizer state in the latest step only: a resume needs
no other). The teacher's variables are never part of it: they are never differentiated,
never seen by the optimizer, and saved apart (workdir.TEACHER)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rdjax.pytrees import Variables


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def student_vars(self) -> Variables:
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(student_vars: Variables, tx: optax.GradientTransformation) -> TrainState:
    params = student_vars["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=student_vars["batch_stats"],
        opt_state=tx.init(params),
    )
