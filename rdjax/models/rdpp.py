"""RD++ ("Revisiting Reverse Distillation", Tien et al., CVPR 2023), registered as model
'rdpp': RD4AD's teacher, OCBE and decoder with a multi-projection layer (MPL) between
the teacher and the OCBE, trained with RD4AD's loss plus a projection loss on a
simplex-noised copy of each image.

Variables follow RD4AD's split: teacher_vars apart, and
  student_vars = {'params': {'proj', 'ocbe', 'decoder'}, 'batch_stats': {'ocbe', 'decoder'}}
(the MPL has convolution biases and instance norms without running statistics).
Each fact below is the official code's (utils/utils_train.py, dataset/dataset.py, main.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rdjax import modes
from rdjax.errors import ConfigError, PortError
from rdjax.models import ModelType
from rdjax.models.layers import Conv, Dtype, torch_default_init
from rdjax.models.lowering import at_least_float32
from rdjax.models.rd4ad import (
    OCBE,
    RD4AD,
    Decoder,
    Features,
    Variables,
    batch_mean,
    cosine_distance_loss,
    official_parts,
)
from rdjax.models.resnet import ArchSpec
from rdjax.models.sinkhorn import sinkhorn_divergence
from rdjax.runtime import weights

# Projection loss: (SSOT + 0.01 reconstruction + 0.1 contrast) / 1.11, weighted 0.2 in the total.
RECONSTRUCT_WEIGHT, CONTRAST_WEIGHT, PROJ_NORMALIZER, PROJ_WEIGHT = 0.01, 0.1, 1.11, 0.2
CONTRAST_MARGIN = 0.5
# Noise: 3-D simplex octaves (6 octaves, persistence 0.6, first frequency 32) times 0.2, on a
# rectangle of 10 .. size/8 - 1 pixels per side, added to the [0, 1] image before the
# ImageNet normalization.
NOISE_OCTAVES, NOISE_PERSISTENCE, NOISE_FREQUENCY, NOISE_AMPLITUDE, NOISE_MIN = 6, 0.6, 32.0, 0.2, 10
NOISE_SEED = 0  # the official code draws its seed from np.random after seeding it (111), per dataset


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """PyTorch's InstanceNorm2d defaults: per image and channel over H, W, biased variance,
    no affine, no running statistics (so train and eval modes agree); float32 statistics."""
    x32 = at_least_float32(x)
    mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class ProjLayer(nn.Module):
    """c -> c/2 -> c/4 -> c/2 -> c: four 3x3 convolutions (bias, PyTorch's default init), each
    followed by InstanceNorm and LeakyReLU(0.01). Named as the official nn.Sequential."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.channels
        for index, out in zip((0, 3, 6, 9), (c // 2, c // 4, c // 2, c)):
            x = Conv(out, 3, 1, self.dtype, use_bias=True, kernel_init=torch_default_init, name=f"proj_{index}")(x)
            x = nn.leaky_relu(instance_norm(x), 0.01)
        return x


class MPL(nn.Module):
    """One ProjLayer per teacher scale. The official MultiProjectionLayer(base) builds
    base*4, base*8, base*16 channels, base = 64 for WRN-50-2; rdjax takes the channels from
    the teacher itself, which is base = (layer1 channels) / 4: 64 for the bottleneck
    ResNets (ResNet-50, WRN-50-2, WRN-101-2) and 16 for ResNet-18/34."""

    spec: ArchSpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: Features) -> Features:
        return tuple(
            ProjLayer(c, self.dtype, name=name)(f)
            for name, c, f in zip(("proj_a", "proj_b", "proj_c"), self.spec.feature_channels, feats)
        )


class Student(nn.Module):
    """MPL -> OCBE -> decoder: everything that trains."""

    spec: ArchSpec
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.proj = MPL(self.spec, self.dtype)
        self.ocbe = OCBE(self.spec, self.dtype)
        self.decoder = Decoder(self.spec, self.dtype)

    def __call__(self, teacher_feats: Features, train: bool, valid: jax.Array | None = None) -> Features:
        return self.decoder(self.ocbe(self.proj(teacher_feats), train, valid), train, valid)

    def training(
        self, clean: Features, noised: Features, valid: jax.Array | None = None
    ) -> tuple[Features, Features, Features]:
        """(projected noised, projected clean, student features of the projected clean);
        BatchNorm's statistics from the ``valid`` rows (the MPL's instance norms are per row)."""
        projected = self.proj(clean)
        return self.proj(noised), projected, self.decoder(self.ocbe(projected, True, valid), True, valid)


def _flat(x: jax.Array) -> jax.Array:
    return at_least_float32(x.reshape(x.shape[0], -1))


def cosine_reconstruction(
    a: jax.Array, b: jax.Array, eps: float = 1e-8, *, valid: jax.Array | None = None
) -> jax.Array:
    """mean(1 - CosineSimilarity(dim=1)(a, b)) on NCHW tensors: per pixel, over channels;
    the mean over the ``valid`` rows' pixels (every row has as many)."""
    a, b = at_least_float32(a), at_least_float32(b)
    dot = jnp.sum(a * b, axis=-1)
    norms = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1), eps * eps))
    return batch_mean(jnp.mean(1.0 - dot / norms, axis=(1, 2)), valid)


