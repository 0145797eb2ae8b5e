"""Device-count invariance: the same step on 1, 2 and 8 CPU devices computes the same
function (sharded forward, global BatchNorm statistics, gradient all-reduce).

Float32 gradients cannot show it: at a random init the gradients of this loss are
ill-conditioned (a change of the teacher features at float32 rounding level moves some
decoder gradients by percents, in the official PyTorch code too), so float32 summation
order, which
differs between CPUs and between sharded and unsharded programs, shows up as percent-
level gradient differences. In float64 the same amplification of rounding (2^-53
instead of 2^-24) stays below 1e-9 relative on any CPU, so gradients and parameters are
compared there. Computed by tests/helpers/scale_probe.py in a subprocess with 8 host devices."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import ROOT, subprocess_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "probe.npz"
    proc = subprocess_run(sys.executable, str(ROOT / "tests" / "helpers" / "scale_probe.py"), str(out), "2", devices=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.parametrize("n", [2, 8])
def test_n_steps_are_invariant_to_the_device_count(probe, n):
    """Two Adam steps on two batches from the same state, float64: parameters and
    BatchNorm statistics on 2 and 8 devices equal those on 1 device (rtol 1e-6, atol
    1e-7: float64 rounding amplified by the conditioning above is ~1e-9; Adam's first
    steps move each entry by ~lr * sign(g), so a gradient near zero may turn a 1e-9
    difference into lr * 1e-9 / eps-sized ones, still below atol)."""
    keys = [k.split("/", 2)[2] for k in probe if k.startswith("param64/1/")]
    assert keys and probe[f"param64/1/{keys[0]}"].dtype == np.float64
    for kind in ("param64", "stats64"):
        for key in (k.split("/", 2)[2] for k in probe if k.startswith(f"{kind}/1/")):
            one, many = probe[f"{kind}/1/{key}"], probe[f"{kind}/{n}/{key}"]
            np.testing.assert_allclose(many, one, rtol=1e-6, atol=1e-7, err_msg=f"{kind}/{key}")
    # Two steps did move the parameters, by far more than the tolerance.
    start = probe["start/decoder/layer1_0/conv2/kernel"]
    assert np.abs(probe["param64/1/decoder/layer1_0/conv2/kernel"] - start).max() > 1e-3


@pytest.mark.parametrize("n", [2, 8])
def test_one_step_is_invariant_to_the_device_count(probe, n):
    """Loss and gradients of the first step (same state and global batch) on n devices
    against 1, in float64: rtol 1e-7 with atol 1e-9 of the largest gradient (see the module docstring
    for why ~1e-9 is the most float64 rounding can do here). Unlike parameters after Adam,
    gradients would also show a wrongly scaled all-reduce."""
    assert float(probe[f"loss/{n}"]) == pytest.approx(float(probe["loss/1"]), rel=1e-12)
    grads = sorted(k.split("/", 2)[2] for k in probe if k.startswith("grad/1/"))
    assert grads and probe[f"grad/1/{grads[0]}"].dtype == np.float64
    for key in grads:
        g1, gn = probe[f"grad/1/{key}"], probe[f"grad/{n}/{key}"]
        np.testing.assert_allclose(gn, g1, rtol=1e-7, atol=1e-9 * np.abs(g1).max(), err_msg=key)


@pytest.fixture(scope="module")
def dinomaly_probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "dinomaly.npz"
    proc = subprocess_run(
        sys.executable, str(ROOT / "tests" / "helpers" / "scale_probe.py"), str(out), "2", "dinomaly", devices=8
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def test_a_dinomaly_step_on_two_devices_equals_the_step_on_one(dinomaly_probe):
    """Dinomaly (dropout drawn from the step's key, the hard-mining threshold over the
    global batch, clipping by the global gradient norm): loss and gradients of the first
    step, and parameters after two StableAdamW steps, on 2 devices against 1, float64.
    The gradients as RD4AD's (float64 summation order, ~1e-9 at most after the loss's
    conditioning); the parameters at rtol 1e-6, atol 1e-7: StableAdamW's first steps
    divide by sqrt(v) + 1e-10, so an entry whose gradient is near zero may turn a 1e-9
    gradient difference into a step difference of lr x 1e-9 / 1e-10 ~ 2e-5 x its own
    size, bounded by the lr (2e-3) per step; atol 1e-7 holds that above any rounding and
    far below the steps' 1e-4 movement (asserted)."""
    probe = dinomaly_probe
    assert float(probe["loss/2"]) == pytest.approx(float(probe["loss/1"]), rel=1e-12)
    grads = sorted(k.split("/", 2)[2] for k in probe if k.startswith("grad/1/"))
    assert grads and probe[f"grad/1/{grads[0]}"].dtype == np.float64
    for key in grads:
        g1, g2 = probe[f"grad/1/{key}"], probe[f"grad/2/{key}"]
        np.testing.assert_allclose(g2, g1, rtol=1e-7, atol=1e-9 * np.abs(g1).max(), err_msg=key)
    params = sorted(k.split("/", 2)[2] for k in probe if k.startswith("param64/1/"))
    for key in params:
        np.testing.assert_allclose(
            probe[f"param64/2/{key}"], probe[f"param64/1/{key}"], rtol=1e-6, atol=1e-7, err_msg=key
        )
    start, after = probe["start/decoder_0/attn/qkv/kernel"], probe["param64/1/decoder_0/attn/qkv/kernel"]
    assert np.abs(after - start).max() > 1e-4  # the steps moved the parameters (lr 2e-3 per step)
