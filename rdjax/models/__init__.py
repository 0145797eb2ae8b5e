"""The model contract. A model is chosen by name (config.model.name) from
`rdjax.registry.MODELS`: the module `rdjax.models.<name>` exports `MODEL`, a class built
as `MODEL(arch, dtype, **options)` whose instances satisfy `Model`. Its options are
config.model's keys beyond name, arch and teacher_weights, with the model's defaults
(big_vision's `Model(**config.model)`); a model checks them itself. RD4AD is 'rd4ad', RD++ 'rdpp',
Dinomaly 'dinomaly'.

Everything the training loop, evaluation, the feature cache, the port and the export do
with a model goes through these members, so a new model is one module and a config.
(`rdjax.Predictor`, what `rdjax.load` returns, is the trained predictor built around one.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import optax

from rdjax import modes
from rdjax.errors import ConfigError
from rdjax.pytrees import Features, Variables


def check_dtype(dtype: str) -> None:
    """A compute dtype a model takes: a config's (rdjax.modes.Dtype), or 'float64', the
    reference precision of numerical checks, which needs jax_enable_x64."""
    if dtype == "float64":
        if not jax.config.read("jax_enable_x64"):
            raise ConfigError("dtype 'float64' needs jax_enable_x64")
    else:
        modes.parse(modes.Dtype, dtype, "dtype")


@dataclasses.dataclass(frozen=True)
class MapRecipe:
    """How a model's feature pairs become an anomaly map and an image score: one value
    where seven parameters travelled together. Each model supplies its own (the official
    code's); a config's map keys, where set, override it (rdjax.config)."""

    mode: str = "add"  # rdjax.modes.MapMode over the scales: 'add', 'mul' or 'mean'
    blur_sigma: float = 4.0
    blur_kernel: int = 0  # 0: scipy's gaussian_filter (truncate 4, reflect); k > 0 (odd): a k x k zero-padded Gaussian
    size: int = 0  # the maps' side: 0 = the input's; > 0 = resized to it (bilinear) before the blur
    max_ratio: float = 0.0  # the image score: 0 = the map's maximum; r in (0, 1] = the mean of its top r fraction

    @classmethod
    def of(cls, config: Any) -> MapRecipe:
        """The recipe a resolved config's map keys give."""
        return cls(
            mode=str(config.map_mode),
            blur_sigma=float(config.blur_sigma),
            blur_kernel=int(config.blur_kernel),
            size=int(config.map_size),
            max_ratio=float(config.max_ratio),
        )


@runtime_checkable
class Model(Protocol):
    """A frozen teacher and a trainable student over explicit variable pytrees:
    teacher_vars are never differentiated, student_vars = {'params', 'batch_stats'}."""

    @property
    def arch(self) -> str:
        """The backbone's name, recorded in the workdir and its teacher."""
        ...

    @property
    def dtype(self) -> str:
        """The compute dtype."""
        ...

    @property
    def needs_images(self) -> bool:
        """True where every step needs the images (the teacher runs on new inputs each
        step); False lets training read `train_inputs` from a cache, so they must not
        use the key."""
        ...

    @property
    def input_filter(self) -> str:
        """The official code's resize filter (rdjax.modes.ResizeFilter): what
        config.input.filter '' means for a new workdir (rdjax.data.preprocess.Recipe)."""
        ...

    @property
    def map_recipe(self) -> MapRecipe:
        """The official code's maps and image score: what a config's map keys left unset
        (None) mean for a new workdir (rdjax.config.for_workdir)."""
        ...

    @property
    def archs(self) -> tuple[str, ...]:
        """The teacher architectures it takes (a class attribute): `rdjax port teacher
        --arch=A` converts A's weights with the first model by name that lists A
        (rdjax.registry.model_for_arch)."""
        ...

    @property
    def rerun_options(self) -> tuple[str, ...]:
        """Its options (config.model keys) a rerun of a trained workdir may change, as
        the learning rates: the trained part stays valid (rdjax.config.check_rerun)."""
        ...

    @property
    def training_options(self) -> tuple[str, ...]:
        """Its options only training reads: an evaluation may change them, and its
        results do not depend on them (rdjax.config.evaluation_settings)."""
        ...

    @property
    def official_config(self) -> str:
        """The shipped config of the official settings (its recipe, maps and scores),
        which `rdjax port` records for a ported checkpoint."""
        ...

    @property
    def imagenet_file(self) -> str | None:
        """The teacher's ImageNet weights file (rdjax.runtime.weights.download), or None."""
        ...

    def __hash__(self) -> int:
        """Compiled steps are cached per model (functools.cache): equal models, one program."""
        ...

    def check_image_size(self, image_size: int) -> None:
        """Raise ConfigError where the model cannot take square images of this size."""

    def init(self, rng: jax.Array, image_size: int = 256) -> tuple[Variables, Variables]:
        """Random (teacher_vars, student_vars)."""
        ...

    def abstract_variables(self) -> tuple[Variables, Variables]:
        """Shapes and dtypes of (teacher_vars, student_vars), without computing them."""
        ...

    def teacher_features(self, teacher_vars: Variables, images: jax.Array) -> Features:
        """Normalized NHWC images -> the teacher's features (float32, no gradient)."""
        ...

    def student_features(
        self, student_vars: Variables, teacher_feats: Features, train: bool
    ) -> tuple[Features, Variables]:
        """The student's features (float32) and its batch_stats (updated in train mode)."""
        ...

    def __call__(
        self, teacher_vars: Variables, student_vars: Variables, images: jax.Array, train: bool = False
    ) -> tuple[Features, Features]:
        """(teacher features, student features), the pairs an anomaly map compares."""
        ...

    def train_inputs(
        self, teacher_vars: Variables, x: jax.Array, key: jax.Array, normalize: Callable[[jax.Array], jax.Array]
    ) -> Any:
        """[0, 1] images -> what `train_loss` takes (what the feature cache stores)."""
        ...

    def train_loss(
        self,
        student_vars: Variables,
        inputs: Any,
        key: jax.Array,
        valid: jax.Array | None = None,
        step: jax.Array | None = None,
    ) -> tuple[jax.Array, Variables]:
        """The training loss over the ``valid`` rows (1 and 0; None: every row) and the
        batch_stats updated from them: a partial batch padded to full size trains as its
        valid rows alone would (the official DataLoader's last batch). ``step`` is the
        optimizer step it is for (Dinomaly's hard mining ramps with it; None: 0)."""
        ...

    def optimizer(self, config: Any, total_steps: int = 0) -> optax.GradientTransformation:
        """The optimizer, from the config's settings; ``total_steps`` is the run's length,
        for schedules that span it (Dinomaly's; 0 where unknown, as for a port)."""
        ...

    def port_teacher(self, state_dict: dict[str, Any], source: str = "state dict") -> Variables:
        """A PyTorch state dict of the teacher -> teacher_vars (strict)."""
        ...

    def port_official(self, state_dict: dict[str, Any], source: str = "checkpoint") -> Variables:
        """The official code's checkpoint -> student_vars (strict)."""
        ...

    def official_teacher(self, state_dict: dict[str, Any], source: str = "checkpoint") -> Variables | None:
        """The teacher_vars an official checkpoint holds itself (Dinomaly's ViTill keeps
        its encoder), or None where the teacher comes apart (RD4AD, RD++)."""
        ...


ModelType = Callable[..., Model]  # MODEL(arch, dtype, **options)
