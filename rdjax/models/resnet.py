"""torchvision-architecture ResNet blocks and the teacher encoder (layer1-layer3).

Module names mirror PyTorch state-dict keys ('layer1.0.conv1' -> 'layer1_0/conv1') so the
weight port is a mechanical renaming. Blocks double as decoder blocks: with
``transposed=True`` their stride-2 convolution becomes the 2x2 stride-2 transposed
convolution of the official de_resnet.py, and the projection shortcut is called
'upsample' instead of 'downsample', as there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rdjax.errors import ConfigError, PortError
from rdjax.models.layers import BatchNorm, Conv, ConvTranspose2x2, Dtype, max_pool_3x3_s2
from rdjax.runtime import weights


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """What differs between the supported backbones."""

    block: str  # 'basic' or 'bottleneck'
    layers: tuple[int, int, int]  # blocks in layer1..layer3 (layer4 is never built)
    base_width: int = 64  # torchvision's width_per_group: 128 for the wide ResNets
    ocbe_blocks: int = 3  # blocks in the OCBE's one-class embedding layer

    @property
    def expansion(self) -> int:
        return 1 if self.block == "basic" else 4

    @property
    def feature_channels(self) -> tuple[int, int, int]:
        """Channels of the teacher's layer1, layer2, layer3 outputs."""
        e = self.expansion
        return (64 * e, 128 * e, 256 * e)


ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec("basic", (2, 2, 2), ocbe_blocks=2),
    "resnet34": ArchSpec("basic", (3, 4, 6)),
    "resnet50": ArchSpec("bottleneck", (3, 4, 6)),
    "wide_resnet50_2": ArchSpec("bottleneck", (3, 4, 6), base_width=128),
    "wide_resnet101_2": ArchSpec("bottleneck", (3, 4, 23), base_width=128),
}


# torchvision's ImageNet files (V1 weights, the ones the official code loads).
IMAGENET_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "wide_resnet50_2": "wide_resnet50_2-95faca4d.pth",
    "wide_resnet101_2": "wide_resnet101_2-32ee1156.pth",
}


def get_arch(name: str) -> ArchSpec:
    if name not in ARCHS:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {sorted(ARCHS)}")
    return ARCHS[name]


def _resample(features: int, kernel: int, stride: int, transposed: bool, dtype: Dtype, name: str) -> nn.Module:
    if transposed and stride == 2:
        return ConvTranspose2x2(features, dtype=dtype, name=name)
    return Conv(features, kernel, stride, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """torchvision BasicBlock (expansion 1)."""

    planes: int
    stride: int = 1
    shortcut: bool = False
    transposed: bool = False
    train: bool = False
    dtype: Dtype = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        bn = lambda name: functools.partial(BatchNorm(not self.train, dtype=self.dtype, name=name), valid=valid)  # noqa: E731
        out = _resample(self.planes, 3, self.stride, self.transposed, self.dtype, "conv1")(x)
        out = nn.relu(bn("bn1")(out))
        out = bn("bn2")(Conv(self.planes, 3, dtype=self.dtype, name="conv2")(out))
        identity = x
        if self.shortcut:
            prefix = "upsample" if self.transposed else "downsample"
            identity = _resample(self.planes, 1, self.stride, self.transposed, self.dtype, f"{prefix}_0")(x)
            identity = bn(f"{prefix}_1")(identity)
        return nn.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision Bottleneck, v1.5: the stride sits in the 3x3 convolution."""

    planes: int
    stride: int = 1
    shortcut: bool = False
    transposed: bool = False
    base_width: int = 64
    train: bool = False
    dtype: Dtype = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        bn = lambda name: functools.partial(BatchNorm(not self.train, dtype=self.dtype, name=name), valid=valid)  # noqa: E731
        width = int(self.planes * (self.base_width / 64.0))
        out = nn.relu(bn("bn1")(Conv(width, 1, dtype=self.dtype, name="conv1")(x)))
        out = _resample(width, 3, self.stride, self.transposed, self.dtype, "conv2")(out)
        out = nn.relu(bn("bn2")(out))
        out = bn("bn3")(Conv(self.planes * 4, 1, dtype=self.dtype, name="conv3")(out))
        identity = x
        if self.shortcut:
            prefix = "upsample" if self.transposed else "downsample"
            identity = _resample(self.planes * 4, 1, self.stride, self.transposed, self.dtype, f"{prefix}_0")(x)
            identity = bn(f"{prefix}_1")(identity)
        return nn.relu(out + identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def run_layer(
    x: jax.Array,
    spec: ArchSpec,
    name: str,
    planes: int,
    num_blocks: int,
    stride: int,
    *,
    train: bool,
    dtype: Dtype,
    transposed: bool = False,
    valid: jax.Array | None = None,
) -> jax.Array:
    """torchvision's _make_layer, applied: a projection shortcut on the first block
    when the stride or the channel count changes. Must be called inside a compact module.
    ``valid``: the rows that count in train-mode BatchNorm (rdjax.models.layers)."""
    block: Any = BLOCKS[spec.block]
    out_channels = planes * block.expansion
    width = {} if spec.block == "basic" else {"base_width": spec.base_width}
    for i in range(num_blocks):
        first = i == 0
        x = block(
            planes,
            stride=stride if first else 1,
            shortcut=first and (stride != 1 or x.shape[-1] != out_channels),
            transposed=transposed,
            **width,
            train=train,
            dtype=dtype,
            name=f"{name}_{i}",
        )(x, valid)
    return x


class Teacher(nn.Module):
    """The frozen encoder: torchvision ResNet up to layer3, BatchNorm on running stats."""

    spec: ArchSpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        x = Conv(64, 7, 2, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(BatchNorm(True, dtype=self.dtype, name="bn1")(x))
        x = max_pool_3x3_s2(x)
        feats = []
        for i, (planes, stride) in enumerate(zip((64, 128, 256), (1, 2, 2))):
            x = run_layer(
                x, self.spec, f"layer{i + 1}", planes, self.spec.layers[i], stride, train=False, dtype=self.dtype
            )
            feats.append(x)
        return tuple(feats)


def check_image_size(shape: Sequence[int]) -> None:
    """Reject sizes the encoder-decoder cannot round-trip: down 32x, then up 8x."""
    if len(shape) != 4 or shape[-1] != 3:
        raise ConfigError(f"expected images of shape (batch, height, width, 3), got {tuple(shape)}")
    h, w = shape[1], shape[2]
    if h % 32 or w % 32:
        raise ConfigError(f"image size {h}x{w} is not a multiple of 32 in both height and width (e.g. 256x256)")


# ----------------------------------------------------------------------------- port rules


def _ignore_teacher(key: str) -> bool:
    """torchvision keys the teacher does not use: the classifier, layer4, BN counters."""
    return key.startswith(("fc.", "layer4.")) or key.endswith("num_batches_tracked")


def convert_teacher(
    arch: str, state_dict: weights.StateDict, teacher_shapes: weights.Variables, source: str = "state dict"
) -> weights.Variables:
    """torchvision (or timm, same names) ImageNet weights -> teacher {'params', 'batch_stats'}."""
    try:
        return weights.convert(state_dict, teacher_shapes, ignore=_ignore_teacher, source=source)
    except PortError as e:
        raise PortError(f"{e} -- is this a {arch} teacher file?") from None
