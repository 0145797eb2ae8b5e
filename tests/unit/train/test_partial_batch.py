"""The official epoch's partial last batch: a batch padded to full size, its padding rows
marked invalid, trains as the official code trains on the valid rows alone.

In float64 (at a random init float32 gradients of these losses are ill-conditioned), for
RD4AD and RD++: the loss, the gradient of every student parameter and BatchNorm's running
statistics after the step (PyTorch's unbiased variance over the valid rows), against the
official modules rebuilt in torch (tests/reference/torch_reference.py) run on the valid rows only.
The padding rows hold other random features, so a padding row that leaked into a mean, a
batch statistic or SSOT's measures would show. Tolerance 1e-9 relative: float64 rounding
of sums over a few thousand terms is below 1e-12; the summation orders differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rdjax.models import rdpp
from rdjax.models.rd4ad import RD4AD
from rdjax.models.rdpp import RDPP

from conftest import nchw_to_nhwc, port64, randomize_batchnorm, rel_err
from torch_reference import TorchDecoder, TorchMPL, TorchOCBE, official_state_dict, rdpp_projection_loss

pytestmark = pytest.mark.slow  # two float64 steps of whole students: ~30 s on 2 cores

ARCH = "resnet18"
CHANNELS = (64, 128, 256)
BATCH, VALID = 4, 3


def _modules(name: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(11)
    parts = {"bn": TorchOCBE(ARCH), "decoder": TorchDecoder(ARCH)}
    if name == "rdpp":
        parts["proj"] = TorchMPL(CHANNELS[0] // 4)
    randomize_batchnorm(parts["bn"], 12)
    randomize_batchnorm(parts["decoder"], 13)
    return parts


def _checkpoint(parts: dict[str, torch.nn.Module]) -> dict[str, np.ndarray]:
    """Module tensors (parameters or gradients) in the official layout, flat, float64."""
    sd = official_state_dict(parts["bn"], parts["decoder"])
    if "proj" in parts:
        sd["proj"] = parts["proj"].state_dict()
    return {f"{k}.{n}": t.detach().numpy().astype(np.float64) for k, v in sd.items() for n, t in v.items()}


def _official_step(name: str, parts: dict, clean: list, noised: list, perm: torch.Tensor) -> tuple[float, dict]:
    """The official loss on the valid rows, backward; (loss, {official key: gradient or
    BatchNorm buffer after the forward})."""
    cos = torch.nn.CosineSimilarity()
    feats = parts["proj"](clean) if name == "rdpp" else clean
    out = parts["decoder"](parts["bn"](feats))
    n = clean[0].shape[0]
    loss = sum(torch.mean(1 - cos(a.reshape(n, -1), b.reshape(n, -1))) for a, b in zip(clean, out))
    if name == "rdpp":
        loss = loss + 0.2 * rdpp_projection_loss(noised, parts["proj"](noised), feats, perm)
    loss.backward()
    grads = {}
    for key, module in parts.items():
        for n_, p in module.named_parameters():
            grads[f"{key}.{n_}"] = torch.zeros_like(p) if p.grad is None else p.grad  # OCBE's unused conv4/bn4
        for n_, b in module.named_buffers():
            grads[f"{key}.{n_}"] = b
    grads = {(k.replace("downsample", "upsample") if k.startswith("decoder.") else k): v for k, v in grads.items()}
    return float(loss.detach()), {k: v.detach().numpy().astype(np.float64) for k, v in grads.items()}


@pytest.mark.parametrize("name", ["rd4ad", "rdpp"])
def test_a_padded_partial_batch_steps_as_the_official_code_on_its_valid_rows(name):
    parts = _modules(name)
    start = _checkpoint(parts)
    for m in parts.values():
        m.double().train()
    g = torch.Generator().manual_seed(14)
    clean = [torch.randn(BATCH, c, s, s, generator=g, dtype=torch.float64) for c, s in zip(CHANNELS, (16, 8, 4))]
    noised = [f + 0.3 * torch.randn(f.shape, generator=g, dtype=torch.float64) for f in clean]
    valid = np.array([1.0] * VALID + [0.0] * (BATCH - VALID))
    key = jax.random.key(15)
    perm = np.asarray(rdpp.ssot_permutation(key, jnp.asarray(valid)))
    assert sorted(perm[:VALID].tolist()) == list(range(VALID))  # the valid rows, in a random order
    want_loss, want = _official_step(
        name, parts, [f[:VALID] for f in clean], [f[:VALID] for f in noised], torch.tensor(perm[:VALID])
    )

    model_type = RDPP if name == "rdpp" else RD4AD
    want_tree = port64(model_type(ARCH).port_official, want)
    with jax.enable_x64(True):
        model = model_type(ARCH, "float64")
        student_vars = port64(model_type(ARCH).port_official, start)
        to_jax = lambda fs: tuple(jnp.asarray(nchw_to_nhwc(f.numpy())) for f in fs)  # noqa: E731
        inputs = (to_jax(clean), to_jax(noised)) if name == "rdpp" else to_jax(clean)

        def loss(params):
            variables = {"params": params, "batch_stats": student_vars["batch_stats"]}
            return model.train_loss(variables, inputs, key, jnp.asarray(valid))

        (value, batch_stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(student_vars["params"])
    np.testing.assert_allclose(float(value), want_loss, rtol=1e-9)
    scale = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want_tree["params"]))
    for (path, ours), (_, theirs) in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves_with_path(want_tree["params"])
    ):
        label = jax.tree_util.keystr(path)
        if label.startswith("['proj']") and label.endswith("['bias']"):
            # A bias right before an instance norm is subtracted out again: zero gradient, rounding on both sides.
            assert float(np.max(np.abs(ours))) < 1e-12 * scale, label
        else:
            assert rel_err(ours, theirs) < 1e-9, label
    for (path, ours), (_, theirs) in zip(
        jax.tree_util.tree_leaves_with_path(batch_stats), jax.tree_util.tree_leaves_with_path(want_tree["batch_stats"])
    ):
        assert rel_err(ours, theirs) < 1e-9, jax.tree_util.keystr(path)
    # The padding rows do not count: other values there change nothing.
    with jax.enable_x64(True):
        shuffled = jax.tree.map(lambda a: a.at[VALID:].set(a[VALID:] * -3.0 + 1.0), inputs)

        def again(params):
            variables = {"params": params, "batch_stats": student_vars["batch_stats"]}
            return model.train_loss(variables, shuffled, key, jnp.asarray(valid))[0]

        np.testing.assert_allclose(float(jax.jit(again)(student_vars["params"])), want_loss, rtol=1e-9)
