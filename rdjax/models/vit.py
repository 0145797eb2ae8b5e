"""DINOv2's Vision Transformer in Flax (facebookresearch/dinov2, models/vision_transformer.py):
the frozen encoder of Dinomaly.

Patch 14, optional register tokens, LayerScale, pre-norm blocks (LayerNorm eps 1e-6,
softmax attention with a qkv bias, GELU MLP), and DINOv2's position-embedding
interpolation: bicubic (PyTorch's, A = -0.75, no antialiasing) from the checkpoint's
grid to the input's, with scale factor (grid + 0.1) / checkpoint grid. Variables are named
as DINOv2's hub checkpoints, so a port is a rename (`convert_vit`); timm's
`vit_*_patch14_reg4_dinov2` names are accepted too.

Only the blocks up to the last one a caller asks for are run (`ViT.__call__(x, upto)`);
DINOv2's final norm and mask token are never used by Dinomaly, so they are not built.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rdjax.errors import ConfigError, PortError
from rdjax.models.blocks import Attention, Block
from rdjax.models.layers import Dtype
from rdjax.models.lowering import at_least_float32
from rdjax.runtime import weights

PATCH = 14
INTERPOLATE_OFFSET = 0.1  # DINOv2's interpolate_offset: the scale factor is (grid + 0.1) / source grid
HUB_URL = "https://dl.fbaipublicfiles.com/dinov2/"
EPS = 1e-6  # the blocks' LayerNorm


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    """A DINOv2 ViT: width, depth, heads, register tokens and the checkpoint's position grid."""

    dim: int
    depth: int
    heads: int
    registers: int = 4
    pos_grid: int = 37  # DINOv2's img_size=518 / patch 14
    hub_file: str | None = None  # the hub checkpoint (dl.fbaipublicfiles.com/dinov2/<model>/<file>)
    mlp_ratio: int = 4

    @property
    def prefix(self) -> int:
        """Tokens before the patches: the class token and the registers."""
        return 1 + self.registers


def _hub(model: str, registers: bool) -> str:
    """The hub checkpoint's path under HUB_URL."""
    return f"{model}/{model}{'_reg4' if registers else ''}_pretrain.pth"


VIT_ARCHS = {
    "dinov2_vits14_reg4": ViTSpec(384, 12, 6, 4, hub_file=_hub("dinov2_vits14", True)),
    "dinov2_vitb14_reg4": ViTSpec(768, 12, 12, 4, hub_file=_hub("dinov2_vitb14", True)),
    "dinov2_vitl14_reg4": ViTSpec(1024, 24, 16, 4, hub_file=_hub("dinov2_vitl14", True)),
    "dinov2_vits14": ViTSpec(384, 12, 6, 0, hub_file=_hub("dinov2_vits14", False)),
    "dinov2_vitb14": ViTSpec(768, 12, 12, 0, hub_file=_hub("dinov2_vitb14", False)),
    "dinov2_vitl14": ViTSpec(1024, 24, 16, 0, hub_file=_hub("dinov2_vitl14", False)),
    # A small random encoder for CPU demos and tests: ViT-S's layout at a quarter of the
    # width and a 16x16 position grid. It has no pretrained weights.
    "vit_tiny14_reg4": ViTSpec(96, 12, 3, 4, pos_grid=16),
}


def get_vit(name: str) -> ViTSpec:
    """The spec of ``name``, or a one-line ConfigError listing the known ones."""
    if name not in VIT_ARCHS:
        raise ConfigError(f"unknown ViT architecture {name!r}; choose one of {sorted(VIT_ARCHS)}")
    return VIT_ARCHS[name]


def check_image_size(image_size: int) -> None:
    """Patches tile the input exactly (DINOv2's PatchEmbed asserts it)."""
    if image_size < PATCH or image_size % PATCH:
        raise ConfigError(f"image_size={image_size}: a ViT with patch {PATCH} takes a multiple of {PATCH}")


def _cubic(t: np.ndarray, a: float = -0.75) -> tuple[np.ndarray, ...]:
    """PyTorch's cubic convolution coefficients for taps -1, 0, 1, 2 at fraction t."""

    def near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.cache
def bicubic_matrix(out_size: int, in_size: int, scale_factor: float) -> np.ndarray:
    """(out, in) matrix of torch.nn.functional.interpolate(mode='bicubic',
    align_corners=False, antialias=False) along one axis, given its ``scale_factor``: the
    source of output i is (i + 0.5) / scale_factor - 0.5, taps clamped to the border."""
    src = (np.arange(out_size) + 0.5) / scale_factor - 0.5
    base = np.floor(src)
    coeffs = _cubic(src - base)
    m = np.zeros((out_size, in_size), np.float64)
    for offset, c in zip((-1, 0, 1, 2), coeffs):
        np.add.at(m, (np.arange(out_size), np.clip(base.astype(int) + offset, 0, in_size - 1)), c)
    return m


