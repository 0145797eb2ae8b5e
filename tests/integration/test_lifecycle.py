"""A workdir's life after training (issue 33): an evaluation keeps the results it replaces,
a rerun of a finished run says what it does (nothing, when its results are current), a
Ctrl-C names an epoch that exists, and only the latest checkpoint keeps the optimizer
state. All through the command line, on copies of the shared trained workdir."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import rdjax
from rdjax.runtime import workdir as workdir_lib
from rdjax.train import loop

from conftest import ROOT, data_flags, rdjax_cli, restore_state, subprocess_run

pytestmark = pytest.mark.slow  # evaluations and training: the fast tier has no time left


def flags(config) -> list[str]:
    """The command line of the shared trained run (conftest._shared_run)."""
    return [
        *data_flags(Path(config.dataset.root)),
        f"--config.num_epochs={config.num_epochs}",
        f"--config.batch_size={config.batch_size}",
        f"--config.eval_every={config.eval_every}",
    ]


def files(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (relative path) -> the SHA-256 of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """files(), with each file's modification time: what a run that writes nothing keeps."""
    return {k: ((folder / k).stat().st_mtime_ns, v) for k, v in files(folder).items()}


def test_eval_keeps_the_results_it_replaces(trained, tmp_path):
    """`rdjax eval` with another evaluation setting: the previous calibration.json,
    metrics.json, results.md and eval/epoch_0003/ move, byte for byte, to history/1
    (the next evaluation's to history/2), and the output says where."""
    _, trained_dir, _ = trained
    workdir = tmp_path / "w"
    shutil.copytree(trained_dir, workdir)
    top = ("calibration.json", "metrics.json", "results.md")
    before = {name: (workdir / name).read_bytes() for name in top}
    evaluation = files(workdir / "eval" / "epoch_0003")
    assert "report.html" in evaluation and "metrics.json" in evaluation
    for n, ratio in ((1, "0.01"), (2, "0.02")):
        out = rdjax_cli("eval", f"--workdir={workdir}", f"--config.max_ratio={ratio}")
        assert out.code == 0, out.stderr[-3000:]
        kept = workdir / "history" / str(n)
        line = f"the previous calibration.json, metrics.json, results.md, eval/epoch_0003/ are kept in {kept}"
        assert line in out.stdout, out.stdout
        assert sorted(p.name for p in kept.iterdir()) == ["calibration.json", "eval", "metrics.json", "results.md"]
        assert {name: (kept / name).read_bytes() for name in top} == before
        assert files(kept / "eval" / "epoch_0003") == evaluation
        before = {name: (workdir / name).read_bytes() for name in top}
        evaluation = files(workdir / "eval" / "epoch_0003")
        assert json.loads(before["calibration.json"])["max_ratio"] == float(ratio)
    assert sorted(p.name for p in (workdir / "history").iterdir()) == ["1", "2"]


