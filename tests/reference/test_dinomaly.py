"""Dinomaly against its official code, rebuilt in torch (tests/reference/dinomaly_reference.py) over
timm's DINOv2 ViT with random weights: the encoder, the student, one float64 training step
(hard mining and dropout included), StableAdamW with clipping over several steps, and
the warm-cosine schedule.

Tolerances: float32 features within 1e-5 of the largest reference value (float32
rounding through ten pre-norm blocks stays near depth x 2^-24 x a few units; measured
about 1e-6). Float64 checks within 1e-9 (float64 rounding of sums over a few thousand
terms is below 1e-12; summation orders differ) and 1e-12 for the optimizer, whose
arithmetic is elementwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from rdjax.errors import PortError
from rdjax.models import dinomaly, optim, vit
from rdjax.models.dinomaly import Dinomaly

import dinomaly_reference as ref
from conftest import nchw_to_nhwc, port64, rel_err

ARCH = "vit_tiny14_reg4"  # 96 wide, 3 heads, 4 registers, 16 x 16 position grid (224 px)
SPEC = vit.VIT_ARCHS[ARCH]


def _timm(size: int = 224) -> torch.nn.Module:
    return ref.timm_encoder(SPEC.dim, SPEC.depth, SPEC.heads, size)


def _at_size(source: torch.nn.Module, size: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return ref.encoder_at(source, size, SPEC.pos_grid, dtype)


def _numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "size", [pytest.param(224, marks=pytest.mark.slow), 56, pytest.param(84, marks=pytest.mark.slow)]
)
def test_the_encoder_equals_timm_at_its_own_and_other_sizes(size):
    source = _timm()
    model = Dinomaly(ARCH)
    teacher_vars = model.port_teacher(_numpy(source))
    reference = _at_size(source, size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        want = ref.encoder_blocks(reference, x, model.targets[-1])
    got = model.encoder.apply(teacher_vars, jnp.asarray(nchw_to_nhwc(x.numpy())))
    assert len(got) == len(want) == model.targets[-1] + 1  # blocks after the last target are not run
    for i, (ours, theirs) in enumerate(zip(got, want)):
        assert rel_err(ours, theirs.numpy()) < 1e-5, i


@pytest.mark.slow  # two ports and two encoder passes: keeps the fast tier fast
def test_the_hub_layout_and_timms_port_to_the_same_encoder():
    source = _numpy(_timm())
    model = Dinomaly(ARCH)
    from_timm = model.port_teacher(source)
    hub = {k: v for k, v in source.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    # DINOv2's hub file: the class token's position stored apart, registers named register_tokens.
    class_pos = np.random.default_rng(0).normal(size=(1, 1, SPEC.dim)).astype(np.float32)
    hub["cls_token"] = source["cls_token"] - class_pos
    hub["pos_embed"] = np.concatenate([class_pos, source["pos_embed"]], axis=1)
    hub["register_tokens"] = source["reg_token"]
    hub["mask_token"] = np.zeros((1, SPEC.dim), np.float32)
    from_hub = model.port_teacher(hub)
    x = jax.random.normal(jax.random.key(0), (1, 56, 56, 3))
    for a, b in zip(model.encoder.apply(from_timm, x), model.encoder.apply(from_hub, x)):
        assert rel_err(a, b) < 1e-6
    with pytest.raises(PortError, match="missing key 'blocks.3.attn.qkv.weight'"):
        model.port_teacher({k: v for k, v in hub.items() if k != "blocks.3.attn.qkv.weight"})
    with pytest.raises(PortError, match="unexpected key 'blocks.3.extra'"):
        model.port_teacher({**hub, "blocks.3.extra": np.zeros(3, np.float32)})


def _vitill(size: int, dtype: torch.dtype = torch.float32) -> tuple[ref.ViTill, dict, dict]:
    """The official model over timm's encoder at ``size`` (in ``dtype``), and rdjax's ported variables."""
    source = _timm()
    torch.manual_seed(3)
    official = ref.ViTill(_at_size(source, size, dtype), SPEC.dim, SPEC.heads, SPEC.registers)
    model = Dinomaly(ARCH)
    return official, model.port_teacher(_numpy(source)), model.port_official(official.state_dict_official())


@pytest.mark.slow  # the fast tier's 3-minute budget (docs/testing.md)
def test_the_student_in_eval_mode_equals_the_official_vitill():
    official, teacher_vars, student_vars = _vitill(84)
    official.eval()
    x = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        en, de = official(x)
    t, s = Dinomaly(ARCH)(teacher_vars, student_vars, jnp.asarray(nchw_to_nhwc(x.numpy())))
    assert len(t) == len(s) == 2
    for ours, theirs in zip((*t, *s), (*en, *de)):
        assert ours.shape == (2, 6, 6, SPEC.dim)
        assert rel_err(ours, nchw_to_nhwc(theirs.numpy())) < 1e-5


@pytest.mark.slow  # two float64 steps through the encoder and the student: ~16 s on 2 cores
@pytest.mark.parametrize("step", [500, 4000])
def test_a_float64_training_step_equals_the_official_step(step):
    """Loss and every gradient, with the same dropout masks on both sides and the hard
    points' threshold at iteration ``step`` (p = 0.45, 0.9; at p = 0 no point is scaled)."""
    official, teacher_vars, _ = _vitill(56, torch.float64)
    start = official.state_dict_official()
    official.double().train()
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    key = jax.random.key(6)
    tokens = (3, SPEC.prefix + 16, SPEC.dim)
    masks = dinomaly.dropout_masks(key, tokens)
    en, de = official(x, [torch.tensor(np.asarray(m), dtype=torch.float64) for m in masks])
    p = min(0.9 * step / 1000, 0.9)
    loss = ref.global_cosine_hm_percent(en, de, p=p, factor=0.1)
    loss.backward()
    grads = {n: q.grad.numpy() for n, q in official.named_parameters() if not n.startswith("encoder.")}

    model32 = Dinomaly(ARCH)
    want = port64(model32.port_official, grads)["params"]
    with jax.enable_x64(True):
        model = Dinomaly(ARCH, "float64")
        teacher64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), teacher_vars)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model32.port_official(start)["params"])
        inputs = model.train_inputs(teacher64, jnp.asarray(nchw_to_nhwc(x.numpy())), key, lambda v: v)

        def loss_fn(p_):
            return model.train_loss({"params": p_, "batch_stats": {}}, inputs, key, None, jnp.asarray(step))[0]

        value, ours = jax.jit(jax.value_and_grad(loss_fn))(params)
    np.testing.assert_allclose(float(value), float(loss.detach()), rtol=1e-9)
    for (path, g), (_, w) in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree_util.tree_leaves_with_path(want)):
        assert rel_err(g, w) < 1e-9, jax.tree_util.keystr(path)


