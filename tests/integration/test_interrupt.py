"""Interruption: SIGKILL and resume equals an uninterrupted run, and two runs with one
seed agree exactly. (A non-finite loss is tested in-process, in test_train.py.)"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import ROOT, data_flags
from conftest import restore_state as restore

pytestmark = pytest.mark.slow


def command(config, workdir: Path, mode: str = "auto", checkpoint_every: int = 1) -> list[str]:
    """The CLI run of the shared trained workdir's config (3 epochs of 3 steps, each ending
    in a partial batch), with a
    checkpoint every ``checkpoint_every`` epochs, in feature-cache mode ``mode``."""
    return [
        sys.executable,
        "-m",
        "rdjax.main",
        *data_flags(Path(config.dataset.root)),
        f"--workdir={workdir}",
        f"--config.num_epochs={config.num_epochs}",
        f"--config.batch_size={config.batch_size}",
        f"--config.eval_every={config.eval_every}",
        f"--config.checkpoint_every={checkpoint_every}",
        f"--config.feature_cache={mode}",
    ]


def finished_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


@pytest.mark.parametrize("mode", ["auto", "disk", "off"])
def test_sigkill_then_resume_equals_uninterrupted(trained, trained_off, tmp_path, mode):
    """Killed after its first checkpoint and run again, the CLI run ends with the same
    parameters, optimizer state and metrics, bit for bit, as the uninterrupted run of
    the same config, trained in-process: for 'auto' (memory here) and 'disk' the shared
    trained workdir (memory: so 'disk' also trains exactly what 'memory' does), for 'off'
    the shared 'off' run."""
    config, uninterrupted, _ = trained_off if mode == "off" else trained
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(
        command(config, workdir, mode), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not finished_steps(workdir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = finished_steps(workdir)
    assert steps and steps[-1] < 9, "the run was not killed mid-training"
    restore(workdir)  # the latest complete checkpoint is readable right after the kill
    resumed = subprocess.run(command(config, workdir, mode), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step" in resumed.stdout
    if mode == "disk":  # the killed run's complete cache is read back, not recomputed
        assert "feature cache: reusing" in resumed.stdout
        assert not (workdir / "feature_cache").exists()  # and removed once training is done
    (a, step_a), (b, step_b) = restore(uninterrupted), restore(workdir)
    assert step_a == step_b == 9  # 16 images, batch 6 (6 + 6 + 4), 3 epochs
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.opt_state, b.opt_state)
    # Two runs with the same seed (one of them killed and resumed) give identical metrics.
    ma, mb = (json.loads((w / "metrics.json").read_text()) for w in (uninterrupted, workdir))
    assert ma["seed"] == mb["seed"] == 111
    for key in ("image_auroc", "pixel_auroc", "aupro", "pro_rd4ad_per_image", "image_f1_max"):
        assert ma[key] == mb[key]


def test_ctrl_c_says_where_to_resume_and_the_resume_equals_uninterrupted(trained, tmp_path):
    """SIGINT (Ctrl-C) once the first epoch is done, with no checkpoint due before the
    last epoch: one line on stderr saying where a rerun resumes, no traceback, exit
    status 130, and a checkpoint written at the interrupt (within an epoch when the press
    came during its steps). The rerun continues from it and ends with the parameters,
    optimizer state and metrics of the uninterrupted run, bit for bit."""
    config, uninterrupted, _ = trained
    workdir = tmp_path / "stopped"
    proc = subprocess.Popen(
        command(config, workdir, checkpoint_every=10), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if "epoch 1: loss" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert "[disk] epoch 1: loss" in line  # every line names its category
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = err.strip().splitlines()[-1]
    steps = finished_steps(workdir)
    assert len(steps) == 1 and 3 <= steps[0] < 9, steps  # saved at the interrupt, after epoch 1
    epoch, within = divmod(steps[0], 3)
    resume = f"epoch {epoch + 1}" + (f", step {steps[0]}" if within else "")
    assert re.fullmatch(rf"interrupted at epoch [123]; rerun the same command to resume from {resume}", last), last
    resumed = subprocess.run(command(config, workdir, checkpoint_every=10), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {steps[0]}" in resumed.stdout
    (a, step_a), (b, step_b) = restore(uninterrupted), restore(workdir)
    assert step_a == step_b == 9
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.opt_state, b.opt_state)
    ma, mb = (json.loads((w / "metrics.json").read_text()) for w in (uninterrupted, workdir))
    for key in ("image_auroc", "pixel_auroc", "aupro", "pro_rd4ad_per_image", "image_f1_max"):
        assert ma[key] == mb[key]
