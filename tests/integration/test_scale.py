"""Scale-out: two processes against one, checkpoint portability between topologies, and
bfloat16. (Device-count invariance of training steps is in test_invariance.py.)"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rdjax
from rdjax import registry
from rdjax.data.preprocess import Recipe
from rdjax.models import MapRecipe
from rdjax.models.rd4ad import RD4AD
from rdjax.scoring import maps, metrics

from conftest import ROOT, assert_auroc_within, cpu_devices_env, data_flags, rdjax_cli, restore_state, small_config


@pytest.fixture(scope="module")
def synth_root(synthetic_data):
    return synthetic_data()


def _cli(synth_root: Path, workdir: Path, devices: int, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "rdjax.main",
        *data_flags(synth_root),
        "--config.eval_batch_size=8",
        f"--workdir={workdir}",
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=cpu_devices_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def _train_both(synth_root: Path, base: Path, *extra: str) -> dict:
    """The same config trained through the CLI with 2 devices in one process, and
    with two processes (jax.distributed on localhost, CPU collectives) of one device each."""
    out: dict = {}
    _finish(_cli(synth_root, base / "d2", 2, *extra))
    out["d2"] = base / "d2"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        _cli(
            synth_root,
            base / "p2",
            1,
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            *extra,
        )
        for i in range(2)
    ]
    out["stdout"] = [_finish(p) for p in procs]
    out["p2"] = base / "p2"
    return out


@pytest.fixture(scope="module")
def runs(synth_root, tmp_path_factory):
    return _train_both(synth_root, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def unified_runs(synthetic_data, tmp_path_factory):
    """One model over two categories (config.setting='unified'), trained both ways; 32
    images at batch 6, so every epoch ends in a partial batch of 2 rows, both in the first
    process's columns: the second feeds padding alone."""
    root = synthetic_data(categories=("disk", "weave"))
    flags = ("--config.setting=unified", "--config.dataset.category=all", "--config.batch_size=6")
    return _train_both(root, tmp_path_factory.mktemp("unified_runs"), *flags)


def check_two_processes(runs: dict, categories: int, model: dict | None = None) -> None:
    """The two-process run of `_train_both` equals its one-process twin: bit-identical
    train state (``model``: restore_state's arch and name), identical metrics (the top
    level and each of ``categories`` > 1 categories) and calibration."""
    model = model or {}
    one, two = restore_state(runs["d2"], **model)[0], restore_state(runs["p2"], **model)[0]
    for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(two)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    m1, m2 = (json.loads((runs[n] / "metrics.json").read_text()) for n in ("d2", "p2"))
    parts = [(m1, m2)] + [(m1["categories"][c], m2["categories"][c]) for c in m1.get("categories", {})]
    assert len(parts) == (categories + 1 if categories > 1 else 1)
    for i, (a, b) in enumerate(parts):  # the unified top level holds means, no image count
        keys = ("image_auroc", "pixel_auroc", "aupro", "pro_rd4ad_per_image", "image_f1_max")
        for key in keys + (("num_images",) if i or categories == 1 else ()):
            assert b[key] == a[key], key
    cal1, cal2 = (json.loads((runs[n] / "calibration.json").read_text()) for n in ("d2", "p2"))
    assert cal2 == cal1


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["runs", "unified_runs"])
def test_two_processes_equal_one_process(setting, request):
    """Two processes of one device each (jax.distributed, CPU collectives) compute exactly
    what one process with two devices computes: bit-identical state, identical metrics;
    in the unified setting too, where the lanes run over the union of the categories,
    each epoch ends in a partial batch, and each category's metrics are gathered apart
    (Dinomaly's: tests/integration/test_dinomaly_scale.py)."""
    check_two_processes(request.getfixturevalue(setting), 2 if setting == "unified_runs" else 1)


@pytest.mark.slow
def test_each_process_decodes_only_its_share(runs):
    """16 training images, batch 8: each of the two processes owns the rows of its 4
    lanes (8 images) and decodes each once, to fill its feature cache; the 13 test
    images are 2 global batches of 8 (the last padded), 4 rows of each per process."""
    for i, out in enumerate(runs["stdout"]):
        line = next(x for x in out.splitlines() if x.startswith(f"process {i} of 2: decoded"))
        assert line == f"process {i} of 2: decoded 8 training and 8 test images", line


@pytest.mark.slow
def test_checkpoints_move_between_topologies(runs, synth_root, tmp_path):
    """Saved on 2 devices, evaluated on 8 (a subprocess) and on 1 (this process): the
    same metrics. Every evaluation's float32 maps differ from a recomputation here only
    by summation order (conftest.RECOMPUTED), so each run's image and pixel AUROC must lie
    in the range the recomputed maps allow; AUPRO, a sum over thresholds of such pixel
    fractions, is held to 1e-3, the binned-metrics bound, far above what near-tied pixels
    can move."""
    import shutil

    before = json.loads((runs["d2"] / "metrics.json").read_text())
    _, test = registry.build_dataset(small_config(synth_root).dataset).load("disk", Recipe(size=64))
    maps, scores = rdjax.load(runs["d2"]).predict_resized(test.images())
    for devices in (8, 1):
        workdir = tmp_path / f"on{devices}"
        shutil.copytree(runs["d2"], workdir)
        if devices == 1:
            result = rdjax_cli("eval", *data_flags(synth_root), "--config.eval_batch_size=8", f"--workdir={workdir}")
            assert result.code == 0, result.stderr[-3000:]
        else:
            _finish(_cli(synth_root, workdir, devices, "--mode=eval"))
        after = json.loads((workdir / "metrics.json").read_text())
        assert after["step"] == before["step"]
        for result in (before, after) if devices == 8 else (after,):
            assert_auroc_within(result["image_auroc"], test.labels, scores)
            assert_auroc_within(result["pixel_auroc"], test.masks(), maps)
            assert result["aupro"] == pytest.approx(metrics.aupro(maps, test.masks()), abs=1e-3), devices


def check_bfloat16_maps(model32: Any, model16: Any, size: int) -> None:
    """Within 5% of the largest map value (bf16 keeps 8 significant bits; a ResNet-18
    forward, or a small ViT's blocks and Dinomaly's student, stacks a few dozen such
    roundings, partly cancelling) and ranked alike."""
    teacher_vars, student_vars = model32.init(jax.random.key(0), size)
    images = jax.random.randint(jax.random.key(1), (4, size, size, 3), 0, 256).astype(jnp.uint8)
    maps32, _ = maps.make_eval_step(model32, MapRecipe())(teacher_vars, student_vars, images)
    maps16, _ = maps.make_eval_step(model16, MapRecipe())(teacher_vars, student_vars, images)
    assert maps16.dtype == jnp.float32  # maps stay float32 whatever the compute dtype
    rel = float(jnp.max(jnp.abs(maps16 - maps32)) / jnp.max(jnp.abs(maps32)))
    assert rel < 0.05
    # The ranking of pixels, which is what every metric uses, barely moves.
    corr = np.corrcoef(np.asarray(maps16).ravel(), np.asarray(maps32).ravel())[0, 1]
    assert corr > 0.99


@pytest.mark.slow
def test_bfloat16_maps_stay_close_to_float32():
    """RD4AD's (Dinomaly's: tests/integration/test_dinomaly_scale.py)."""
    check_bfloat16_maps(RD4AD("resnet18"), RD4AD("resnet18", dtype="bfloat16"), 64)