def test_hard_mining_scales_the_gradient_of_the_easy_points_only():
    """By hand: one group of four points with distances 1 - 2/sqrt(5), 0, 0 and 1;
    k = int(4 (1 - 0.45)) = 2, so the threshold is the second largest, 1 - 2/sqrt(5), and
    the two points strictly below it get a tenth of the gradient."""
    e = jnp.asarray(np.array([[2.0, 1.0], [1.0, 2.0], [1.0, 1.0], [1.0, 1.0]], np.float32).reshape(1, 2, 2, 2))
    d = jnp.asarray(np.array([[1.0, 0.0], [0.5, 1.0], [1.0, 1.0], [1.0, -1.0]], np.float32).reshape(1, 2, 2, 2))
    dist = np.asarray(dinomaly.point_distance(e, d)).ravel()
    np.testing.assert_allclose(dist, [1 - 2 / np.sqrt(5), 0, 0, 1], atol=1e-6)
    step = jnp.asarray(500)  # p = 0.45
    plain = jax.grad(lambda d_: dinomaly.cosine_distance_loss((e,), (d_,)))(d)
    mined = jax.grad(lambda d_: dinomaly.hard_mining_loss((e,), (d_,), step))(d)
    thresh = np.sort(dist)[::-1][1]
    factor = np.where(dist < thresh, 0.1, 1.0).reshape(1, 2, 2, 1)
    assert (dist < thresh).sum() == 2
    np.testing.assert_allclose(np.asarray(mined), np.asarray(plain) * factor, rtol=1e-6)
    value = dinomaly.hard_mining_loss((e,), (d,), step)
    np.testing.assert_allclose(float(value), float(dinomaly.cosine_distance_loss((e,), (d,))), rtol=1e-7)


def test_stable_adamw_with_clipping_equals_the_official_optimizer():
    """Eight steps in float64 through the warm-up and the cosine, with gradients that
    switch the global-norm clip and the per-tensor RMS limit on and off."""
    rng = np.random.default_rng(7)
    shapes = {"a": (5, 3), "b": (4,), "c": (2, 2, 3)}
    start = {k: rng.normal(size=s) for k, s in shapes.items()}
    scales = [1e-3, 1.0, 1e-4, 50.0, 1e-2, 1e-5, 3.0, 1e-3]
    grads = [{k: rng.normal(size=s) * sc * rng.uniform(0.1, 10) for k, s in shapes.items()} for sc in scales]

    params = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    opt = ref.StableAdamW(params.values(), lr=2e-3, betas=(0.9, 0.999), eps=1e-10, weight_decay=1e-4, amsgrad=True)
    sched = ref.WarmCosineScheduler(opt, 2e-3, 2e-4, total_iters=6, warmup_iters=3)
    want = []
    for g in grads:
        for k, p in params.items():
            p.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(params.values(), max_norm=0.1)
        opt.step()
        sched.step()
        want.append({k: p.detach().numpy().copy() for k, p in params.items()})

    with jax.enable_x64(True):
        table = optim.warm_cosine_schedule(2e-3, 2e-4, 6, 3)
        tx = optax.chain(
            optim.torch_clip_by_global_norm(0.1),
            optim.stable_adamw(optim.schedule_fn(table, 2e-4), eps=1e-10, weight_decay=1e-4),
        )
        ours = {k: jnp.asarray(v) for k, v in start.items()}
        state = tx.init(ours)
        for g, w in zip(grads, want):
            updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, ours)
            ours = optax.apply_updates(ours, updates)
            for k in shapes:
                assert rel_err(ours[k], w[k]) < 1e-12, k