def contrast(
    a: jax.Array, b: jax.Array, margin: float = CONTRAST_MARGIN, eps: float = 1e-12, *, valid: jax.Array | None = None
) -> jax.Array:
    """CosineEmbeddingLoss(margin) with target -1 on the flattened images: mean over the
    ``valid`` rows of max(0, cos(a, b) - margin), with PyTorch's epsilon inside the norms."""
    a, b = _flat(a), _flat(b)
    cos = jnp.sum(a * b, axis=1) / jnp.sqrt((jnp.sum(a * a, axis=1) + eps) * (jnp.sum(b * b, axis=1) + eps))
    return batch_mean(jnp.maximum(cos - margin, 0.0), valid)


def ssot_permutation(key: jax.Array, valid: jax.Array) -> jax.Array:
    """The order SSOT pairs a batch with (the official torch.randperm over its rows): the
    valid rows first, in a uniformly random order, then the padding rows."""
    return jnp.argsort(jnp.where(valid > 0, jax.random.uniform(key, valid.shape), 2.0))


def projection_terms(
    noised: Features, projected_noised: Features, projected: Features, key: jax.Array, valid: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The official Revisit_RDLoss's three terms (SSOT, reconstruction, contrast), each summed
    over the three scales, over the ``valid`` rows (None: every row).

    SSOT pairs each scale's softmax-ed, flattened projections with the same batch in a
    random order. Uniform measures on the same points are the same measure, so this
    term is zero up to rounding, and so is its gradient (docs/differences.md); it is
    computed all the same, as the official code does."""
    valid = jnp.ones(projected[0].shape[0], jnp.float32) if valid is None else valid
    perm = ssot_permutation(key, valid)
    ssot = sum(
        sinkhorn_divergence(
            jax.nn.softmax(_flat(p), -1), jax.nn.softmax(_flat(p)[perm], -1), x_valid=valid, y_valid=valid[perm]
        )
        for p in projected
    )
    reconstruct = sum(cosine_reconstruction(n, p, valid=valid) for n, p in zip(projected_noised, projected))
    contrasts = sum(contrast(f, p, valid=valid) for f, p in zip(noised, projected))
    return ssot, reconstruct, contrasts  # type: ignore[return-value]  # sums of >= 1 arrays


def projection_loss(
    noised: Features, projected_noised: Features, projected: Features, key: jax.Array, valid: jax.Array | None = None
) -> jax.Array:
    """The official Revisit_RDLoss: (SSOT + 0.01 reconstruction + 0.1 contrast) / 1.11."""
    ssot, reconstruct, contrasts = projection_terms(noised, projected_noised, projected, key, valid)
    return (ssot + RECONSTRUCT_WEIGHT * reconstruct + CONTRAST_WEIGHT * contrasts) / PROJ_NORMALIZER


@functools.cache
def noise_field(side: int, seed: int = NOISE_SEED) -> np.ndarray:
    """(side, side, 3) float32 simplex octaves. The official rand_3d_octaves((3, h, w))
    samples the same lattice from the origin for every image (its generator is seeded once
    per dataset), so each image's noise is this field's top-left (h, w) corner."""
    import opensimplex

    gen = opensimplex.OpenSimplex(seed=seed)
    axis = np.arange(side, dtype=np.float64)
    field = np.zeros((3, side, side))
    amplitude, frequency = 1.0, NOISE_FREQUENCY
    for _ in range(NOISE_OCTAVES):
        field += amplitude * gen.noise3array(axis / frequency, axis / frequency, np.arange(3) / frequency)
        frequency /= 2
        amplitude *= NOISE_PERSISTENCE
    return np.ascontiguousarray(field.transpose(1, 2, 0), np.float32)


def add_noise(x: jax.Array, key: jax.Array) -> jax.Array:
    """[0, 1] images (B, S, S, 3) plus 0.2 x the noise field's (h, w) corner at a random place:
    h, w uniform in [10, S/8) (10 where S/8 <= 10, which the official code cannot run), the
    top-left corner uniform in [1, S - h) x [1, S - w)."""
    b, size = x.shape[0], x.shape[1]
    top = max(size // 8, NOISE_MIN + 1)  # below 88 px the official range is empty: 10 px rectangles
    field = jnp.asarray(noise_field(top - 1)) * NOISE_AMPLITUDE
    kh, kw, ky, kx = jax.random.split(key, 4)
    h = jax.random.randint(kh, (b,), NOISE_MIN, top)
    w = jax.random.randint(kw, (b,), NOISE_MIN, top)
    y0 = jax.random.randint(ky, (b,), 1, size - h)
    x0 = jax.random.randint(kx, (b,), 1, size - w)
    rows, cols = jnp.arange(size), jnp.arange(size)

    def one(img: jax.Array, h: jax.Array, w: jax.Array, y0: jax.Array, x0: jax.Array) -> jax.Array:
        dy, dx = rows - y0, cols - x0
        inside = ((dy >= 0) & (dy < h))[:, None] & ((dx >= 0) & (dx < w))[None, :]
        patch = field[jnp.clip(dy, 0, top - 2)][:, jnp.clip(dx, 0, top - 2)]
        return img + jnp.where(inside[..., None], patch, 0.0)

    return jax.vmap(one)(x, h, w, y0, x0)


@dataclasses.dataclass(frozen=True)
class RDPP(RD4AD):
    """RD4AD's assembly with the MPL inside the student; evaluation and maps are RD4AD's
    (the MPL sits in the inference path). Training needs the images in every step, for the
    noised branch. Its options (config.model) are the optimizer's."""

    proj_lr: float = 0.001  # the projection layers' Adam learning rate (OCBE and decoder: config.learning_rate)
    accumulation: int = 2  # how many batches' gradients make one optimizer step
    needs_images = True
    input_filter = modes.ResizeFilter.CV2_BILINEAR.value  # the official dataset's cv2.resize(image / 255.0)
    official_config = "rdpp_mvtec"
    rerun_options: ClassVar[tuple[str, ...]] = ("proj_lr",)
    training_options: ClassVar[tuple[str, ...]] = ("proj_lr", "accumulation")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.accumulation < 1 or self.proj_lr <= 0:
            raise ConfigError(
                f"config.model.accumulation={self.accumulation} must be >= 1 and "
                f"config.model.proj_lr={self.proj_lr} > 0"
            )

    @property
    def student(self) -> Student:  # type: ignore[override]  # RD4AD's student plus the MPL
        return Student(self.spec, jnp.dtype(self.dtype))

    def train_inputs(
        self, teacher_vars: Variables, x: jax.Array, key: jax.Array, normalize: Callable[[jax.Array], jax.Array]
    ) -> tuple[Features, Features]:
        """[0, 1] images -> (teacher features of the images, of their noised copies); the
        noise is added before the normalization, as the official dataset does."""
        noised = add_noise(x, key)
        return (
            self.teacher_features(teacher_vars, normalize(x)),
            self.teacher_features(teacher_vars, normalize(noised)),
        )

    def train_loss(
        self,
        student_vars: Variables,
        inputs: tuple[Features, Features],
        key: jax.Array,
        valid: jax.Array | None = None,
        step: jax.Array | None = None,
    ) -> tuple[jax.Array, Variables]:
        """L_distill + 0.2 L_proj over the ``valid`` rows, and the updated batch_stats."""
        clean, noised = inputs
        (proj_noised, proj_clean, student), updates = self.student.apply(
            student_vars, clean, noised, valid, method=Student.training, mutable=["batch_stats"]
        )
        proj_noised = tuple(at_least_float32(p) for p in proj_noised)
        proj_clean = tuple(at_least_float32(p) for p in proj_clean)
        student = tuple(at_least_float32(s) for s in student)
        distill = cosine_distance_loss(clean, student, valid=valid)
        proj = projection_loss(noised, proj_noised, proj_clean, key, valid)
        return distill + PROJ_WEIGHT * proj, updates["batch_stats"]

    def optimizer(self, config: Any, total_steps: int = 0) -> optax.GradientTransformation:
        """Two Adams (betas config.adam_b1, adam_b2): the MPL at ``proj_lr``, OCBE and
        decoder at config.learning_rate, stepping every ``accumulation`` batches on
        the *sum* of their gradients, as the official loop does. The sum is kept in float64
        where jax_enable_x64 allows it (the reference checks), else in float32."""
        k = int(self.accumulation)
        adam = lambda lr: optax.adam(lr, b1=config.adam_b1, b2=config.adam_b2)  # noqa: E731
        both = optax.multi_transform(
            {"proj": adam(self.proj_lr), "distill": adam(config.learning_rate)},
            lambda params: {
                name: jax.tree.map(lambda _, label="proj" if name == "proj" else "distill": label, tree)
                for name, tree in params.items()
            },
        )
        return optax.MultiSteps(both, every_k_schedule=k, use_grad_mean=False, accumulator_dtype=jnp.float64)

    def port_official(self, state_dict: weights.StateDict, source: str = "checkpoint") -> Variables:
        """Official RD++ checkpoint {'proj', 'bn', 'decoder'} -> student {'params', 'batch_stats'}."""
        shapes = self.abstract_variables()[1]
        unknown = sorted(k for k in state_dict if not k.startswith(("proj.", "bn.", "decoder.")))
        if unknown:
            raise PortError(
                f"{source}: not an official RD++ checkpoint: key {unknown[0]!r} is outside 'proj', 'bn' and 'decoder'"
            )
        try:
            proj = weights.convert(state_dict, {"params": shapes["params"]["proj"]}, prefix="proj.", source=source)
        except PortError as e:
            raise PortError(f"{e} -- is this a {self.arch} RD++ checkpoint?") from None
        parts = official_parts(self, state_dict, shapes, source, "RD++")
        return {"params": {"proj": proj["params"], **parts["params"]}, "batch_stats": parts["batch_stats"]}


MODEL: ModelType = RDPP
