"""Dinomaly ("The Less Is More Philosophy in Multi-Class Unsupervised Anomaly Detection",
Guo et al., CVPR 2025), registered as model 'dinomaly': a frozen DINOv2 encoder, a noisy
MLP bottleneck, and a decoder of eight linear-attention ViT blocks that rebuilds the
encoder's middle layers in two loose groups.

Variables:
  teacher_vars = {'params'} of the DINOv2 ViT (rdjax.models.vit), blocks up to the last target;
  student_vars = {'params': {'bottleneck_0', 'decoder_0'..'decoder_7'}, 'batch_stats': {}}
(no BatchNorm: the empty collection keeps the model contract's shape).

Each fact below is the official code's (guojiajeremy/Dinomaly: models/uad.py ViTill,
models/vision_transformer.py bMlp, Block and LinearAttention2, utils.py
global_cosine_hm_percent and WarmCosineScheduler, optimizers/StableAdamW.py, and the
dinomaly_*.py scripts).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rdjax import modes
from rdjax.errors import ConfigError, PortError
from rdjax.models import MapRecipe, ModelType, check_dtype
from rdjax.models.blocks import Block, Linear, merge_heads, split_heads
from rdjax.models.layers import Dtype
from rdjax.models.lowering import at_least_float32
from rdjax.models.optim import schedule_fn, stable_adamw, torch_clip_by_global_norm, warm_cosine_schedule
from rdjax.models.rd4ad import cosine_distance_loss
from rdjax.models.vit import HUB_URL, VIT_ARCHS, ViT, ViTSpec, check_image_size, convert_vit, get_vit
from rdjax.pytrees import Features, Variables
from rdjax.runtime import weights

DROPOUT = 0.2  # bMlp(drop=0.2): the "noisy bottleneck"
DECODER_DEPTH = 8
DECODER_NORM_EPS = 1e-8
GROUPS = ((0, 1, 2, 3), (4, 5, 6, 7))  # fuse_layer_encoder = fuse_layer_decoder: the loose reconstruction
# Hard mining: the gradient of points whose distance is below the (1 - p) quantile is
# multiplied by HARD_FACTOR; p = min(HARD_P * it / HARD_RAMP, HARD_P).
HARD_FACTOR, HARD_P, HARD_RAMP = 0.1, 0.9, 1000


def targets(spec: ViTSpec) -> tuple[int, ...]:
    """The encoder blocks the decoder rebuilds: 2..9 for ViT-S/B, 4, 6, .., 18 for ViT-L."""
    return tuple(range(4, 19, 2)) if spec.depth == 24 else tuple(range(2, 10))


def trunc_normal_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """The official init of every Linear weight: trunc_normal_(std=0.01, a=-0.03, b=0.03)."""
    return 0.01 * jax.random.truncated_normal(key, -3.0, 3.0, shape, dtype)


class LinearAttention2(nn.Module):
    """Linear attention with ELU + 1 feature maps and no softmax, scale or epsilon:
    out_s = sum_d q_sd kv_de / (q_s . sum_s' k_s'), kv = k^T v, over every token."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        q, k, v = split_heads(Linear(3 * dim, self.dtype, kernel_init=trunc_normal_init, name="qkv")(x), self.heads)
        q, k, v = at_least_float32(q), at_least_float32(k), at_least_float32(v)
        q, k = jax.nn.elu(q) + 1.0, jax.nn.elu(k) + 1.0
        hp = jax.lax.Precision.HIGHEST
        kv = jnp.einsum("bhsd,bhse->bhde", k, v, precision=hp)
        z = 1.0 / jnp.einsum("bhsd,bhd->bhs", q, jnp.sum(k, axis=-2), precision=hp)
        out = jnp.einsum("bhsd,bhde->bhse", q, kv, precision=hp) * z[..., None]
        return Linear(dim, self.dtype, kernel_init=trunc_normal_init, name="proj")(merge_heads(out.astype(self.dtype)))


class DropoutMasks(NamedTuple):
    """The bottleneck's three dropout masks (1 keeps, 0 drops): on its input, after GELU,
    and on its output. Explicit, so a reference implementation can be given the same."""

    inputs: jax.Array
    hidden: jax.Array
    outputs: jax.Array


def dropout_masks(key: jax.Array, tokens: tuple[int, int, int], rate: float = DROPOUT) -> DropoutMasks:
    """The masks for token sequences of shape ``tokens`` (B, N, D), a function of ``key``
    alone: the same on any device count, and in float64 runs (uniforms drawn in float32)."""
    b, n, d = tokens
    ki, kh, ko = jax.random.split(key, 3)
    keep = lambda k, shape: jax.random.uniform(k, shape, jnp.float32) < 1.0 - rate  # noqa: E731  # any x64 mode
    return DropoutMasks(keep(ki, (b, n, d)), keep(kh, (b, n, 4 * d)), keep(ko, (b, n, d)))


