"""The transformer layers DINOv2's encoder (rdjax.models.vit) and Dinomaly's decoder
(rdjax.models.dinomaly) share, in PyTorch's names so that a port is a rename: Linear,
LayerNorm, Mlp, softmax Attention, and one pre-norm Block that serves both (the
attention, the LayerNorm eps and LayerScale are its fields)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rdjax.models.layers import Dtype
from rdjax.models.lowering import at_least_float32


class Linear(nn.Module):
    """torch.nn.Linear: y = x W^T + b, the kernel stored (in, out) and computed in ``dtype``
    with at least float32 accumulation."""

    features: int
    dtype: Dtype = jnp.float32
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        y = jnp.dot(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            preferred_element_type=jnp.promote_types(self.dtype, jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis, statistics in at least float32."""

    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x32 = at_least_float32(x)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.param("scale", nn.initializers.ones, (dim,), jnp.float32)
        return (y + self.param("bias", nn.initializers.zeros, (dim,), jnp.float32)).astype(self.dtype)


class Mlp(nn.Module):
    """fc1 -> GELU (erf) -> fc2."""

    hidden: int
    dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = Linear(self.hidden, self.dtype, kernel_init=self.kernel_init, name="fc1")(x)
        x = nn.gelu(at_least_float32(x), approximate=False).astype(self.dtype)
        return Linear(dim, self.dtype, kernel_init=self.kernel_init, name="fc2")(x)


def split_heads(qkv: jax.Array, heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, N, 3D) -> q, k, v of shape (B, heads, N, D / heads), PyTorch's qkv layout."""
    b, n, three_d = qkv.shape
    parts = qkv.reshape(b, n, 3, heads, three_d // 3 // heads).transpose(2, 0, 3, 1, 4)
    return parts[0], parts[1], parts[2]


def merge_heads(x: jax.Array) -> jax.Array:
    """(B, heads, N, d) -> (B, N, heads * d), PyTorch's transpose(1, 2).reshape."""
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


class Attention(nn.Module):
    """Softmax attention, scale head_dim^-0.5, softmax in at least float32."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        q, k, v = split_heads(Linear(3 * dim, self.dtype, name="qkv")(x), self.heads)
        hp = jax.lax.Precision.HIGHEST
        acc = jnp.promote_types(self.dtype, jnp.float32)
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=hp, preferred_element_type=acc)
        attn = jax.nn.softmax(logits * (q.shape[-1] ** -0.5), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", attn, v, precision=hp, preferred_element_type=acc)
        return Linear(dim, self.dtype, name="proj")(merge_heads(out.astype(self.dtype)))


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))): DINOv2's block (softmax
    `Attention`, eps 1e-6, LayerScale) and Dinomaly's decoder block (its linear attention,
    eps 1e-8, no LayerScale: ls1 and ls2 are then the identity and hold no parameter).
    ``attention`` is built as attention(heads, dtype, name='attn')."""

    heads: int
    attention: type[nn.Module]
    eps: float
    layer_scale: bool
    mlp_ratio: int = 4
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()  # the Mlp's
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        if self.layer_scale:  # starts at 1 for a random encoder (ported weights replace it)
            ls1 = self.param("ls1", nn.initializers.ones, (dim,), jnp.float32)
            ls2 = self.param("ls2", nn.initializers.ones, (dim,), jnp.float32)
        y = self.attention(self.heads, self.dtype, name="attn")(LayerNorm(self.eps, self.dtype, name="norm1")(x))
        x = x + (at_least_float32(y) * ls1 if self.layer_scale else at_least_float32(y)).astype(x.dtype)
        mlp = Mlp(dim * self.mlp_ratio, self.dtype, kernel_init=self.kernel_init, name="mlp")
        y = mlp(LayerNorm(self.eps, self.dtype, name="norm2")(x))
        return x + (at_least_float32(y) * ls2 if self.layer_scale else at_least_float32(y)).astype(x.dtype)
