"""RD++ against its official definitions rebuilt in torch (tests/reference/torch_reference.py) and
geomloss 0.2.6, the version its requirements pin: the Sinkhorn divergence, the MPL and
student features, the whole loss and its gradients, the two Adams with accumulation,
the noise, and a run from training to prediction, export and the port.

Tolerances. float64 comparisons (rtol 1e-9): both sides evaluate the same formulas in a
different order; float64 rounding (2^-53 per operation, a few thousand operations deep,
and the Sinkhorn updates are averaged contractions that do not amplify it) stays below
1e-12 on any CPU, so only a different formula can exceed 1e-9. float32 features within
1e-4 of the maximum, as for RD4AD (docs/exactness.md): convolution sums of a few thousand
terms, in whatever order each library's kernels choose.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys

import geomloss
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import rdjax
from rdjax import config as config_lib
from rdjax import train
from rdjax.configs import rdpp_synthetic
from rdjax.deploy import export, port
from rdjax.errors import ConfigError
from rdjax.models import rdpp
from rdjax.models.rdpp import RDPP
from rdjax.models.sinkhorn import epsilon_schedule, sinkhorn_divergence
from rdjax.runtime import state as state_lib
from rdjax.runtime import weights

from conftest import (
    ROOT,
    nchw_to_nhwc,
    random_variables,
    randomize_batchnorm,
    rel_err,
    restore_state,
    scores_csv_auroc_range,
    small_config,
    subprocess_run,
)
from torch_reference import (
    TorchDecoder,
    TorchMPL,
    TorchOCBE,
    official_state_dict,
    rdpp_projection_loss,
    rdpp_projection_terms,
)

CHANNELS = {"resnet18": (64, 128, 256), "wide_resnet50_2": (256, 512, 1024)}


def _geomloss():
    return geomloss.SamplesLoss(
        "sinkhorn", p=2, blur=0.05, reach=None, diameter=10000000, scaling=0.95, truncate=10, debias=True
    )


def _clouds(rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind == "softmax":  # what RD++ feeds it: softmax-ed flattened features, 16 images
        x, y = rng.normal(size=(16, 3000)), rng.normal(size=(16, 3000))
        return np.exp(x) / np.exp(x).sum(1, keepdims=True), np.exp(y) / np.exp(y).sum(1, keepdims=True)
    return rng.normal(size=(7, 5)), rng.normal(size=(9, 5)) * 0.5 + 0.2  # generic, unequal sizes


# 'generic' runs in the slow tier: the fast tier's 3-minute budget (docs/testing.md)
@pytest.mark.parametrize("kind", [pytest.param("generic", marks=pytest.mark.slow), "softmax"])
def test_sinkhorn_divergence_equals_geomloss(kind):
    """Values and gradients in float64 against geomloss (rtol 1e-9, module docstring), the
    temperatures against geomloss's own schedule, and rdjax's float32 value against the
    float64 reference. geomloss's float32 value is not a reference: without a fixed gauge
    its potentials drift by however the CPU rounds (docs/differences.md).

    The float32 bound: each symmetric update is an average of a potential and a soft
    C-transform, both non-expansive in the sup norm, so rounding does not grow from one
    temperature to the next; it only adds. One update's logsumexp of arguments up to
    max(C)/eps, multiplied back by eps, rounds by a few ulp of max(C) (counted as 8:
    the cost entry, the subtraction, exp, the sum, log, the product, the average, and the
    final extrapolation), so after every temperature the value is within
    len(schedule) * 8 * 2^-24 * max(C) of the float64 one, whatever the CPU's vector
    width, FMA or summation order."""
    schedule = epsilon_schedule(2, 1e7, 0.05, 0.95)
    np.testing.assert_allclose(
        schedule,
        importlib.import_module("geomloss.sinkhorn_divergence").epsilon_schedule(2, 1e7, 0.05, 0.95),
        rtol=1e-12,
    )
    x, y = _clouds(np.random.default_rng(0), kind)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.tensor(y, requires_grad=True)
    loss = _geomloss()(tx, ty)
    loss.backward()
    want = float(loss.detach())
    with jax.enable_x64(True):
        value, (gx, gy) = jax.jit(jax.value_and_grad(sinkhorn_divergence, argnums=(0, 1)))(
            jnp.asarray(x), jnp.asarray(y)
        )
        assert value.dtype == jnp.float64
    np.testing.assert_allclose(float(value), want, rtol=1e-9)
    assert rel_err(gx, tx.grad.numpy()) < 1e-9 and rel_err(gy, ty.grad.numpy()) < 1e-9
    ours32 = float(sinkhorn_divergence(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
    max_cost = max(float(np.max(((a[:, None] - b[None]) ** 2).sum(-1))) / 2 for a in (x, y) for b in (x, y))
    assert abs(ours32 - want) <= len(schedule) * 8 * 2.0**-24 * max_cost


def test_ssot_of_a_batch_and_its_shuffle_vanishes():
    """RD++'s SSOT pairs a batch with itself in another order: uniform measures on the same
    points, so the divergence and its gradient are zero but for rounding, in geomloss as
    here (docs/differences.md)."""
    x, _ = _clouds(np.random.default_rng(1), "softmax")
    perm = np.random.default_rng(2).permutation(len(x))
    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(lambda z: sinkhorn_divergence(z, z[perm]))(jnp.asarray(x))
        generic = sinkhorn_divergence(jnp.asarray(x), jnp.asarray(x[::-1] * 1.5))
    assert abs(float(value)) < 1e-16 and float(jnp.max(jnp.abs(grad))) < 1e-15
    assert float(generic) > 1e-6  # the same points rescaled are not the same measure


@pytest.mark.slow  # the fast tier's 3-minute budget (docs/testing.md)
def test_sinkhorn_on_valid_rows_is_the_divergence_of_those_rows():
    """A padded partial batch: rows marked invalid weigh nothing, so the divergence of the
    padded clouds equals that of the valid rows alone (float64; the log-sum-exps differ
    only by terms exp(-inf) = 0, so 1e-12 relative is rounding), and the padding rows get
    no gradient. The clouds differ, so leaked padding would show (SSOT's own clouds, one a
    shuffle of the other, would hide it)."""
    rng = np.random.default_rng(3)
    x, y = (jax.nn.softmax(jnp.asarray(rng.normal(size=(6, 5)))) for _ in range(2))
    vx, vy = np.array([1, 1, 1, 1, 0, 0.0]), np.array([1, 1, 1, 0, 1, 0.0])
    with jax.enable_x64(True):
        x, y = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)
        padded, (gx, gy) = jax.value_and_grad(
            lambda a, b: sinkhorn_divergence(a, b, x_valid=jnp.asarray(vx), y_valid=jnp.asarray(vy)), argnums=(0, 1)
        )(x, y)
        alone = sinkhorn_divergence(x[vx == 1], y[vy == 1])
        everything = sinkhorn_divergence(x, y)
    assert float(alone) > 1e-6 and abs(float(everything) - float(alone)) > 1e-3 * float(alone)
    np.testing.assert_allclose(float(padded), float(alone), rtol=1e-12)
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))
    assert not np.any(np.asarray(gx)[vx == 0]) and not np.any(np.asarray(gy)[vy == 0])


def _official(arch: str, seed: int):
    torch.manual_seed(seed)
    mpl, ocbe, decoder = TorchMPL(CHANNELS[arch][0] // 4), TorchOCBE(arch), TorchDecoder(arch)
    randomize_batchnorm(ocbe, seed + 1)
    randomize_batchnorm(decoder, seed + 2)
    sd = {"proj": mpl.state_dict(), **official_state_dict(ocbe, decoder)}
    flat = {f"{k}.{n}": t.numpy() for k, v in sd.items() for n, t in v.items()}
    return (mpl, ocbe, decoder), flat


@pytest.mark.slow  # the fast tier's 3-minute budget (docs/testing.md)
@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet50_2"])
def test_mpl_and_student_match_the_official_modules(arch):
    """Ported from an official-layout checkpoint {'proj', 'bn', 'decoder'} (strictly: every
    key used), the MPL and the student features in eval mode equal the torch modules'."""
    (mpl, ocbe, decoder), flat = _official(arch, 3)
    model = RDPP(arch)
    student_vars = model.port_official(flat)
    g = torch.Generator().manual_seed(4)
    feats = [torch.randn(2, c, s, s, generator=g) for c, s in zip(CHANNELS[arch], (16, 8, 4))]
    jfeats = tuple(jnp.asarray(nchw_to_nhwc(f)) for f in feats)
    for m in (mpl, ocbe, decoder):
        m.eval()
    with torch.no_grad():
        projected = mpl(feats)
        want = decoder(ocbe(projected))
    ours_proj = model.student.apply(student_vars, jfeats, method=lambda s, f: s.proj(f))
    ours, _ = model.student_features(student_vars, jfeats, train=False)
    for o, w in zip((*ours_proj, *ours), (*projected, *want)):
        assert rel_err(o, nchw_to_nhwc(w)) <= 1e-4


