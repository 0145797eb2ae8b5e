"""Layers whose numerics match torch.nn exactly (same padding, same statistics).

Flax's stock layers differ from PyTorch in ways that matter for a weight port:
'SAME' padding is asymmetric for stride-2 convolutions, and BatchNorm updates its
running variance with the biased batch variance where PyTorch uses the unbiased one.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rdjax.models.lowering import at_least_float32, conv2d, deconv_matmul

Dtype = Any


# PyTorch's kaiming_normal_(mode='fan_out', nonlinearity='relu'), used by the
# official code for every Conv2d of the OCBE and the decoder. Flax's fan_out of an
# HWIO kernel is kh*kw*out, the same number PyTorch uses for an OIHW one.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default ConvTranspose2d init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan)),
# where PyTorch's fan_in of an (in, out, kh, kw) weight is out*kh*kw.
deconv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


# PyTorch's default Conv2d init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)) for the
# weight and the bias (RD++'s projection layers keep it).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Conv(nn.Module):
    """2-D convolution with PyTorch's symmetric zero padding (k // 2), bias-free unless
    ``use_bias`` (then initialized as PyTorch's default)."""

    features: int
    kernel_size: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    use_bias: bool = False
    kernel_init: Any = conv_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        fan_in = k * k * x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride)
        if not self.use_bias:
            return y
        bound = 1.0 / fan_in**0.5
        bias = self.param(
            "bias", lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound), (self.features,)
        )
        return y + bias.astype(y.dtype)


class ConvTranspose2x2(nn.Module):
    """PyTorch's ConvTranspose2d(kernel_size=2, stride=2, bias=False).

    With kernel 2 and stride 2 the output blocks do not overlap: input pixel (i, j)
    writes the 2x2 block at (2i, 2j) with weight[:, :, a, b]. That is one matmul and an
    interleave of its output blocks, with no kernel flip to get wrong. The parameter is
    named 'transposed_kernel' so that the weight port knows its PyTorch layout
    (in, out, kh, kw) without guessing from shapes.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        kernel = self.param("transposed_kernel", deconv_init, (2, 2, c, self.features), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = deconv_matmul(x.reshape(-1, c), kernel.transpose(2, 0, 1, 3).reshape(c, -1))
        return y.reshape(n, h, w, 2, 2, -1).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, self.features)


class BatchNorm(nn.Module):
    """PyTorch BatchNorm2d semantics (eps 1e-5, momentum 0.1), statistics in float32.

    In train mode the batch statistics are reduced over the whole (global) batch: under
    jit with a batch-sharded input, XLA inserts the cross-device reduction itself.
    The running variance is updated with the unbiased batch variance, as PyTorch does.
    ``valid`` (N,) of 1 and 0: the rows whose statistics count (a partial last batch is
    padded to full size with rows of 0); None counts every row.
    """

    use_running_average: bool
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        xf = at_least_float32(x)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            keep = jnp.ones(x.shape[0], bool) if valid is None else valid > 0
            keep = keep[:, None, None, None]
            # The values per channel that count; where (not a product) keeps a padding row's
            # inf or NaN out of the statistics.
            n = jnp.maximum(jnp.sum(keep), 1).astype(xf.dtype) * (x.shape[1] * x.shape[2])
            mean = jnp.sum(jnp.where(keep, xf, 0), axis=(0, 1, 2)) / n
            var = jnp.sum(jnp.where(keep, jnp.square(xf - mean), 0), axis=(0, 1, 2)) / n
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / jnp.maximum(n - 1, 1))
        y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """PyTorch's MaxPool2d(3, stride=2, padding=1): the maximum of the 9 strided windows
    of the input padded with -inf. A max is exact, so this equals any pooling op bit for
    bit; written with slices because ONNX converters and runtimes disagree on pooling
    ops' padding, while slices and maxima convert everywhere (docs/export.md)."""
    n, h, w, c = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    windows = [
        jax.lax.slice(xp, (0, a, b, 0), (n, a + 2 * (ho - 1) + 1, b + 2 * (wo - 1) + 1, c), (1, 2, 2, 1))
        for a in range(3)
        for b in range(3)
    ]
    out = windows[0]
    for window in windows[1:]:
        out = jnp.maximum(out, window)
    return out
