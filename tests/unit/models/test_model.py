"""Assembly, input checks, the loss, the frozen teacher, and the model registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rdjax import config as config_lib
from rdjax.errors import ConfigError
from rdjax.models.rd4ad import RD4AD, cosine_distance_loss
from rdjax.registry import MODELS
from rdjax.runtime import sharding
from rdjax.runtime import state as state_lib
from rdjax.train import steps

from conftest import nchw_to_nhwc, random_variables


@pytest.fixture(scope="module")
def small():
    model = RD4AD("resnet18")
    teacher_vars, student_vars = jax.tree.map(jnp.asarray, random_variables(model, 64, seed=0, dtype=np.float32))
    return model, teacher_vars, student_vars


def test_outputs_pair_teacher_and_student_scales(small):
    model, teacher_vars, student_vars = small
    t, s = model(teacher_vars, student_vars, jnp.ones((2, 96, 64, 3)))
    assert [x.shape for x in t] == [(2, 24, 16, 64), (2, 12, 8, 128), (2, 6, 4, 256)]
    assert [x.shape for x in s] == [x.shape for x in t]


@pytest.mark.parametrize("h,w", [(100, 64), (64, 250)])
def test_size_not_multiple_of_32_is_rejected(small, h, w):
    model, teacher_vars, student_vars = small
    with pytest.raises(ValueError, match=f"image size {h}x{w} is not a multiple of 32"):
        model(teacher_vars, student_vars, jnp.ones((1, h, w, 3)))


def test_unknown_arch_and_dtype_are_rejected():
    with pytest.raises(ValueError, match="unknown architecture 'resnet19'"):
        RD4AD("resnet19")
    with pytest.raises(ValueError, match="dtype='float16' is not supported"):
        RD4AD("resnet18", dtype="float16")


def test_models_are_chosen_by_name():
    assert MODELS.get("rd4ad") is RD4AD
    with pytest.raises(ConfigError, match="unknown model 'rd5ad'; choose one of dinomaly, rd4ad, rdpp"):
        MODELS.get("rd5ad")


def test_loss_equals_official_flattened_cosine():
    """Against torch.nn.CosineSimilarity on flattened (C*H*W) maps, as in the official
    main.py, both in float64: float64 rounding of these sums (< 1e-13 relative) is far
    below rtol 1e-10 on any CPU, so only a different formula can fail."""
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(3, c, s, s, generator=g, dtype=torch.float64) for c, s in ((4, 8), (6, 4), (8, 2))]
    b = [x + 0.7 * torch.randn(x.shape, generator=g, dtype=torch.float64) for x in a]
    cos = torch.nn.CosineSimilarity()
    want = sum(torch.mean(1 - cos(x.view(x.shape[0], -1), y.view(y.shape[0], -1))) for x, y in zip(a, b))
    with jax.enable_x64(True):
        ours = cosine_distance_loss(
            tuple(jnp.asarray(nchw_to_nhwc(x)) for x in a), tuple(jnp.asarray(nchw_to_nhwc(y)) for y in b)
        )
        assert ours.dtype == jnp.float64
    np.testing.assert_allclose(float(ours), float(want), rtol=1e-10)


@pytest.mark.slow  # a step differentiated through the teacher (12 s); the fast tier's budget
def test_teacher_is_frozen_through_a_train_step(small):
    model, teacher_vars, student_vars = small
    tx = model.optimizer(config_lib.defaults())
    images = jax.random.normal(jax.random.key(1), (8, 64, 64, 3))

    # The teacher's features carry no gradient to its variables: exactly zero. (The
    # student's gradients are nonzero: the step below moves its parameters.)
    g_teacher = jax.jit(jax.grad(lambda tv: sum(jnp.sum(f) for f in model.teacher_features(tv, images))))(teacher_vars)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(g_teacher))

    # The optimizer state covers student params only.
    state = jax.device_put(
        state_lib.create_train_state(jax.tree_util.tree_map(jnp.copy, student_vars), tx),
        sharding.replicated(sharding.make_mesh()),
    )  # committed, as train.py makes it; donated below
    n_student = sum(x.size for x in jax.tree_util.tree_leaves(student_vars["params"]))
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_student  # Adam: mu and nu

    # The jitted step donates the train state only: the teacher's buffers stay alive, and
    # the state it returns holds no teacher variable.
    feats = jax.jit(model.teacher_features)(teacher_vars, images)
    step = steps.make_train_step(model, tx, sharding.make_mesh())
    new_state, loss_value = step(state, feats, np.ones(len(images), np.float32))
    assert np.isfinite(float(loss_value))
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(state.params))
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(teacher_vars))
    assert set(new_state.params) == {"ocbe", "decoder"}
    # Student params and BN statistics did move; the step counter advanced.
    assert int(new_state.step) == 1
    moved = jax.tree_util.tree_map(
        lambda a, b: bool(np.any(np.asarray(a) != b)), new_state.batch_stats, student_vars["batch_stats"]
    )
    assert all(jax.tree_util.tree_leaves(moved))
    params_moved = jax.tree_util.tree_map(
        lambda a, b: bool(np.any(np.asarray(a) != b)), new_state.params, student_vars["params"]
    )
    assert any(jax.tree_util.tree_leaves(params_moved))