@pytest.mark.slow  # float64 gradients of the whole student (the fast tier checks the float32 terms)
def test_loss_and_gradients_match_the_official_code_in_float64():
    """The whole training objective, L_distill + 0.2 L_proj, on clean and noised teacher
    features in train mode (batch statistics), and its gradient with respect to every
    parameter (MPL, OCBE, decoder), against the torch modules and geomloss in float64."""
    arch = "resnet18"
    (mpl, ocbe, decoder), flat = _official(arch, 5)
    mpl, ocbe, decoder = (copy.deepcopy(m).double().train() for m in (mpl, ocbe, decoder))
    g = torch.Generator().manual_seed(6)
    clean = [torch.randn(4, c, s, s, generator=g, dtype=torch.float64) for c, s in zip(CHANNELS[arch], (16, 8, 4))]
    noised = [f + 0.3 * torch.randn(f.shape, generator=g, dtype=torch.float64) for f in clean]
    key = jax.random.key(7)
    perm = torch.tensor(np.asarray(rdpp.ssot_permutation(key, jnp.ones(4))))
    proj_clean, proj_noised = mpl(clean), mpl(noised)
    out = decoder(ocbe(proj_clean))
    cos = torch.nn.CosineSimilarity()
    distill = sum(torch.mean(1 - cos(a.reshape(4, -1), b.reshape(4, -1))) for a, b in zip(clean, out))
    want = distill + 0.2 * rdpp_projection_loss(noised, proj_noised, proj_clean, perm)
    want.backward()

    grad = lambda p: torch.zeros_like(p) if p.grad is None else p.grad  # noqa: E731  (OCBE's unused conv4/bn4)
    grads = {"proj": {n: grad(p) for n, p in mpl.named_parameters()}}
    for name, module in (("bn", ocbe), ("decoder", decoder)):
        grads[name] = {n: grad(p) for n, p in module.named_parameters()}
        grads[name].update({n: b for n, b in module.named_buffers()})  # shapes only: the port needs every key
    grads["decoder"] = {k.replace("downsample", "upsample"): v for k, v in grads["decoder"].items()}
    flat_grads = {f"{k}.{n}": t.detach().numpy() for k, v in grads.items() for n, t in v.items()}
    # The port stores float32; a float64 tree goes through it as float32 high and low parts.
    high = {k: v.astype(np.float32) for k, v in flat_grads.items()}
    low = {k: (v - high[k]).astype(np.float32) for k, v in flat_grads.items()}
    want_grads = jax.tree.map(
        lambda h, lo: h.astype(np.float64) + lo,
        RDPP(arch).port_official(high)["params"],
        RDPP(arch).port_official(low)["params"],
    )

    with jax.enable_x64(True):
        model = RDPP(arch, "float64")
        student_vars = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.port_official(flat))
        inputs = tuple(tuple(jnp.asarray(nchw_to_nhwc(f.detach().numpy())) for f in fs) for fs in (clean, noised))

        def loss(params):
            return model.train_loss({"params": params, "batch_stats": student_vars["batch_stats"]}, inputs, key)

        (value, _), ours = jax.jit(jax.value_and_grad(loss, has_aux=True))(student_vars["params"])
    np.testing.assert_allclose(float(value), float(want), rtol=1e-9)
    flat_ours = jax.tree_util.tree_leaves_with_path(ours)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    assert len(flat_ours) == len(flat_want)
    scale = max(float(np.max(np.abs(w))) for w in flat_want.values())
    for path, o in flat_ours:
        name = jax.tree_util.keystr(path)
        if name.startswith("['proj']") and name.endswith("['bias']"):
            # A bias right before an instance norm is subtracted out again: its gradient is
            # zero, on both sides rounding noise (about 1e-18 here).
            assert float(np.max(np.abs(o))) < 1e-12 * scale, name
        else:
            assert rel_err(o, flat_want[path]) < 1e-9, name


