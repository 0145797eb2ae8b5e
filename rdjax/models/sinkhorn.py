"""The debiased Sinkhorn divergence between two point clouds, as RD++'s official code
computes it with geomloss 0.2.6 (`SamplesLoss('sinkhorn', p=2, blur=0.05, scaling=0.95,
diameter=1e7, debias=True)`, the 'tensorized' backend it picks for a batch of points).

Why not ott-jax: geomloss does not iterate to convergence. It runs one symmetric
(averaged) Sinkhorn update per temperature of an annealing schedule from diameter^p
down to blur^p, then one extrapolation step through which alone the gradients flow
(the potentials are constants, the cost matrices carry the gradient, each with its
right-hand argument detached). Its value depends on that schedule, so matching it to
1e-5 means running the same loop; ott-jax's solvers stop at a convergence threshold
and differentiate implicitly or by unrolling. The loop is a `lax.scan` over the
schedule (375 temperatures for RD++'s settings) on B x B matrices, negligible beside
the networks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def epsilon_schedule(p: float, diameter: float, blur: float, scaling: float) -> np.ndarray:
    """geomloss's temperatures: diameter^p, then a geometric descent by scaling^p, then blur^p."""
    steps = np.arange(p * np.log(diameter), p * np.log(blur), p * np.log(scaling))
    return np.array([diameter**p, *np.exp(steps), blur**p], np.float64)


def half_squared_distances(x: jax.Array, y: jax.Array) -> jax.Array:
    """|x_i - y_j|^2 / 2 expanded as geomloss does (|x|^2 - 2 x.y + |y|^2), so rounding matches."""
    hi = jax.lax.Precision.HIGHEST
    xx = jnp.sum(x * x, axis=-1)[:, None]
    yy = jnp.sum(y * y, axis=-1)[None, :]
    return (xx - 2 * jnp.matmul(x, y.T, precision=hi) + yy) / 2


def _softmin(eps: jax.Array, cost: jax.Array, h: jax.Array) -> jax.Array:
    """-eps log sum_j exp(h_j - C_ij / eps): the soft C-transform."""
    return -eps * jax.nn.logsumexp(h[None, :] - cost / eps, axis=1)


def _uniform(valid: jax.Array | None, n: int, dtype: jnp.dtype) -> jax.Array:
    """The uniform measure on the valid rows (all n where None)."""
    if valid is None:
        return jnp.full((n,), 1.0 / n, dtype)
    w = valid.astype(dtype)
    return w / jnp.sum(w)


def sinkhorn_divergence(
    x: jax.Array,
    y: jax.Array,
    blur: float = 0.05,
    scaling: float = 0.95,
    diameter: float = 1e7,
    *,
    x_valid: jax.Array | None = None,
    y_valid: jax.Array | None = None,
) -> jax.Array:
    """S(x, y) = OT(x, y) - OT(x, x) / 2 - OT(y, y) / 2 between uniform measures on the rows
    of x (N, D) and y (M, D) (on their ``valid`` rows, 1 and 0: the others weigh 0, so a
    padded batch gives the divergence of its valid rows), cost |x - y|^2 / 2, temperature
    blur^2, with geomloss's annealing loop and gradients (module docstring)."""
    sg = jax.lax.stop_gradient
    a = _uniform(x_valid, x.shape[0], x.dtype)
    b = _uniform(y_valid, y.shape[0], y.dtype)
    a_log, b_log = jnp.log(a), jnp.log(b)  # -inf where a row does not count: exp gives it 0
    c_xy, c_yx = half_squared_distances(x, sg(y)), half_squared_distances(y, sg(x))
    c_xx, c_yy = half_squared_distances(x, sg(x)), half_squared_distances(y, sg(y))
    eps_list = jnp.asarray(epsilon_schedule(2, diameter, blur, scaling), x.dtype)
    fixed = [sg(c) for c in (c_xy, c_yx, c_xx, c_yy)]

    def centred(potentials: tuple) -> tuple:
        """(f_ba + c, g_ab - c) is the same solution for any c, and every update and the
        divergence are equivariant or invariant to c; choosing c so that <a, f> = <b, g>
        changes nothing in exact arithmetic. It keeps float32 from drifting: at the first
        temperatures (1e14) one rounding of the soft-min is a shift of about 1e7, which
        the updates never remove and which would swamp the final sum."""
        f_ba, g_ab, f_aa, g_bb = potentials
        c = (jnp.dot(a, f_ba) - jnp.dot(b, g_ab)) / 2
        return f_ba - c, g_ab + c, f_aa, g_bb

    def update(potentials: tuple, eps: jax.Array) -> tuple[tuple, None]:
        f_ba, g_ab, f_aa, g_bb = potentials
        cxy, cyx, cxx, cyy = fixed
        new = (
            _softmin(eps, cxy, b_log + g_ab / eps),
            _softmin(eps, cyx, a_log + f_ba / eps),
            _softmin(eps, cxx, a_log + f_aa / eps),
            _softmin(eps, cyy, b_log + g_bb / eps),
        )
        return centred(tuple(0.5 * (old + t) for old, t in zip(potentials, new))), None

    eps0 = eps_list[0]
    start = centred(
        (
            _softmin(eps0, fixed[0], b_log),
            _softmin(eps0, fixed[1], a_log),
            _softmin(eps0, fixed[2], a_log),
            _softmin(eps0, fixed[3], b_log),
        )
    )
    (f_ba, g_ab, f_aa, g_bb), _ = jax.lax.scan(update, start, eps_list)
    eps = eps_list[-1]
    f_ba, g_ab = _softmin(eps, c_xy, sg(b_log + g_ab / eps)), _softmin(eps, c_yx, sg(a_log + f_ba / eps))
    f_aa, g_bb = _softmin(eps, c_xx, sg(a_log + f_aa / eps)), _softmin(eps, c_yy, sg(b_log + g_bb / eps))
    return jnp.dot(a, f_ba - f_aa) + jnp.dot(b, g_ab - g_bb)
