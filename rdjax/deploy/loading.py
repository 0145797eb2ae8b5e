"""What rdjax.load reads besides the config and the teacher, checked: the student's
weights of a workdir's checkpoint or of a package, against the step its thresholds were
fitted on (`check_fitted`), and the category a package decides with."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax

from rdjax.errors import ConfigError, WorkdirError
from rdjax.runtime import disk, sharding
from rdjax.runtime import workdir as workdir_lib
from rdjax.scoring.thresholds import Calibration


def restore_student(
    workdir: Path, model: Any, mesh: jax.sharding.Mesh, step: int | None, calibrations: Calibration | None, fix: str
) -> tuple[int, Any]:
    """The student's step and variables, replicated on ``mesh``: a package's one step, or a
    workdir's checkpoint ``step`` (None: the latest), each checked against the thresholds'
    step (`check_fitted`)."""
    if workdir_lib.is_package(workdir):
        if step is not None:
            raise ConfigError(f"{workdir}: a package holds one step ({step} was asked for)")
        step, student_vars = workdir_lib.restore_package_student(workdir, model.abstract_variables()[1])
        check_fitted(workdir, step, calibrations, fix, asked=False)
        return step, jax.device_put(student_vars, sharding.replicated(mesh))
    asked = step is not None
    if not asked:  # the latest step: checked before its weights are hashed and read
        check_fitted(workdir, workdir_lib.latest_step(workdir), calibrations, fix, asked)
    step, student_vars = workdir_lib.restore_student(
        workdir, model.abstract_variables()[1], sharding.replicated(mesh), step
    )
    if asked:
        check_fitted(workdir, step, calibrations, fix, asked)
    return step, student_vars


def check_fitted(workdir: Path, step: int | None, calibrations: Calibration | None, fix: str, asked: bool) -> None:
    """Weights and thresholds of one step, or a WorkdirError naming both steps and ``fix``.

    A run killed after a checkpoint and before the evaluation that refits the thresholds,
    or one whose calibration runs every few checkpoints, leaves a latest step newer than
    calibration.json's: its thresholds were fitted on other weights' scores. Training
    cannot write the two together (an evaluation is not due at every checkpoint, and is
    the slow part a kill most likely interrupts), so readers refuse the pair instead.
    An older step asked for by name (``asked``, rdjax.load(workdir, step=N)) is the
    caller's choice: it loads, with a warning that the thresholds are another step's.
    No step (no checkpoint) is restore_student's error to report."""
    if calibrations is None or step is None or calibrations.step == step:
        return
    fitted = calibrations.step
    if asked:
        print(f"warning: {workdir}: step {step} is decided by thresholds fitted at step {fitted} "
              "(calibration.json)", file=sys.stderr)  # fmt: skip
        return
    held = "the package's student is" if workdir_lib.is_package(workdir) else "the latest checkpoint is"
    raise WorkdirError(
        f"{workdir}: {held} step {step}, but calibration.json was fitted at step {fitted}: "
        f"its thresholds belong to other weights; {fix}"
    )


def packaged_category(package: Path) -> str | None:
    """The category a package was made to decide with (`rdjax package --category`)."""
    path = package / "contract.json"
    contract = disk.read_json(path) if path.is_file() else {}
    if not isinstance(contract, dict) or not isinstance(contract.get("category"), (str, type(None))):
        raise WorkdirError(f"{path}: not a package's contract; {disk.DAMAGED}")
    return contract.get("category")