def test_the_schedule_equals_warm_cosine_scheduler_at_every_iteration():
    total, warmup = 10000, 100
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3)
    sched = ref.WarmCosineScheduler(opt, 2e-3, 2e-4, total, warmup)
    want = []
    for _ in range(total + 3):  # and past the end, where the official schedule holds final_value
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    with jax.enable_x64(True):
        lr = optim.schedule_fn(optim.warm_cosine_schedule(2e-3, 2e-4, total, warmup), 2e-4)
        ours = np.asarray(jax.vmap(lr)(jnp.arange(total + 3)))
    np.testing.assert_array_equal(ours, np.asarray(want))
    assert ours[0] == 0.0 and ours[99] == ours[100] == 2e-3


@pytest.mark.slow  # two unified trainings with evaluation: ~30 s on 2 cores
def test_the_demo_config_trains_exactly_total_steps_and_a_rerun_extends_it(synthetic_data, tmp_path):
    """configs/dinomaly_synthetic.py on 16 training images of one category at batch 8,
    full batches only: total_steps=3 stops inside the first epoch's last steps or the
    second epoch, with a checkpoint at 3 and metrics; a rerun with total_steps=5 resumes
    at step 3 and stops at 5."""
    from rdjax import train
    from rdjax.configs import dinomaly_synthetic
    from rdjax.runtime import workdir as workdir_lib

    root = synthetic_data()
    config = dinomaly_synthetic.get_config()
    config.dataset.root, config.dataset.data_dir = str(root), str(root / "_tfds")
    config.setting, config.dataset.category = "per_category", "disk"  # one evaluation a run
    del config.evals["report"]  # its pictures are tested elsewhere
    config.input.resize, config.image_size = 64, 56
    config.threshold.method, config.threshold.validation_size = "f1", 0
    config.total_steps, config.model.warmup_steps = 3, 1
    result = train.run(config, tmp_path / "w")
    assert "disk" in result and 0 <= result["disk"]["aupro_200"] <= 1
    manager = workdir_lib.checkpoint_manager(tmp_path / "w", create=False)
    assert manager.latest_step() == 3
    saved = workdir_lib.load_config(tmp_path / "w")
    assert (saved.total_steps, saved.model.name) == (3, "dinomaly")
    last = int(saved.num_epochs)  # ceil(3 / steps per epoch): the last epoch stops early
    assert (tmp_path / "w" / "eval" / f"epoch_{last:04d}").is_dir()
    train.run(config, tmp_path / "w")  # finished: evaluated again, under the same epoch
    assert sorted(p.name for p in (tmp_path / "w" / "eval").iterdir()) == [f"epoch_{last:04d}"]
    config.total_steps = 5
    train.run(config, tmp_path / "w")
    assert workdir_lib.checkpoint_manager(tmp_path / "w", create=False).latest_step() == 5


@pytest.mark.slow  # float64 compiles: keeps the fast tier fast
def test_hard_mining_on_a_padded_batch_equals_the_valid_rows_alone():
    """A batch of 3 with 2 valid rows: the loss, the threshold (k from the valid rows'
    points) and the gradients of the valid rows are those of the 2 rows alone, the padding
    row gets no gradient, and other padding values change nothing. float64: only the
    summation order differs (1e-12)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(8)
        e = [jnp.asarray(rng.normal(size=(3, 4, 4, 6))) for _ in range(2)]
        d = [jnp.asarray(rng.normal(size=(3, 4, 4, 6))) for _ in range(2)]
        valid = jnp.asarray([1.0, 1.0, 0.0])
        step = jnp.asarray(700)

        def padded(d_):
            return dinomaly.hard_mining_loss(tuple(e), tuple(d_), step, valid)

        def alone(d_):
            return dinomaly.hard_mining_loss(tuple(x[:2] for x in e), tuple(d_), step)

        v_pad, g_pad = jax.value_and_grad(padded)(d)
        v_alone, g_alone = jax.value_and_grad(alone)([x[:2] for x in d])
        np.testing.assert_allclose(float(v_pad), float(v_alone), rtol=1e-12)
        for gp, ga in zip(g_pad, g_alone):
            np.testing.assert_allclose(np.asarray(gp[:2]), np.asarray(ga), rtol=1e-12, atol=1e-15)
            assert float(jnp.max(jnp.abs(gp[2]))) == 0.0
        other = [x.at[2].set(x[2] * -5.0 + 1.0) for x in d]
        np.testing.assert_allclose(float(padded(other)), float(v_alone), rtol=1e-12)
