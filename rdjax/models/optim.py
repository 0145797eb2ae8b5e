"""The optimizers and schedules the official codes use where optax has none: Dinomaly's
StableAdamW (optimizers/StableAdamW.py, amsgrad), its warm-up and cosine schedule
(utils.py WarmCosineScheduler) and torch.nn.utils.clip_grad_norm_."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def warm_cosine_schedule(base: float, final: float, total_iters: int, warmup_iters: int) -> np.ndarray:
    """WarmCosineScheduler's table (float64): a linear warm-up from 0 to ``base`` over
    ``warmup_iters`` (both ends included), then a cosine from ``base`` toward ``final``
    over the rest; iteration t uses entry t, and ``final`` after the table."""
    warmup = np.linspace(0.0, base, warmup_iters)
    iters = np.arange(total_iters - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


def schedule_fn(table: np.ndarray, final: float) -> Callable[[jax.Array], jax.Array]:
    """An optax schedule: step t -> table[t], ``final`` after the table."""
    values = jnp.asarray(table)  # float32, or float64 under jax_enable_x64 (the reference checks)

    def lr(count: jax.Array) -> jax.Array:
        return jnp.where(count < len(table), values[jnp.minimum(count, len(table) - 1)], final)

    return lr


def torch_clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: every gradient times min(max_norm / (norm + 1e-6), 1),
    norm the L2 norm of all of them (optax's clip has no 1e-6)."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        norm = optax.tree.norm(updates)
        coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class StableAdamWState(NamedTuple):
    step: jax.Array
    mu: Any
    nu: Any
    nu_max: Any


def stable_adamw(
    learning_rate: Callable[[jax.Array], jax.Array],
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    clip_threshold: float = 1.0,
) -> optax.GradientTransformation:
    """The official StableAdamW with amsgrad (optax has no equivalent: its AdamW neither
    clips the step per tensor nor takes the running maximum of the second moment).

    Per tensor: the decoupled decay p * lr * weight_decay; the moments; the denominator
    sqrt(max nu) / sqrt(1 - b2^t) + eps; and the Adam step lr / (1 - b1^t) mu / denom
    divided by max(1, RMS(g / denom) / clip_threshold), the "stable" part."""

    def init(params: Any) -> StableAdamWState:
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return StableAdamWState(jnp.zeros((), jnp.int32), zeros(), zeros(), zeros())

    def update(grads: Any, state: StableAdamWState, params: Any = None) -> tuple[Any, StableAdamWState]:
        if params is None:
            raise ValueError("stable_adamw needs the parameters (decoupled weight decay)")
        lr = learning_rate(state.step)
        t = state.step + 1
        # 1 - b^t as -expm1(t log b): b^t in float32 would be off by about 1e-5 relative.
        bc1 = -jnp.expm1(t * math.log(b1))
        bc2 = -jnp.expm1(t * math.log(b2))
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)

        def one(p: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array) -> jax.Array:
            denom = jnp.sqrt(v) / jnp.sqrt(bc2).astype(v.dtype) + eps
            rms = jnp.sqrt(jnp.mean(jnp.square(g / denom)))
            step_size = lr / bc1 / jnp.maximum(1.0, rms / clip_threshold)
            # The official p.mul_(1 - lr * wd) rounds the factor to the parameter's dtype: in
            # float32 the decay is quantized (none at all once lr * wd < 2^-25), and so is this.
            decay = (1.0 - lr * weight_decay).astype(p.dtype) - 1.0
            return (p * decay - step_size * m / denom).astype(p.dtype)

        updates = jax.tree.map(one, params, grads, mu, nu_max)
        return updates, StableAdamWState(t, mu, nu, nu_max)

    return optax.GradientTransformation(init, update)