def _drop(x: jax.Array, mask: jax.Array | None, rate: float) -> jax.Array:
    """torch.nn.Dropout in train mode (kept values scaled by 1 / (1 - rate)); identity without a mask."""
    if mask is None:
        return x
    return jnp.where(mask, x / (1.0 - rate), 0).astype(x.dtype)


class Bottleneck(nn.Module):
    """bMlp(C, 4C, C, drop): dropout -> fc1 -> GELU -> dropout -> fc2 -> dropout."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, masks: DropoutMasks | None) -> jax.Array:
        dim = x.shape[-1]
        x = _drop(x, None if masks is None else masks.inputs, DROPOUT)
        x = Linear(4 * dim, self.dtype, kernel_init=trunc_normal_init, name="fc1")(x)
        x = nn.gelu(at_least_float32(x), approximate=False).astype(self.dtype)
        x = _drop(x, None if masks is None else masks.hidden, DROPOUT)
        x = Linear(dim, self.dtype, kernel_init=trunc_normal_init, name="fc2")(x)
        return _drop(x, None if masks is None else masks.outputs, DROPOUT)


def fuse(tokens: list[jax.Array] | tuple[jax.Array, ...]) -> jax.Array:
    """fuse_feature: the mean of a list of token sequences."""
    return sum(tokens[1:], tokens[0]) / len(tokens)


class Student(nn.Module):
    """Encoder groups' tokens -> the decoder's group tokens (prefix tokens kept): the
    bottleneck on the mean of every target layer, eight decoder blocks, their outputs
    reversed and averaged in the encoder's groups."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, encoder_groups: Features, masks: DropoutMasks | None = None) -> Features:
        x = fuse(encoder_groups)  # the groups are equal-sized, so this is the mean of all targets
        x = Bottleneck(self.dtype, name="bottleneck_0")(x, masks)
        outs = []
        block = functools.partial(Block, self.heads, LinearAttention2, DECODER_NORM_EPS, layer_scale=False)
        for i in range(DECODER_DEPTH):
            x = block(kernel_init=trunc_normal_init, dtype=self.dtype, name=f"decoder_{i}")(x)
            outs.append(x)
        outs = outs[::-1]
        return tuple(at_least_float32(fuse([outs[i] for i in group])) for group in GROUPS)


def to_grid(tokens: jax.Array, prefix: int) -> jax.Array:
    """(B, prefix + h*w, D) -> (B, h, w, D): the class and register tokens dropped, the
    patches in their row-major order. Inputs are square (the ViT's check_image_size)."""
    b, n, d = tokens.shape
    side = int(round((n - prefix) ** 0.5))
    return tokens[:, prefix:].reshape(b, side, side, d)


@jax.custom_vjp
def scale_gradient(x: jax.Array, scale: jax.Array) -> jax.Array:
    """x unchanged; its gradient multiplied by ``scale`` (the official modify_grad hook)."""
    return x


