"""RD4AD, registered as model 'rd4ad': frozen teacher -> one-class bottleneck (OCBE) ->
student decoder, its loss, and its port rules for the official checkpoints.

Variables are two explicit pytrees:
  teacher_vars = {'params', 'batch_stats'} of the frozen encoder, never differentiated;
  student_vars = {'params': {'ocbe', 'decoder'}, 'batch_stats': {...}}, the only trainable ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rdjax import modes
from rdjax.errors import PortError
from rdjax.models import MapRecipe, ModelType, check_dtype
from rdjax.models.layers import BatchNorm, Conv, Dtype
from rdjax.models.lowering import at_least_float32
from rdjax.models.resnet import (
    ARCHS,
    IMAGENET_FILES,
    ArchSpec,
    Teacher,
    check_image_size,
    convert_teacher,
    get_arch,
    run_layer,
)
from rdjax.pytrees import Features, Variables
from rdjax.runtime import weights


class OCBE(nn.Module):
    """One-class bottleneck embedding (official BN_layer): multi-scale fusion + embedding.

    The official module also defines conv4/bn4, which its forward never uses; they are
    not built here, and the port drops them.
    """

    spec: ArchSpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: Features, train: bool, valid: jax.Array | None = None) -> jax.Array:
        a, b, c = feats
        e = self.spec.expansion

        def conv_bn_relu(x: jax.Array, features: int, i: int) -> jax.Array:
            x = Conv(features, 3, 2, dtype=self.dtype, name=f"conv{i}")(x)
            return nn.relu(BatchNorm(not train, dtype=self.dtype, name=f"bn{i}")(x, valid))

        a = conv_bn_relu(conv_bn_relu(a, 128 * e, 1), 256 * e, 2)
        b = conv_bn_relu(b, 256 * e, 3)
        x = jnp.concatenate([a.astype(self.dtype), b.astype(self.dtype), c.astype(self.dtype)], axis=-1)
        blocks = self.spec.ocbe_blocks
        return run_layer(x, self.spec, "bn_layer", 512, blocks, 2, train=train, dtype=self.dtype, valid=valid)


class Decoder(nn.Module):
    """The student: three stages from the bottleneck code back to the teacher's scales,
    each upsampling 2x. As in the official de_resnet.py, stage i has as many blocks as the
    teacher's layer i (so WRN-50-2's decoder runs 3, 4, 6 blocks from coarse to fine)."""

    spec: ArchSpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, valid: jax.Array | None = None) -> Features:
        outs = []
        for i, planes in enumerate((256, 128, 64)):
            x = run_layer(
                x,
                self.spec,
                f"layer{i + 1}",
                planes,
                self.spec.layers[i],
                2,
                train=train,
                dtype=self.dtype,
                transposed=True,
                valid=valid,
            )
            outs.append(x)
        # Decoder layer3 (largest) pairs with teacher layer1, and so on.
        return tuple(reversed(outs))


class Student(nn.Module):
    """OCBE + decoder: everything that trains."""

    spec: ArchSpec
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.ocbe = OCBE(self.spec, self.dtype)
        self.decoder = Decoder(self.spec, self.dtype)

    def __call__(self, teacher_feats: Features, train: bool, valid: jax.Array | None = None) -> Features:
        return self.decoder(self.ocbe(teacher_feats, train, valid), train, valid)


def batch_mean(values: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """The mean of per-sample ``values`` (N,) over the rows that count (``valid``, 1 and 0;
    None: every row): a padded partial batch averages as its valid rows alone would."""
    if valid is None:
        return jnp.mean(values)
    keep = valid > 0  # where, not a product: a padding row's inf or NaN stays out
    return jnp.sum(jnp.where(keep, values, 0)) / jnp.maximum(jnp.sum(keep), 1).astype(values.dtype)


def cosine_distance_loss(
    teacher: Features, student: Features, eps: float = 1e-8, *, valid: jax.Array | None = None
) -> jax.Array:
    """Official loss: per sample, 1 - cos between the *flattened* (H*W*C) feature maps,
    averaged over the batch (its ``valid`` rows) and summed over the three scales.

    The paper's text describes a per-pixel loss; the code's flattened one is what
    produced the published numbers (see docs/differences.md), so rdjax uses it.
    """
    total = jnp.zeros((), jnp.float32)
    for t, s in zip(teacher, student):
        t = at_least_float32(t.reshape(t.shape[0], -1))
        s = at_least_float32(s.reshape(s.shape[0], -1))
        dot = jnp.sum(t * s, axis=1)
        norm = jnp.linalg.norm(t, axis=1) * jnp.linalg.norm(s, axis=1)
        total = total + batch_mean(1.0 - dot / jnp.maximum(norm, eps), valid)
    return total


def _ignore_ocbe(key: str) -> bool:
    """The official BN_layer's unused conv4/bn4, BN counters, and the 'memory' keys its test code drops."""
    return key.startswith(("conv4.", "bn4.")) or key.endswith("num_batches_tracked") or "memory" in key


