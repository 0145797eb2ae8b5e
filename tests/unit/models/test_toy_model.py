"""A new model is one module: this test module defines a toy model satisfying the
rdjax.models.Model contract, registers it, and trains, evaluates and predicts with it
through the normal entry point, with no edit anywhere in rdjax. Its option (lr_scale),
its map recipe and its port rule (archs) take effect the same way."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import rdjax
from rdjax import config as config_lib
from rdjax import registry
from rdjax.errors import ConfigError, PortError
from rdjax.models import MapRecipe, Model, ModelType
from rdjax.registry import MODELS
from rdjax.scoring import maps

from conftest import data_flags, rdjax_cli, scores_csv_auroc_range

Variables = dict[str, Any]


class ToyTeacher(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        a = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        return a, nn.relu(nn.Conv(8, (3, 3), strides=2)(a))


class ToyStudent(nn.Module):
    @nn.compact
    def __call__(self, feats: tuple[jax.Array, ...], train: bool) -> tuple[jax.Array, ...]:
        return tuple(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (1, 1))(f)) for f in feats)


class Toy:
    """Two scales, a 1x1 student: no code of RD4AD's. One option, config.model.lr_scale
    (the SGD rate is learning_rate times it), which a rerun may change."""

    needs_images = False
    input_filter = "pil_bilinear"
    official_config = "default"
    imagenet_file = None
    archs = ("tiny",)  # `rdjax port teacher --arch=tiny` is the toy's
    map_recipe = MapRecipe(mode="mean", blur_sigma=2.0)  # not RD4AD's add and sigma 4
    rerun_options = ("lr_scale",)
    training_options = ("lr_scale",)

    def __init__(self, arch: str, dtype: str, lr_scale: float = 1.0) -> None:
        if lr_scale <= 0:
            raise ConfigError(f"config.model.lr_scale={lr_scale} must be > 0")
        self.arch, self.dtype, self.lr_scale = arch, dtype, lr_scale

    def check_image_size(self, image_size: int) -> None:
        if image_size % 4:
            raise ConfigError(f"toy: image size {image_size} is not a multiple of 4")

    def init(self, rng: jax.Array, image_size: int = 256) -> tuple[Variables, Variables]:
        x = jnp.zeros((1, image_size, image_size, 3))
        teacher_vars = ToyTeacher().init(rng, x)
        student_vars = ToyStudent().init(jax.random.fold_in(rng, 1), ToyTeacher().apply(teacher_vars, x), False)
        return dict(teacher_vars), dict(student_vars)

    def abstract_variables(self) -> tuple[Variables, Variables]:
        return jax.eval_shape(lambda: self.init(jax.random.key(0), 32))

    def teacher_features(self, teacher_vars: Variables, images: jax.Array) -> tuple[jax.Array, ...]:
        out: Any = ToyTeacher().apply(teacher_vars, images)
        a, b = out
        return jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)

    def student_features(self, student_vars: Variables, teacher_feats: Any, train: bool) -> tuple[Any, Variables]:
        if train:
            feats, updates = ToyStudent().apply(student_vars, teacher_feats, True, mutable=["batch_stats"])
            return feats, updates["batch_stats"]
        return ToyStudent().apply(student_vars, teacher_feats, False), student_vars["batch_stats"]

    def __call__(self, teacher_vars: Variables, student_vars: Variables, images: jax.Array, train: bool = False) -> Any:
        t = self.teacher_features(teacher_vars, images)
        return t, self.student_features(student_vars, t, train)[0]

    def train_inputs(self, teacher_vars: Variables, x: jax.Array, key: jax.Array, normalize: Callable) -> Any:
        return self.teacher_features(teacher_vars, normalize(x))

    def train_loss(
        self,
        student_vars: Variables,
        inputs: Any,
        key: jax.Array,
        valid: jax.Array | None = None,
        step: jax.Array | None = None,
    ) -> tuple[jax.Array, Variables]:
        s, batch_stats = self.student_features(student_vars, inputs, True)
        w = jnp.ones(inputs[0].shape[0]) if valid is None else valid
        loss = jnp.zeros(())
        for a, b in zip(inputs, s):
            loss = loss + jnp.sum(jnp.mean((a - b) ** 2, axis=(1, 2, 3)) * w) / jnp.sum(w)
        return loss, batch_stats

    def optimizer(self, config: Any, total_steps: int = 0) -> optax.GradientTransformation:
        return optax.sgd(config.learning_rate * self.lr_scale)

    def port_teacher(self, state_dict: dict, source: str = "state dict") -> Variables:
        raise PortError(f"{source}: the toy model has no PyTorch teacher")

    def port_official(self, state_dict: dict, source: str = "checkpoint") -> Variables:
        raise PortError(f"{source}: the toy model has no official checkpoint")

    def official_teacher(self, state_dict: dict, source: str = "checkpoint") -> Variables | None:
        return None


def _register() -> None:
    if "toy" not in MODELS.names():
        MODELS.register("toy", Toy)


def test_the_toy_satisfies_the_contract():
    """At run time every member of the contract is there (mypy, run over this module by
    .ci/run, checks their types: `MODEL` below must be a ModelType)."""
    _register()
    model = MODELS.get("toy")("tiny", "float32")
    assert isinstance(model, Model) and isinstance(model, Toy) and model.arch == "tiny"


MODEL: ModelType = Toy  # the static check of the contract


@pytest.mark.slow  # the fast tier's 3-minute budget (docs/testing.md)
def test_a_toy_model_trains_evaluates_and_predicts_through_the_cli(synthetic_data, tmp_path):
    """Three epochs of 16 images at batch 8 are six steps (the second traced by
    config.profile_steps). Calibration runs every epoch, the metrics every second and at
    the last, the report at the last only; the evaluation's image AUROC is what its own
    scores.csv allows; rdjax.load scores a test image as the toy's own features through
    rdjax.scoring.maps do."""
    _register()
    root, work = synthetic_data(), tmp_path / "toy"
    flags = ["--config.model.name=toy", "--config.model.arch=tiny", "--config.batch_size=8", "--config.image_size=32",
             "--config.profile_steps=1", "--config.num_epochs=3", "--config.eval_every=2",
             "--config.evals.calibration.every=1", "--config.evals.report.every=3"]  # fmt: skip
    result = rdjax_cli("train", f"--workdir={work}", *data_flags(root), *flags)
    assert result.code == 0, result.stderr[-3000:]
    assert list((work / "profile").rglob("*.xplane.pb")), "config.profile_steps wrote no trace"
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["model"] == "toy" and metrics["step"] == 6 and metrics["epoch"] == 3
    evaluated = [json.loads((work / "eval" / f"epoch_{e:04d}" / "metrics.json").read_text()) for e in (1, 2, 3)]
    assert "calibration" in evaluated[0] and "image_auroc" not in evaluated[0]  # calibration alone
    assert not (work / "eval" / "epoch_0001" / "results.md").exists()
    assert "image_auroc" in evaluated[1] and not (work / "eval" / "epoch_0002" / "report.png").exists()
    last = work / "eval" / "epoch_0003"  # the last epoch runs every evaluator
    assert (last / "report.png").is_file() and (last / "scores.csv").is_file()
    lo, hi = scores_csv_auroc_range(last / "scores.csv")
    # The same fraction of pairs, summed in another order: 1e-12 apart at most.
    assert lo - 1e-12 <= metrics["image_auroc"] <= hi + 1e-12 and hi - lo < 0.5
    loaded = rdjax.load(work)
    image = np.asarray(Image.open(root / "disk" / "test" / "good" / "000.png").convert("RGB"))
    small = loaded.preprocess([image])
    x = (small.astype(np.float32) / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    t, s = Toy("tiny", "float32")(loaded.teacher_vars, loaded.student_vars, jnp.asarray(x, jnp.float32))
    saved = json.loads((work / "config.json").read_text())  # the toy's recipe, recorded when training started
    assert (saved["map_mode"], saved["blur_sigma"], saved["blur_kernel"], saved["map_size"]) == ("mean", 2.0, 0, 0)
    want_map = maps.anomaly_map(t, s, (32, 32), mode="mean", sigma=2.0)
    got = loaded.predict_resized(small)[0]
    # The same float32 formulas, jitted there and eager here: XLA may fuse and reorder
    # sums of a few dozen terms, a few ulp (1e-7 relative) apart, far below 1e-5.
    np.testing.assert_allclose(got, np.asarray(want_map), rtol=1e-5, atol=1e-6)


def _toy_config(**options: Any) -> Any:
    config = config_lib.defaults()
    config.model.name, config.model.arch, config.image_size = "toy", "tiny", 32
    config.model.update(options)
    return config


def test_the_toys_option_takes_effect_and_checks_itself():
    """config.model.lr_scale reaches Toy(arch, dtype, lr_scale=...) through the registry:
    the optimizer's step scales with it, a bad value is refused in one line, and a rerun
    may change it (its rerun_options) where another model's key may not."""
    _register()
    model = registry.build_model(_toy_config(lr_scale=0.5))
    assert isinstance(model, Toy) and model.lr_scale == 0.5
    params = {"w": jnp.zeros(())}
    opt = model.optimizer(_toy_config())
    updates, _ = opt.update({"w": jnp.ones(())}, opt.init(params), params)
    assert float(updates["w"]) == pytest.approx(-0.005 * 0.5)
    with pytest.raises(ConfigError, match="config.model.lr_scale=0 must be > 0"):
        registry.build_model(_toy_config(lr_scale=0))
    saved, rerun = _toy_config(lr_scale=0.5), _toy_config(lr_scale=0.25)
    assert config_lib.check_rerun("W", saved, rerun, False, model) == [
        "config.model.lr_scale=0.25 (the workdir's config.json has 0.5)"
    ]


def test_the_toys_map_recipe_and_port_rule_take_effect(tmp_path):
    """A config that leaves the map keys unset scores with the toy's recipe; `rdjax port
    teacher --arch=tiny` converts with the toy (whose port_teacher refuses every file)."""
    from rdjax.deploy import port

    _register()
    config = _toy_config()
    resolved = config_lib.for_workdir(config, None, registry.build_model(config))
    assert MapRecipe.of(resolved) == Toy.map_recipe == MapRecipe("mean", 2.0, 0, 0, 0.0)
    assert registry.model_for_arch("tiny") is Toy
    np.savez(tmp_path / "w.npz", w=np.zeros(1, np.float32))
    with pytest.raises(PortError, match="the toy model has no PyTorch teacher"):
        port.port("teacher", "tiny", str(tmp_path / "w.npz"), tmp_path / "out")