def test_a_rerun_of_a_finished_run_says_what_it_does_and_ctrl_c_names_a_real_epoch(trained, tmp_path, monkeypatch):
    """The trained run's own command again: its results are current, so it writes nothing
    and says so. With an evaluation setting changed (eval_batch_size) it trains nothing
    and says it evaluates again, never 'resuming'; Ctrl-C during that evaluation names
    the last epoch the run has (train_log.json's), not one after it; the rerun then
    evaluates, keeping the old results in history/1, and a third run has nothing to do."""
    config, trained_dir, result = trained
    workdir = tmp_path / "w"
    shutil.copytree(trained_dir, workdir)
    command = ("train", f"--workdir={workdir}", *flags(config))
    before = snapshot(workdir)
    out = rdjax_cli(*command)
    assert out.code == 0, out.stderr[-3000:]
    assert f"[disk] trained to step 9 and evaluated with these settings ({workdir / 'eval' / 'epoch_0003'}): " \
        "nothing to do; `rdjax eval` evaluates again" in out.stdout  # fmt: skip
    assert "resuming" not in out.stdout
    assert f"disk: image AUROC {result['image_auroc']:.4f}" in out.stdout  # the stored result, printed
    assert snapshot(workdir) == before

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # what a press does outside a step (StopRequest)

    monkeypatch.setattr(loop, "evaluate_student", stopped)
    out = rdjax_cli(*command, "--config.eval_batch_size=4")
    assert out.code == 130, out.stderr[-3000:]
    assert "[disk] trained to step 9 already: evaluating it again, no training (config.eval_batch_size is 4, " \
        "eval/epoch_0003 was evaluated with 16)" in out.stdout  # fmt: skip
    assert "resuming" not in out.stdout
    epochs = [e["epoch"] for e in json.loads((workdir / "train_log.json").read_text())]
    assert epochs == [1, 2, 3]
    last = out.stderr.strip().splitlines()[-1]
    assert last == (
        "interrupted after the last epoch (3, step 9), before its evaluation ended; the training is complete: "
        "rerun the same command to evaluate it"
    )
    assert [int(e) for e in re.findall(r"epoch \(?(\d+)", last)] == [epochs[-1]]  # one that exists
    monkeypatch.undo()
    out = rdjax_cli(*command, "--config.eval_batch_size=4")
    assert out.code == 0, out.stderr[-3000:]
    assert "evaluating it again, no training" in out.stdout and "resuming" not in out.stdout
    assert files(workdir / "history" / "1" / "eval" / "epoch_0003") == files(trained_dir / "eval" / "epoch_0003")
    evaluated = json.loads((workdir / "metrics.json").read_text())
    assert evaluated["step"] == 9 and evaluated["image_auroc"] == result["image_auroc"]
    before = snapshot(workdir)
    out = rdjax_cli(*command, "--config.eval_batch_size=4")
    assert out.code == 0 and "nothing to do" in out.stdout, out.stderr[-3000:]
    assert snapshot(workdir) == before


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_only_the_latest_checkpoint_keeps_the_optimizer_state(trained, tmp_path):
    """Trained on to epoch 5 with a checkpoint each epoch (steps 9, 12, 15 kept): step 15,
    the one a resume reads, holds the optimizer state; 9 and 12 hold the student alone,
    no more bytes than its float32 variables (Adam's two moments would add twice the
    parameters). An older step still predicts; resumed from (the latest removed), it is
    refused in one line."""
    config, trained_dir, _ = trained
    workdir = tmp_path / "w"
    shutil.copytree(trained_dir, workdir)
    out = rdjax_cli("train", f"--workdir={workdir}", *flags(config), "--config.num_epochs=5",
                    "--config.checkpoint_every=1")  # fmt: skip
    assert out.code == 0, out.stderr[-3000:]
    assert "resuming from step 9 (epoch 3)" in out.stdout
    folder = workdir / "checkpoints"
    assert sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) == [9, 12, 15]
    items = {step: sorted(p.name for p in (folder / str(step)).iterdir() if p.is_dir()) for step in (9, 12, 15)}
    assert items == {9: ["state"], 12: ["state"], 15: ["opt_state", "state"]}
    params, student = _student_bytes()  # float32 bytes; orbax compresses them somewhat
    for step in (9, 12):  # the student alone: no room for Adam's two moments
        assert size(folder / str(step)) <= student + 2**20
    assert size(folder / "15" / "opt_state") >= params  # two moments of params' size, compressed at most twice
    state, latest = restore_state(workdir)
    assert latest == 15 and int(state.step) == 15
    older = rdjax.load(workdir, step=12)
    assert older.step == 12 and np.isfinite(older.predict(np.zeros((64, 64, 3), np.uint8)).scores).all()
    shutil.rmtree(folder / "15")
    error = rdjax_cli("train", f"--workdir={workdir}", *flags(config), "--config.num_epochs=6").error_line()
    assert error == (
        f"error: {folder / '12'}: this older checkpoint has no optimizer state (only the latest keeps it), "
        "so it can be evaluated but not resumed from"
    )


def _student_bytes() -> tuple[int, int]:
    """(parameters, parameters and BatchNorm statistics) of the trained run's student
    (ResNet-18 RD4AD), in bytes of float32."""
    from rdjax.registry import MODELS

    student = MODELS.get("rd4ad")("resnet18").abstract_variables()[1]
    count = lambda tree: sum(x.size * 4 for x in jax.tree_util.tree_leaves(tree))
    return count(student["params"]), count(student)


def test_a_workdir_from_before_the_split_still_restores(trained, tmp_path):
    """Workdirs written before the optimizer state became an item of its own hold it in
    'state': a resume (restore_state) reads the whole train state from it, and predict
    the student, as from the same checkpoint in today's format."""
    _, trained_dir, _ = trained
    workdir = tmp_path / "w"
    shutil.copytree(trained_dir, workdir, ignore=shutil.ignore_patterns("checkpoints"))
    state, step = restore_state(trained_dir)
    with workdir_lib.checkpoint_manager(workdir) as manager:  # the format of rdjax 0.7
        whole = ocp.args.StandardSave(flax.serialization.to_state_dict(state))
        manager.save(step, args=ocp.args.Composite(state=whole))
        manager.wait_until_finished()
    assert sorted(p.name for p in (workdir / "checkpoints" / "9").iterdir() if p.is_dir()) == ["state"]
    old, old_step = restore_state(workdir)
    assert old_step == step == 9
    jax.tree_util.tree_map(np.testing.assert_array_equal, old.params, state.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, old.opt_state, state.opt_state)
    image = np.zeros((64, 64, 3), np.uint8)
    np.testing.assert_array_equal(
        rdjax.load(workdir).predict(image).scores, rdjax.load(trained_dir).predict(image).scores
    )


def test_the_readme_opens_with_the_demo_and_the_tests_and_ci_runs_the_second(synthetic_data, tmp_path):
    """Set-up is two commands: the README's first block is the demo script and the test
    script, CI runs the test script, and the demo script, run as a user runs it (from
    another folder, its arguments after the demo's own), sets up (here: finds .venv set
    up, the test script having done it) and trains and evaluates."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block is not None and readme.index(block.group(0)) < readme.index("\n## ")  # before any section
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["./scripts/demo.sh", "./scripts/test.sh"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "exec scripts/test.sh"
    root = synthetic_data()
    proc = subprocess_run(
        str(ROOT / "scripts" / "demo.sh"), f"--workdir={tmp_path / 'demo'}", *data_flags(root)[1:], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "disk: image AUROC" in proc.stdout and (tmp_path / "demo" / "metrics.json").is_file()
