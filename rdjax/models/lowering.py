"""How the convolutions are lowered: XLA's own ops on GPUs and TPUs, matmuls on the CPU.

The arithmetic is always the convolution's (tests compare it with torch); only the
lowering is chosen, with `jax.lax.platform_dependent`, because XLA:CPU runs some
convolution ops far below its matmul speed. docs/differences.md lists the choices.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

_PORTABLE = contextvars.ContextVar("rdjax_portable_lowering", default=False)


@contextlib.contextmanager
def portable() -> Iterator[None]:
    """Trace with XLA's own convolutions only, and no `platform_dependent`: for
    converters that read the program (ONNX), which know neither the choice nor the CPU
    matmul lowering. The arithmetic is the same; only the lowering differs."""
    token = _PORTABLE.set(True)
    try:
        yield
    finally:
        _PORTABLE.reset(token)


def _by_platform(*args: jax.Array, cpu: Callable, default: Callable) -> jax.Array:
    """`cpu` on the CPU and `default` elsewhere, chosen when the program runs (or `default`
    under `portable()`)."""
    if _PORTABLE.get():
        return default(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


def _accum(dtype: Any) -> Any:
    """float32 for bfloat16/float32; float64 stays float64 (the reference precision)."""
    return jnp.promote_types(dtype, jnp.float32)


def at_least_float32(x: jax.Array) -> jax.Array:
    return x.astype(_accum(x.dtype))


@jax.custom_vjp
def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """2-D matmul accumulated in at least float32 and rounded to the input dtype.

    For float32 this is the plain matmul. For bfloat16 it is what a GPU does, and it is
    what XLA:CPU runs fast on CPUs with AVX512-BF16/AMX, unlike a bfloat16-result matmul
    or the float32 matmuls that autodiff's mixed-type transposes become. Hence the
    explicit VJP, whose two matmuls are this function again (docs/performance.md).
    """
    return jnp.dot(a, b, preferred_element_type=_accum(a.dtype)).astype(a.dtype)


def _matmul_fwd(a, b):
    return _matmul(a, b), (a, b)


def _matmul_bwd(residuals, g):
    a, b = residuals
    return _matmul(g, b.T), _matmul(a.T, g)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _xla_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _windows(x: jax.Array, ksize: int, stride: int, out_hw: tuple[int, int]) -> list[jax.Array]:
    """The padded input seen by each kernel tap (a, b), row-major: (N*Ho*Wo, C) each."""
    pad = ksize // 2
    n, _, _, c = x.shape
    ho, wo = out_hw
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return [
        jax.lax.slice(
            xp, (0, a, b, 0), (n, a + stride * (ho - 1) + 1, b + stride * (wo - 1) + 1, c), (1, stride, stride, 1)
        ).reshape(-1, c)
        for a in range(ksize)
        for b in range(ksize)
    ]


def _weight_grad_by_taps(x: jax.Array, dy: jax.Array, ksize: int, stride: int) -> jax.Array:
    """The kernel gradient as one 2-D matmul per kernel tap.

    XLA:CPU computes a convolution's kernel gradient several times slower than its
    forward pass, while a (pixels, C)^T @ (pixels, O) matmul runs near the machine's
    matmul peak.
    Tap (a, b) of the kernel sees the padded input shifted by (a, b), so its gradient
    is that strided window times the output gradient.
    """
    _, ho, wo, o = dy.shape
    dy2 = dy.reshape(-1, o)
    taps = [_matmul(window.T, dy2) for window in _windows(x, ksize, stride, (ho, wo))]
    return jnp.stack(taps).reshape(ksize, ksize, x.shape[-1], o)


def _conv_by_taps(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """The convolution as one matmul per kernel tap, summed in float32, then rounded.

    Used for bfloat16 on the CPU: XLA:CPU has no bfloat16 convolution (it converts to
    float32 and convolves there), while its bfloat16 matmuls run faster than float32.
    This wins for wide layers only, hence `_MIN_TAP_CHANNELS`.
    """
    ksize = kernel.shape[0]
    n, h, w, _ = x.shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    acc: jax.Array = sum(  # type: ignore[assignment]  # a sum of arrays (ksize**2 >= 1 terms)
        jnp.dot(window, kernel[i // ksize, i % ksize], preferred_element_type=_accum(x.dtype))
        for i, window in enumerate(_windows(x, ksize, stride, (ho, wo)))
    )
    return acc.astype(x.dtype).reshape(n, ho, wo, -1)


# See _conv_by_taps: below this many input channels XLA's (float32) convolution wins.
_MIN_TAP_CHANNELS = 256


def _conv_forward(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    if x.dtype != jnp.bfloat16 or x.shape[-1] < _MIN_TAP_CHANNELS:
        return _xla_conv(x, kernel, stride)
    return _by_platform(
        x,
        kernel,
        cpu=functools.partial(_conv_by_taps, stride=stride),
        default=functools.partial(_xla_conv, stride=stride),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_kxk(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return _conv_forward(x, kernel, stride)


def _conv_kxk_fwd(x, kernel, stride):
    return _conv_forward(x, kernel, stride), (x, kernel)


def _conv_kxk_bwd(stride, residuals, dy):
    """Input gradient: for stride 1 the convolution of dy with the flipped, transposed
    kernel (so it takes _conv_forward's CPU lowering); else XLA's transpose."""
    x, kernel = residuals
    if stride == 1:
        dx = _conv_forward(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), 1)
    else:
        dx = jax.vjp(lambda x_: _xla_conv(x_, kernel, stride), x)[1](dy)[0]
    dk = _by_platform(
        x,
        dy,
        cpu=lambda x_, dy_: _weight_grad_by_taps(x_, dy_, kernel.shape[0], stride),
        default=lambda x_, dy_: jax.vjp(lambda k: _xla_conv(x_, k, stride), kernel)[1](dy_)[0],
    )
    return dx, dk


_conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)


def _conv_1x1_matmul(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    if stride > 1:
        x = x[:, ::stride, ::stride]
    n, h, w, c = x.shape
    return _matmul(x.reshape(-1, c), kernel.reshape(c, -1)).reshape(n, h, w, -1)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """PyTorch's bias-free Conv2d(padding=k // 2) on NHWC input and an HWIO kernel.

    The arithmetic is the convolution's; only its lowering on the CPU is chosen for
    speed. There a 1x1 convolution is a strided subsample and one matmul (XLA:CPU runs
    its convolution op for 1x1 kernels slower than the same matmul), a larger kernel's
    gradient is computed tap by tap (see `_weight_grad_by_taps`), and so is a wide
    bfloat16 convolution (`_conv_by_taps`).
    GPUs and TPUs keep XLA's own convolutions throughout.
    """
    if kernel.shape[0] == 1:
        return _by_platform(
            x,
            kernel,
            cpu=functools.partial(_conv_1x1_matmul, stride=stride),
            default=functools.partial(_xla_conv, stride=stride),
        )
    return _conv_kxk(x, kernel, stride)


def deconv_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The 2x2 stride-2 transposed convolution's one matmul, float32-accumulated on the CPU."""
    return _by_platform(x, kernel, cpu=_matmul, default=jnp.matmul)
