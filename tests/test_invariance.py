"""Device-count invariance: one float32 step and four float64 steps on 1, 2, 4 and 8 CPU
devices, computed by tests/scale_probe.py in a subprocess with 8 host devices.

Kept apart from test_scale.py so that the two long module fixtures can run on different
pytest-xdist workers."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, cpu_devices_env
from rdjax.models import RD4AD


def _run_probe(tmp_path_factory, *args: str) -> dict:
    out = tmp_path_factory.mktemp("probe") / "probe.npz"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scale_probe.py"), str(out), *args],
                          cwd=ROOT, env=dict(cpu_devices_env(8), PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return _run_probe(tmp_path_factory)


@pytest.fixture(scope="module")
def probe64(tmp_path_factory):
    return _run_probe(tmp_path_factory, "--steps", "4")


@pytest.mark.parametrize("n", [2, 4, 8])
def test_n_steps_are_invariant_to_the_device_count(probe64, n):
    """Four Adam steps on four batches from the same state: the parameters and BatchNorm
    statistics on 2, 4 and 8 devices equal those on 1 device within float32 tolerance.

    The run is in float64 so that the only differences left are those of the computation
    itself (sharded forward, global BatchNorm statistics, gradient all-reduce) rather than
    float32 summation-order noise, which Adam's sign-like early steps amplify (see
    the one-step test below and README, Scaling)."""
    keys = [k.split("/", 2)[2] for k in probe64 if k.startswith("param64/1/")]
    assert keys and probe64[f"param64/1/{keys[0]}"].dtype == np.float64
    for kind in ("param64", "stats64"):
        for key in (k.split("/", 2)[2] for k in probe64 if k.startswith(f"{kind}/1/")):
            one, many = probe64[f"{kind}/1/{key}"], probe64[f"{kind}/{n}/{key}"]
            np.testing.assert_allclose(many, one, rtol=1e-6, atol=1e-7, err_msg=f"{kind}/{key}")
    # Four steps did move the parameters, by far more than the tolerance.
    _, student = RD4AD("resnet18").init(jax.random.key(0), 64)
    start = np.asarray(student["params"]["decoder"]["layer1_0"]["conv2"]["kernel"])
    assert np.abs(probe64["param64/1/decoder/layer1_0/conv2/kernel"] - start).max() > 1e-3


@pytest.mark.parametrize("n", [2, 4, 8])
def test_one_step_is_invariant_to_the_device_count(probe, n):
    """Loss and gradients of the same state and global batch agree across 1, 2, 4 and 8
    devices to float32 reduction-order noise, BatchNorm using global batch statistics.

    After the Adam step the parameters agree too, except where the gradient itself is at
    the level of that noise (|g| <= 1e-3 max|g|): Adam's first step moves every entry by about
    lr * sign(g), so noise-level gradients may move either way. Over many steps such
    differences compound, which is why longer runs on different device counts are not
    bit-identical (see README, Scaling)."""
    assert float(probe[f"loss/{n}"]) == pytest.approx(float(probe["loss/1"]), rel=1e-6)
    grads = sorted(k.split("/", 2)[2] for k in probe if k.startswith("grad/1/"))
    assert grads
    for key in grads:
        g1, gn = probe[f"grad/1/{key}"], probe[f"grad/{n}/{key}"]
        np.testing.assert_allclose(gn, g1, rtol=1e-3, atol=1e-4 * np.abs(g1).max(), err_msg=key)
        p1, pn = probe[f"param/1/{key}"], probe[f"param/{n}/{key}"]
        off = ~np.isclose(pn, p1, rtol=1e-5, atol=1e-6)
        assert np.all(np.abs(g1[off]) <= 1e-3 * np.abs(g1).max()), key  # noise-level gradients only
        assert off.mean() < 1e-2, key