def _ignore_decoder(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def official_parts(
    model: RD4AD, state_dict: weights.StateDict, student_shapes: Variables, source: str, name: str
) -> Variables:
    """The official 'bn' (OCBE) and 'decoder' entries -> {'params', 'batch_stats'} of
    {'ocbe', 'decoder'} (strict; RD4AD's and RD++'s checkpoints share them)."""
    parts = {}
    for part, prefix, ignore in (("ocbe", "bn.", _ignore_ocbe), ("decoder", "decoder.", _ignore_decoder)):
        target = {c: tree[part] for c, tree in student_shapes.items()}
        try:
            parts[part] = weights.convert(state_dict, target, prefix=prefix, ignore=ignore, source=source)
        except PortError as e:
            raise PortError(f"{e} -- is this a {model.arch} {name} checkpoint?") from None
    return {c: {part: parts[part][c] for part in parts} for c in student_shapes}


@dataclasses.dataclass(frozen=True)
class RD4AD:
    """Assembles teacher -> OCBE -> decoder; pure functions of explicit variables.

    ``dtype`` is the compute dtype of convolutions (float32 or bfloat16). Parameters,
    BatchNorm statistics and everything downstream of the features stay float32.
    'float64' (with jax_enable_x64 and float64 variables) is a reference precision for
    numerical checks, such as the device-count invariance test; configs do not offer it.
    """

    arch: str = "wide_resnet50_2"
    dtype: str = "float32"
    needs_images = False  # training can read the teacher's features from a cache (config.feature_cache)
    input_filter = modes.ResizeFilter.PIL_BILINEAR.value  # the official code's torchvision Resize on PIL images
    official_config = "mvtec"
    archs = tuple(ARCHS)
    # The official test code: the scales' maps added at the input's size, scipy's Gaussian
    # (sigma 4), the image score the map's maximum.
    map_recipe = MapRecipe(mode="add", blur_sigma=4.0, blur_kernel=0, size=0, max_ratio=0.0)
    rerun_options: ClassVar[tuple[str, ...]] = ()  # RD4AD has no options of its own
    training_options: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        get_arch(self.arch)
        check_dtype(self.dtype)

    @property
    def imagenet_file(self) -> str:
        return IMAGENET_FILES[self.arch]

    def check_image_size(self, image_size: int) -> None:
        check_image_size((1, image_size, image_size, 3))

    @property
    def spec(self) -> ArchSpec:
        return get_arch(self.arch)

    @property
    def teacher(self) -> Teacher:
        return Teacher(self.spec, jnp.dtype(self.dtype))

    @property
    def student(self) -> Student:
        return Student(self.spec, jnp.dtype(self.dtype))

    def init(self, rng: jax.Array, image_size: int = 256) -> tuple[Variables, Variables]:
        """Random (teacher_vars, student_vars) for a square input of ``image_size``."""
        t_rng, s_rng = jax.random.split(rng)
        x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        check_image_size(x.shape)
        teacher_vars = self.teacher.init(t_rng, x)
        feats = self.teacher.apply(teacher_vars, x)
        student_vars = self.student.init(s_rng, feats, train=False)
        return dict(teacher_vars), dict(student_vars)

    def teacher_features(self, teacher_vars: Variables, images: jax.Array) -> Features:
        """Teacher layer1-3 features in float32; constants as far as autodiff is concerned."""
        check_image_size(images.shape)
        feats: Features = self.teacher.apply(jax.lax.stop_gradient(teacher_vars), images)  # type: ignore[assignment]
        return tuple(jax.lax.stop_gradient(at_least_float32(f)) for f in feats)

    def student_features(
        self, student_vars: Variables, teacher_feats: Features, train: bool, valid: jax.Array | None = None
    ) -> tuple[Features, Variables]:
        """Student features (float32) and, in train mode, the batch_stats updated from the
        ``valid`` rows (None: every row)."""
        if train:
            feats, updates = self.student.apply(
                student_vars, teacher_feats, train=True, valid=valid, mutable=["batch_stats"]
            )
            batch_stats = updates["batch_stats"]
        else:
            feats = self.student.apply(student_vars, teacher_feats, train=False)
            batch_stats = student_vars["batch_stats"]
        return tuple(at_least_float32(f) for f in feats), batch_stats

    def __call__(
        self, teacher_vars: Variables, student_vars: Variables, images: jax.Array, train: bool = False
    ) -> tuple[Features, Features]:
        """(teacher features, student features), three scales each, NHWC float32."""
        t = self.teacher_features(teacher_vars, images)
        s, _ = self.student_features(student_vars, t, train)
        return t, s

    def train_inputs(
        self, teacher_vars: Variables, x: jax.Array, key: jax.Array, normalize: Callable[[jax.Array], jax.Array]
    ) -> Any:
        """[0, 1] images -> what `train_loss` takes: the teacher's features in the compute
        dtype, as the feature cache stores them (so cached and fresh features train alike)."""
        return tuple(f.astype(self.dtype) for f in self.teacher_features(teacher_vars, normalize(x)))

    def train_loss(
        self,
        student_vars: Variables,
        teacher_feats: Any,
        key: jax.Array,
        valid: jax.Array | None = None,
        step: jax.Array | None = None,
    ) -> tuple[jax.Array, Variables]:
        """The official loss over the ``valid`` rows, and the updated batch_stats."""
        s, batch_stats = self.student_features(student_vars, teacher_feats, train=True, valid=valid)
        return cosine_distance_loss(teacher_feats, s, valid=valid), batch_stats

    def optimizer(self, config: Any, total_steps: int = 0) -> optax.GradientTransformation:
        """Adam with the official settings (config.learning_rate, adam_b1, adam_b2)."""
        return optax.adam(config.learning_rate, b1=config.adam_b1, b2=config.adam_b2)

    def abstract_variables(self) -> tuple[Variables, Variables]:
        """Shapes and dtypes of (teacher_vars, student_vars), without computing them."""
        return jax.eval_shape(lambda: self.init(jax.random.key(0), 64))

    def port_teacher(self, state_dict: weights.StateDict, source: str = "state dict") -> Variables:
        """torchvision ImageNet weights -> teacher variables (strict; see rdjax.runtime.weights)."""
        return convert_teacher(self.arch, state_dict, self.abstract_variables()[0], source)

    def port_official(self, state_dict: weights.StateDict, source: str = "checkpoint") -> Variables:
        """Official RD4AD checkpoint {'bn': ..., 'decoder': ...} -> student {'params', 'batch_stats'}."""
        unknown = sorted(k for k in state_dict if not k.startswith(("bn.", "decoder.")))
        if unknown:
            raise PortError(
                f"{source}: not an official RD4AD checkpoint: key {unknown[0]!r} is outside 'bn' and 'decoder'"
            )
        return official_parts(self, state_dict, self.abstract_variables()[1], source, "RD4AD")

    def official_teacher(self, state_dict: weights.StateDict, source: str = "checkpoint") -> Variables | None:
        """None: the official checkpoints hold no teacher (torchvision's ImageNet weights)."""
        return None


MODEL: ModelType = RD4AD