def _scale_fwd(x: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x, scale


def _scale_bwd(scale: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    return (g * scale).astype(g.dtype), jnp.zeros_like(scale)


scale_gradient.defvjp(_scale_fwd, _scale_bwd)


@functools.cache
def hard_counts(points: int, rows: int) -> np.ndarray:
    """(HARD_RAMP + 1, rows + 1) int32: the official k = int(numel * (1 - p)) at iteration
    it (capped at HARD_RAMP, where p stops growing) for a batch of n valid rows of
    ``points`` points each, computed in Python's float64 as the official code does, so
    that k is the same integer even where numel * (1 - p) lies next to one."""
    table = np.zeros((HARD_RAMP + 1, rows + 1), np.int32)
    for it in range(HARD_RAMP + 1):
        p = min(HARD_P * it / HARD_RAMP, HARD_P)
        for n in range(rows + 1):
            table[it, n] = int(n * points * (1 - p))
    return table


def point_distance(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """1 - cos over channels per point of NHWC maps, (B, H, W)."""
    a, b = at_least_float32(a), at_least_float32(b)
    dot = jnp.sum(a * b, axis=-1)
    return 1.0 - dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), eps)


def hard_mining_loss(
    encoder: Features, decoder: Features, step: jax.Array, valid: jax.Array | None = None
) -> jax.Array:
    """global_cosine_hm_percent(p, factor=0.1): per group, the mean over the rows of 1 - cos
    of the flattened maps (RD4AD's loss), averaged over the groups. Its value is that
    loss; its gradient at every point whose distance is below the batch's k-th largest
    (k = int(numel (1 - p)), one threshold over every valid point of the batch) is
    multiplied by 0.1, so the hard points drive training."""
    b, h, w, _ = decoder[0].shape
    valid = jnp.ones((b,), jnp.float32) if valid is None else valid
    rows = jnp.sum(valid > 0)
    k = jnp.asarray(hard_counts(h * w, b))[jnp.minimum(step, HARD_RAMP), rows]
    total = jnp.zeros((), jnp.float32)
    for e, d in zip(encoder, decoder):
        e = jax.lax.stop_gradient(e)
        dist = jax.lax.stop_gradient(point_distance(e, d))
        ranked = jnp.sort(jnp.where(valid[:, None, None] > 0, dist, -jnp.inf).ravel())[::-1]
        thresh = ranked[jnp.maximum(k, 1) - 1]
        scale = jnp.where(dist < thresh, HARD_FACTOR, 1.0).astype(d.dtype)[..., None]
        total = total + cosine_distance_loss((e,), (scale_gradient(d, scale),), valid=valid)
    return total / len(encoder)


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class Dinomaly:
    """Assembles the DINOv2 encoder, bottleneck and decoder; pure functions of explicit
    variables. ``arch`` names the encoder (rdjax.models.vit.VIT_ARCHS)."""

    arch: str = "dinov2_vitb14_reg4"
    dtype: str = "float32"
    # Options (config.model): StableAdamW (amsgrad, betas config.adam_b1/adam_b2) with
    # decoupled weight decay, on a schedule warming up linearly from 0 to
    # config.learning_rate over warmup_steps, then a cosine down to final_lr at the run's
    # last step; the gradients' global norm is clipped to clip first.
    final_lr: float = 2e-4
    warmup_steps: int = 100
    eps: float = 1e-10
    weight_decay: float = 1e-4
    clip: float = 0.1
    needs_images = False  # the encoder's features can come from the cache; the dropout draws from the step's key
    input_filter = modes.ResizeFilter.PIL_BILINEAR.value  # the official torchvision Resize on PIL images
    official_config = "dinomaly_mvtec"
    archs = tuple(VIT_ARCHS)
    # The official evaluation: the mean of the groups' 1 - cos, resized to 256, blurred by a
    # 5 x 5 Gaussian (sigma 4); the image score the mean of the map's top 1 %.
    map_recipe = MapRecipe(mode="mean", blur_sigma=4.0, blur_kernel=5, size=256, max_ratio=0.01)
    rerun_options: ClassVar[tuple[str, ...]] = ("final_lr", "warmup_steps")
    training_options: ClassVar[tuple[str, ...]] = ("final_lr", "warmup_steps")

    def __post_init__(self) -> None:
        get_vit(self.arch)
        check_dtype(self.dtype)
        if self.warmup_steps < 0 or min(self.final_lr, self.eps, self.clip) <= 0 or self.weight_decay < 0:
            raise ConfigError(
                "config.model: warmup_steps and weight_decay must be >= 0, final_lr, eps and clip > 0 "
                f"(got {self.warmup_steps}, {self.weight_decay}, {self.final_lr}, {self.eps}, {self.clip})"
            )

    @property
    def spec(self) -> ViTSpec:
        return VIT_ARCHS[self.arch]

    @property
    def imagenet_file(self) -> str | None:
        """DINOv2's hub checkpoint (a full address), or None for the random demo encoder."""
        file = self.spec.hub_file
        return None if file is None else HUB_URL + file

    @property
    def targets(self) -> tuple[int, ...]:
        return targets(self.spec)

    @property
    def encoder(self) -> ViT:
        return ViT(self.spec, self.targets[-1] + 1, jnp.dtype(self.dtype))

    @property
    def student(self) -> Student:
        return Student(self.spec.heads, jnp.dtype(self.dtype))

    def check_image_size(self, image_size: int) -> None:
        check_image_size(image_size)

    def init(self, rng: jax.Array, image_size: int = 392) -> tuple[Variables, Variables]:
        check_image_size(image_size)
        t_rng, s_rng = jax.random.split(rng)
        x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        teacher_vars = dict(self.encoder.init(t_rng, x))
        student_vars = dict(self.student.init(s_rng, self.teacher_features(teacher_vars, x)))
        return teacher_vars, {"params": student_vars["params"], "batch_stats": {}}

    def abstract_variables(self) -> tuple[Variables, Variables]:
        return jax.eval_shape(lambda: self.init(jax.random.key(0), 28))

    def teacher_features(self, teacher_vars: Variables, images: jax.Array) -> Features:
        """Normalized images -> the encoder's two group means (B, prefix + h*w, D), float32,
        the tokens the student reads (their mean is the bottleneck's input) and rebuilds."""
        outs: list[jax.Array] = self.encoder.apply(jax.lax.stop_gradient(teacher_vars), images)  # type: ignore[assignment]
        layers = [outs[i] for i in self.targets]
        return tuple(jax.lax.stop_gradient(at_least_float32(fuse([layers[i] for i in g]))) for g in GROUPS)

    def student_features(
        self,
        student_vars: Variables,
        teacher_feats: Features,
        train: bool,
        valid: jax.Array | None = None,
        masks: DropoutMasks | None = None,
    ) -> tuple[Features, Variables]:
        """The decoder's group tokens (float32); dropout only where ``masks`` are given."""
        feats = self.student.apply({"params": student_vars["params"]}, teacher_feats, masks)
        return feats, student_vars["batch_stats"]  # type: ignore[return-value]  # a tuple of arrays

    def __call__(
        self, teacher_vars: Variables, student_vars: Variables, images: jax.Array, train: bool = False
    ) -> tuple[Features, Features]:
        """(encoder groups, decoder groups) as NHWC grids of the patches: the pairs a map compares."""
        t = self.teacher_features(teacher_vars, images)
        s, _ = self.student_features(student_vars, t, train)
        prefix = self.spec.prefix
        return tuple(to_grid(f, prefix) for f in t), tuple(to_grid(f, prefix) for f in s)

    def train_inputs(
        self, teacher_vars: Variables, x: jax.Array, key: jax.Array, normalize: Callable[[jax.Array], jax.Array]
    ) -> Any:
        return tuple(f.astype(self.dtype) for f in self.teacher_features(teacher_vars, normalize(x)))

    def train_loss(
        self,
        student_vars: Variables,
        teacher_feats: Any,
        key: jax.Array,
        valid: jax.Array | None = None,
        step: jax.Array | None = None,
    ) -> tuple[jax.Array, Variables]:
        """The hard-mining loss at iteration ``step`` over the ``valid`` rows, the
        bottleneck's dropout drawn from ``key``."""
        teacher_feats = tuple(at_least_float32(f) for f in teacher_feats)
        masks = dropout_masks(key, teacher_feats[0].shape)
        s, batch_stats = self.student_features(student_vars, teacher_feats, True, valid, masks)
        prefix = self.spec.prefix
        step = jnp.zeros((), jnp.int32) if step is None else step
        loss = hard_mining_loss(
            tuple(to_grid(f, prefix) for f in teacher_feats), tuple(to_grid(f, prefix) for f in s), step, valid
        )
        return loss, batch_stats

    def optimizer(self, config: Any, total_steps: int = 0) -> optax.GradientTransformation:
        """Gradient clipping at ``clip``, then StableAdamW (amsgrad; betas config.adam_b1,
        adam_b2; ``eps`` and ``weight_decay``) on the warm-cosine schedule from
        config.learning_rate to ``final_lr`` over the run's ``total_steps`` (the official
        total_iters)."""
        warmup = int(self.warmup_steps)
        total = max(int(total_steps), warmup + 1)  # a port's optimizer is only a shape: any length will do
        table = warm_cosine_schedule(config.learning_rate, self.final_lr, total, warmup)
        return optax.chain(
            torch_clip_by_global_norm(self.clip),
            stable_adamw(
                schedule_fn(table, self.final_lr),
                b1=config.adam_b1,
                b2=config.adam_b2,
                eps=self.eps,
                weight_decay=self.weight_decay,
            ),
        )

    def port_teacher(self, state_dict: weights.StateDict, source: str = "state dict") -> Variables:
        """A DINOv2 hub checkpoint or timm state dict -> the encoder's variables (strict)."""
        return convert_vit(state_dict, self.spec, self.abstract_variables()[0], self.targets[-1] + 1, source)

    def port_official(self, state_dict: weights.StateDict, source: str = "checkpoint") -> Variables:
        """A ViTill state dict's 'bottleneck.*' and 'decoder.*' -> student_vars (strict; its
        'encoder.*' is the teacher's, `port_teacher` with the prefix removed)."""
        unknown = sorted(k for k in state_dict if not k.startswith(("bottleneck.", "decoder.", "encoder.")))
        if unknown:
            raise PortError(f"{source}: not a Dinomaly (ViTill) state dict: key {unknown[0]!r}")
        target = {"params": self.abstract_variables()[1]["params"]}
        try:
            params = weights.convert(state_dict, target, ignore=lambda k: k.startswith("encoder."), source=source)
        except PortError as e:
            raise PortError(f"{e} -- is this a {self.arch} Dinomaly checkpoint?") from None
        return {"params": params["params"], "batch_stats": {}}

    def official_teacher(self, state_dict: weights.StateDict, source: str = "checkpoint") -> Variables | None:
        """The encoder a ViTill state dict holds ('encoder.*', DINOv2's names), or None."""
        encoder = {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}
        return self.port_teacher(encoder, source=f"{source} (its encoder)") if encoder else None


MODEL: ModelType = Dinomaly