def interpolate_pos_embed(pos: jax.Array, grid: tuple[int, int], source: int) -> jax.Array:
    """DINOv2's interpolate_pos_encoding for the patch positions (source*source, D) -> (h*w, D).
    The checkpoint's own grid is used as it is (DINOv2 interpolates only a different grid)."""
    h, w = grid
    if (h, w) == (source, source):
        return pos
    rows = bicubic_matrix(h, source, (h + INTERPOLATE_OFFSET) / source)
    cols = bicubic_matrix(w, source, (w + INTERPOLATE_OFFSET) / source)
    dim = pos.shape[-1]
    grid_pos = at_least_float32(pos).reshape(source, source, dim)
    out = jnp.einsum(
        "hi,ijd,wj->hwd",
        jnp.asarray(rows, grid_pos.dtype),
        grid_pos,
        jnp.asarray(cols, grid_pos.dtype),
        precision=jax.lax.Precision.HIGHEST,
    )
    return out.reshape(h * w, dim).astype(pos.dtype)


class ViT(nn.Module):
    """Images (B, H, W, 3), normalized, H and W multiples of 14 -> the token sequences
    (B, 1 + registers + h*w, D) after each of blocks 0..upto (the residual stream, before
    DINOv2's final norm). The residual stream stays in at least float32."""

    spec: ViTSpec
    depth: int  # blocks built: a caller that never runs the last ones does not hold them
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> list[jax.Array]:
        s = self.spec
        b, height, width, c = images.shape
        h, w = height // PATCH, width // PATCH
        init = nn.initializers.normal(0.02)
        kernel = self.param("patch_embed", init, (PATCH, PATCH, c, s.dim), jnp.float32)
        bias = self.param("patch_bias", nn.initializers.zeros, (s.dim,), jnp.float32)
        patches = images[:, : h * PATCH, : w * PATCH].reshape(b, h, PATCH, w, PATCH, c)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, PATCH * PATCH * c)
        acc = jnp.promote_types(self.dtype, jnp.float32)
        x = jnp.dot(
            patches.astype(self.dtype),
            kernel.reshape(-1, s.dim).astype(self.dtype),
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=acc,
        ) + bias.astype(acc)
        cls = self.param("cls_token", init, (1, 1, s.dim), jnp.float32)
        pos = self.param("pos_embed", init, (1, 1 + s.pos_grid**2, s.dim), jnp.float32)
        x = x + interpolate_pos_embed(pos[0, 1:], (h, w), s.pos_grid).astype(acc)
        parts = [jnp.broadcast_to(cls + pos[:, :1], (b, 1, s.dim)).astype(acc)]
        if s.registers:
            reg = self.param("register_tokens", init, (1, s.registers, s.dim), jnp.float32)
            parts.append(jnp.broadcast_to(reg, (b, s.registers, s.dim)).astype(acc))
        x = jnp.concatenate([*parts, x], axis=1)
        outs = []
        for i in range(self.depth):
            x = Block(s.heads, Attention, EPS, True, s.mlp_ratio, dtype=self.dtype, name=f"blocks_{i}")(x)
            outs.append(x)
        return outs


# ----------------------------------------------------------------------------- porting

_BLOCK_RENAMES = {"ls1.gamma": "ls1", "ls2.gamma": "ls2"}


def hub_state_dict(state_dict: weights.StateDict, spec: ViTSpec, source: str) -> weights.StateDict:
    """A DINOv2 hub checkpoint, or timm's `vit_*_patch14*_dinov2` state dict, in rdjax's
    names. timm folds the class token's position into cls_token and stores the
    registers as reg_token; both are the same function of the input."""
    sd = dict(state_dict)
    if "reg_token" in sd or ("pos_embed" in sd and sd["pos_embed"].shape[1] == spec.pos_grid**2):
        pos = sd["pos_embed"]
        sd["pos_embed"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
        if "reg_token" in sd:
            sd["register_tokens"] = sd.pop("reg_token")
    out: weights.StateDict = {}
    for key, value in sd.items():
        for old, new in _BLOCK_RENAMES.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        if key == "patch_embed.proj.weight":
            key, value = "patch_embed", value.transpose(2, 3, 1, 0)
        elif key == "patch_embed.proj.bias":
            key = "patch_bias"
        out[key] = value
    if "cls_token" not in out:
        raise PortError(f"{source}: not a DINOv2 ViT state dict (no 'cls_token')")
    return out


def _ignored(depth: int) -> Callable[[str], bool]:
    """DINOv2's final norm, mask token and classifier head, and blocks after the last one run."""

    def ignore(key: str) -> bool:
        if key.startswith(("norm.", "mask_token", "head.", "fc_norm.")):
            return True
        parts = key.split(".")
        return parts[0] == "blocks" and int(parts[1]) >= depth

    return ignore


def convert_vit(state_dict: weights.StateDict, spec: ViTSpec, target: dict, depth: int, source: str) -> dict:
    """A DINOv2 (hub or timm) state dict -> {'params': ...} of a ViT with ``depth`` blocks
    (strict: every other key is used, every variable found with its shape)."""
    sd = hub_state_dict(state_dict, spec, source)
    return weights.convert(sd, target, ignore=_ignored(depth), source=source)
