"""The jitted train steps: pure functions of the train state (rdjax.runtime.state), no I/O.

The teacher's variables are a separate argument: they are never differentiated, never seen
by the optimizer, and never donated or rewritten. The loss, its inputs and the optimizer
are the model's own (`train_inputs`, `train_loss`, `optimizer`). Each step's randomness
(RD++'s noise and shuffle) comes from fold_in(key(seed), step): a pure function of the
seed and the step, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import optax

from rdjax.data.normalize import standardize, to_unit
from rdjax.models import Model
from rdjax.pytrees import Variables
from rdjax.runtime.sharding import batch_sharding, replicated
from rdjax.runtime.state import TrainState


def step_key(seed: int, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)


def train_step_features(
    model: Model, tx: optax.GradientTransformation, seed: int, state: TrainState, inputs: Any, valid: jax.Array
) -> tuple[TrainState, jax.Array]:
    """One optimizer step given the model's train inputs (RD4AD: the teacher's features,
    precomputed or fresh) and which rows count (``valid``, 1 and 0: a partial last batch
    is padded to the full batch, rdjax.data.pipeline)."""
    key = jax.random.fold_in(step_key(seed, state.step), 1)  # 0 is train_inputs' (the noise)

    def loss_fn(params: Any) -> tuple[jax.Array, Any]:
        return model.train_loss({"params": params, "batch_stats": state.batch_stats}, inputs, key, valid, state.step)

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = dataclasses.replace(
        state,
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    return new_state, loss


def make_train_step(model: Model, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, seed: int = 0):
    """The jitted step with explicit shardings: state replicated, features split along the
    batch axis over every device; the old state's buffers are donated."""
    return jax.jit(
        functools.partial(train_step_features, model, tx, seed),
        in_shardings=(replicated(mesh), batch_sharding(mesh), batch_sharding(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=0,
    )


def make_image_train_step(
    model: Model,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    imagenet_normalize: bool = True,
    seed: int = 0,
):
    """The jitted step from model inputs (config.feature_cache='off'): the teacher's
    forward passes the model asks for, then the student update. The teacher's variables
    are an argument, replicated and never donated."""
    normalize = functools.partial(standardize, imagenet=imagenet_normalize)

    def step(
        state: TrainState, teacher_vars: Variables, images: jax.Array, valid: jax.Array
    ) -> tuple[TrainState, jax.Array]:
        key = jax.random.fold_in(step_key(seed, state.step), 0)
        inputs = model.train_inputs(teacher_vars, to_unit(images), key, normalize)
        return train_step_features(model, tx, seed, state, inputs, valid)

    return jax.jit(
        step,
        in_shardings=(replicated(mesh), replicated(mesh), batch_sharding(mesh), batch_sharding(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=0,
    )
