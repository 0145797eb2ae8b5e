"""Train state, loss and the jitted train step.

The train state holds only what trains (OCBE + decoder) and its optimizer state. The
teacher's variables are a separate argument: they are never differentiated, never seen
by the optimizer, and never donated or rewritten.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rdjax.models.rd4ad import RD4AD, Features, Variables


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def student_vars(self) -> Variables:
        return {"params": self.params, "batch_stats": self.batch_stats}


def make_optimizer(learning_rate: float = 0.005, b1: float = 0.5, b2: float = 0.999) -> optax.GradientTransformation:
    """Adam with the official defaults (lr 0.005, betas (0.5, 0.999))."""
    return optax.adam(learning_rate, b1=b1, b2=b2)


def create_train_state(student_vars: Variables, tx: optax.GradientTransformation) -> TrainState:
    params = student_vars["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=student_vars["batch_stats"],
        opt_state=tx.init(params),
    )


def cosine_distance_loss(teacher: Features, student: Features, eps: float = 1e-8) -> jax.Array:
    """Official loss: per sample, 1 - cos between the *flattened* (H*W*C) feature maps,
    averaged over the batch and summed over the three scales.

    The paper's text describes a per-pixel loss; the code's flattened one is what
    produced the published numbers (see shared design notes), so rdjax uses it.
    """
    total = jnp.zeros((), jnp.float32)
    for t, s in zip(teacher, student):
        t = t.reshape(t.shape[0], -1).astype(jnp.float32)
        s = s.reshape(s.shape[0], -1).astype(jnp.float32)
        dot = jnp.sum(t * s, axis=1)
        norm = jnp.linalg.norm(t, axis=1) * jnp.linalg.norm(s, axis=1)
        total = total + jnp.mean(1.0 - dot / jnp.maximum(norm, eps))
    return total


def train_step_features(
    model: RD4AD, tx: optax.GradientTransformation, state: TrainState, teacher_feats: Features
) -> tuple[TrainState, jax.Array]:
    """One optimizer step given the teacher's features (precomputed or fresh)."""

    def loss_fn(params: Any) -> tuple[jax.Array, Any]:
        s, batch_stats = model.student_features(
            {"params": params, "batch_stats": state.batch_stats}, teacher_feats, train=True
        )
        return cosine_distance_loss(teacher_feats, s), batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    return new_state, loss


def train_step(
    model: RD4AD, tx: optax.GradientTransformation, state: TrainState, teacher_vars: Variables, images: jax.Array
) -> tuple[TrainState, jax.Array]:
    """One step from images: one teacher forward, then the student update."""
    return train_step_features(model, tx, state, model.teacher_features(teacher_vars, images))