def test_two_adams_with_accumulation_match_torch():
    """model.optimizer: torch's two Adams (betas (0.5, 0.999), lr 0.001 for 'proj' and 0.005
    for the rest) stepping on the sum of 2 batches' gradients, as the official loop does,
    over 3 optimizer steps in float64."""
    config = config_lib.defaults()
    rng = np.random.default_rng(0)
    params = {
        "proj": {"w": rng.normal(size=(3, 2))},
        "ocbe": {"w": rng.normal(size=(4,))},
        "decoder": {"w": rng.normal(size=(2, 2))},
    }
    grads = [jax.tree.map(lambda a: rng.normal(size=a.shape), params) for _ in range(6)]
    with jax.enable_x64(True):
        tx = RDPP("resnet18").optimizer(config)
        ours = jax.tree.map(jnp.asarray, params)
        state = tx.init(ours)
        for g in grads:
            updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, ours)
            ours = jax.tree.map(lambda p, u: p + u, ours, updates)
    tensors = {k: torch.tensor(v["w"], requires_grad=True) for k, v in params.items()}
    opt_proj = torch.optim.Adam([tensors["proj"]], lr=0.001, betas=(0.5, 0.999))
    opt_distill = torch.optim.Adam([tensors["ocbe"], tensors["decoder"]], lr=0.005, betas=(0.5, 0.999))
    for i, g in enumerate(grads):
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k]["w"]) if t.grad is None else t.grad + torch.tensor(g[k]["w"])
        if (i + 1) % 2 == 0:
            opt_proj.step()
            opt_distill.step()
            opt_proj.zero_grad()
            opt_distill.zero_grad()
    for k, t in tensors.items():
        np.testing.assert_allclose(np.asarray(ours[k]["w"]), t.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_noise_is_simplex_octaves_on_one_rectangle():
    """The field is the official rand_3d_octaves sum (6 octaves, persistence 0.6, first
    frequency 32), checked point by point with opensimplex's scalar noise3; each noised
    image differs from its clean copy on one rectangle of 10..31 px per side (256 px),
    starting at 1 or more, by 0.2 x the field's corner of that size."""
    import opensimplex

    field = rdpp.noise_field(31)
    gen = opensimplex.OpenSimplex(seed=rdpp.NOISE_SEED)
    for y, x, c in ((0, 0, 0), (5, 17, 1), (30, 29, 2)):
        want = sum(0.6**k * gen.noise3(x / (32 / 2**k), y / (32 / 2**k), c / (32 / 2**k)) for k in range(6))
        assert field[y, x, c] == pytest.approx(want, rel=1e-6, abs=1e-7)
    images = jnp.full((64, 256, 256, 3), 0.5, jnp.float32)
    diff = np.asarray(rdpp.add_noise(images, jax.random.key(0)) - images)
    sizes = []
    for d in diff:
        ys, xs = np.nonzero(np.any(d != 0, axis=-1))
        y0, x0, h, w = ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert 10 <= h <= 31 and 10 <= w <= 31 and y0 >= 1 and x0 >= 1 and y0 + h < 256 and x0 + w < 256
        np.testing.assert_allclose(d[y0 : y0 + h, x0 : x0 + w], 0.2 * field[:h, :w], atol=1e-6)
        sizes += [h, w]
    assert min(sizes) <= 12 and max(sizes) >= 29  # the whole range is drawn


@pytest.mark.slow
def test_rdpp_trains_predicts_exports_and_ports(synthetic_data, tmp_path):
    """configs/rdpp_synthetic.py's model on generated data: training moves every part, the
    workdir predicts and exports as an RD4AD one does (the exported maps equal predict's),
    a feature cache is refused with one line, and an official RD++ checkpoint ports into a
    workdir that restores exactly and evaluates."""
    root = synthetic_data()
    config = small_config(root, num_epochs=9, eval_every=1, report_best_on_test=True)
    config.num_epochs_by_category.disk = 2  # RD++'s per-category table
    rdpp = rdpp_synthetic.get_config().model  # RD++'s options
    config.model.name, config.model.proj_lr, config.model.accumulation = "rdpp", rdpp.proj_lr, rdpp.accumulation
    with pytest.raises(ConfigError, match="feature_cache='memory': model 'rdpp'"):
        bad = config.copy_and_resolve_references()
        bad.feature_cache = "memory"
        train.train_and_evaluate(bad, tmp_path / "bad")
    result = train.train_and_evaluate(config, tmp_path / "w")
    assert "calibration" in result and result["epoch"] == 2
    lo, hi = scores_csv_auroc_range(tmp_path / "w/eval/epoch_0002/scores.csv")
    assert lo <= result["image_auroc"] <= hi and hi - lo < 0.5
    trained, _ = restore_state(tmp_path / "w", name="rdpp")
    initial = RDPP("resnet18").init(jax.random.key(config.seed), 64)[1]["params"]
    for part in ("proj", "ocbe", "decoder"):  # both optimizers stepped
        assert not np.array_equal(jax.tree.leaves(trained.params[part])[0], jax.tree.leaves(initial[part])[0]), part
    evaluations = [
        json.loads((tmp_path / "w" / "eval" / f"epoch_{e:04d}" / "metrics.json").read_text()) for e in (1, 2)
    ]
    mean = [(r["image_auroc"] + r["pixel_auroc"] + r["aupro"]) / 3 for r in evaluations]
    best = json.loads((tmp_path / "w" / "best_on_test.json").read_text())
    assert best["epoch"] == 1 + int(np.argmax(mean)) and "test set" in best["selected_on"]
    model = rdjax.load(tmp_path / "w")
    assert set(model.student_vars["params"]) == {"proj", "ocbe", "decoder"}
    files = [np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    images = model.preprocess(files)  # RD++'s recipe: float32 inputs in [0, 1]
    assert images.dtype == np.float32
    exported = export.export_jax(model)
    maps, scores = exported.call(images)
    pred = model.predict(files)
    assert rel_err(np.asarray(maps)[0], pred.maps[0]) < 1e-5
    import onnxruntime  # the MPL's instance norms and leaky ReLUs convert too: 1e-4, the export bound (docs/export.md)

    session = onnxruntime.InferenceSession(export.export_onnx(model), providers=["CPUExecutionProvider"])
    assert rel_err(session.run(["maps"], {"images": images})[0][1], pred.maps[1]) < 1e-4

    (mpl, ocbe, decoder), _ = _official("resnet18", 9)
    torch.save({"proj": mpl.state_dict(), **official_state_dict(ocbe, decoder)}, tmp_path / "rdpp.pth")
    torch.save(__import__("torchvision").models.resnet18().state_dict(), tmp_path / "teacher.pth")
    port.port("rdpp", "resnet18", str(tmp_path / "rdpp.pth"), tmp_path / "ported", str(tmp_path / "teacher.pth"), 64)
    state, step = restore_state(tmp_path / "ported", name="rdpp")
    want = RDPP("resnet18").port_official(weights.read_state_dict(tmp_path / "rdpp.pth"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.student_vars, want)
    evaluated = train.evaluate(
        small_config(root, **{"model.name": "rdpp", "model.teacher_weights": str(tmp_path / "ported" / "teacher")}),
        tmp_path / "ported",
    )
    assert step == 0
    lo, hi = scores_csv_auroc_range(tmp_path / "ported/eval/epoch_0000/scores.csv")
    assert lo <= evaluated["image_auroc"] <= hi and hi - lo < 0.5


@pytest.mark.slow  # the fast tier's 3-minute budget (docs/testing.md)
def test_one_steps_loss_terms_match_the_official_code_in_float32():
    """One training step's terms in float32 (train mode): SSOT, reconstruction, contrast and
    distillation each, and the total, within 1e-5 of torch's float32 run with geomloss.
    Each is a mean of cosines of the same float32 features, so the two differ by
    summation order (about 1e-7 relative, times the depth of the network); SSOT is zero on
    both sides but for rounding, so it is held to 1e-5 of the total instead."""
    arch = "resnet18"
    (mpl, ocbe, decoder), flat = _official(arch, 8)
    for m in (mpl, ocbe, decoder):
        m.train()
    g = torch.Generator().manual_seed(9)
    clean = [torch.randn(4, c, s, s, generator=g) for c, s in zip(CHANNELS[arch], (16, 8, 4))]
    noised = [f + 0.3 * torch.randn(f.shape, generator=g) for f in clean]
    key = jax.random.key(10)
    perm = torch.tensor(np.asarray(rdpp.ssot_permutation(key, jnp.ones(4))))
    with torch.no_grad():
        proj_clean, proj_noised = mpl(clean), mpl(noised)
        out = decoder(ocbe(proj_clean))
        cos = torch.nn.CosineSimilarity()
        want_distill = float(sum(torch.mean(1 - cos(a.reshape(4, -1), b.reshape(4, -1))) for a, b in zip(clean, out)))
        want = [float(t) for t in rdpp_projection_terms(noised, proj_noised, proj_clean, perm)]
    model = RDPP(arch)
    student_vars = model.port_official(flat)
    inputs = tuple(tuple(jnp.asarray(nchw_to_nhwc(f.numpy())) for f in fs) for fs in (clean, noised))

    @jax.jit  # one program instead of a few hundred eagerly compiled ops
    def terms(student_vars, inputs):
        (pn, pc, student), _ = model.student.apply(
            student_vars, *inputs, method=rdpp.Student.training, mutable=["batch_stats"]
        )
        return (
            rdpp.projection_terms(inputs[1], pn, pc, key),
            rdpp.cosine_distance_loss(inputs[0], student),
            model.train_loss(student_vars, inputs, key)[0],
        )

    ours, ours_distill, ours_loss = terms(student_vars, inputs)
    ours, ours_distill = [float(t) for t in ours], float(ours_distill)
    total = lambda d, t: d + 0.2 * (t[0] + 0.01 * t[1] + 0.1 * t[2]) / 1.11  # noqa: E731
    want_total, ours_total = total(want_distill, want), total(ours_distill, ours)
    assert abs(ours[0] - want[0]) <= 1e-5 * want_total
    for o, w in zip((*ours[1:], ours_distill, ours_total), (*want[1:], want_distill, want_total)):
        assert o == pytest.approx(w, rel=1e-5)
    assert float(ours_loss) == pytest.approx(want_total, rel=1e-5)


@pytest.fixture(scope="module")
def rdpp_vars():
    """RD++ ResNet-18 (teacher_vars, student_vars) for 64 px, numpy-filled (conftest)."""
    return random_variables(RDPP("resnet18"), 64, seed=0, dtype=np.float32)


def test_train_inputs_noise_before_normalizing(rdpp_vars):
    """train_inputs: the teacher sees the normalized image and the normalized noised image
    (noise added in [0, 1], as the official dataset does before Normalize)."""
    from rdjax.data.normalize import standardize

    model = RDPP("resnet18")
    teacher_vars, _ = rdpp_vars
    x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
    key = jax.random.key(2)
    clean, noised = model.train_inputs(teacher_vars, x, key, standardize)
    want = model.teacher_features(teacher_vars, standardize(rdpp.add_noise(x, key)))
    assert all(np.array_equal(a, b) for a, b in zip(noised, want))
    assert all(np.array_equal(a, b) for a, b in zip(clean, model.teacher_features(teacher_vars, standardize(x))))
    assert not np.array_equal(clean[0], noised[0])


@pytest.mark.slow  # compiles RD++'s whole image step (~35 s on two cores)
def test_rdpp_steps_are_pure(rdpp_vars):
    """The step's randomness is a function of (seed, step) alone: 2 steps, a fresh step
    function, 2 more steps equal 4 steps in one go, bit for bit."""
    from rdjax.runtime import sharding
    from rdjax.train import steps

    model = RDPP("resnet18")
    teacher_vars, student_vars = rdpp_vars
    mesh = sharding.make_mesh()
    tx = model.optimizer(config_lib.defaults())
    images = np.random.default_rng(3).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)

    def run(state, n):
        step = steps.make_image_train_step(model, tx, mesh, True, seed=5)
        for _ in range(n):
            state, _ = step(state, teacher_vars, images, np.ones(len(images), np.float32))
        return state

    fresh = lambda: jax.device_put(
        state_lib.create_train_state(jax.tree.map(jnp.copy, student_vars), tx),  # noqa: E731
        sharding.replicated(mesh),
    )  # copies: each run's step donates its state
    straight, resumed = run(fresh(), 4), run(run(fresh(), 2), 2)
    jax.tree.map(np.testing.assert_array_equal, straight.params, resumed.params)


@pytest.mark.slow
def test_rdpp_steps_are_invariant_to_the_device_count(tmp_path):
    """RD++'s step from images on 2 devices equals it on 1 (tests/helpers/rdpp_probe.py, float64, one
    optimizer step of 2 accumulated batches): the per-image noise, the batch permutation of
    SSOT, the sharded teacher and student passes, global BatchNorm statistics and the
    all-reduced gradients. Tolerances as tests/integration/test_invariance.py's, for the same reasons."""
    out = tmp_path / "probe.npz"
    proc = subprocess_run(sys.executable, str(ROOT / "tests" / "helpers" / "rdpp_probe.py"), str(out), devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = dict(np.load(out))
    keys = [k.split("/", 2)[2] for k in probe if k.startswith(("param/1/", "stats/1/"))]
    assert any(k.startswith("proj/") for k in keys) and probe["param/1/proj/proj_a/proj_0/kernel"].dtype == np.float64
    for kind in ("param", "stats"):
        for key in (k.split("/", 2)[2] for k in probe if k.startswith(f"{kind}/1/")):
            np.testing.assert_allclose(
                probe[f"{kind}/2/{key}"], probe[f"{kind}/1/{key}"], rtol=1e-6, atol=1e-7, err_msg=f"{kind}/{key}"
            )
    start = probe["start/proj/proj_a/proj_0/kernel"]
    assert np.abs(probe["param/1/proj/proj_a/proj_0/kernel"] - start).max() > 1e-4  # the step moved the MPL
