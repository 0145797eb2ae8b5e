"""The workdir: its layout, the config, the teacher and checkpoints, and packages.

A workdir is self-describing, so evaluation, prediction and export need nothing else:
  config.json     the full config;
  teacher/        the frozen teacher, saved once (orbax: 'variables' + 'meta' JSON);
  checkpoints/N/  orbax CheckpointManager steps: item 'state' {step, params, batch_stats}
                  and item 'opt_state', the optimizer's state, which only the latest step
                  keeps (a resume needs no other; older workdirs hold it in 'state');
  calibration.json, metrics.json, results.md, eval/, train_log.json: see docs/config.md;
  history/<n>/    what an evaluation replaced (keep_results).
Every file is written atomically (a temporary name, then a rename), and orbax renames a
checkpoint into place when complete, so a killed run never leaves a half-written file;
what a kill leaves under a temporary name is removed by the next run
(rdjax.runtime.disk: atomic writes, remove_leftovers, the checksums).

Each folder of weights (teacher/, a checkpoint's step folder, a package's student/)
holds sha256.json, the SHA-256 of every file orbax wrote into it, and every reader
verifies the files it reads against it (disk.verify_checksums): a flipped byte or a copy cut
short is one line naming the file, never scores from damaged weights. A folder written
before rdjax recorded checksums has none and is read unverified, as it always was.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from rdjax import config as config_lib
from rdjax.errors import WorkdirError
from rdjax.runtime.disk import read_json, reading, record_checksums, verify_checksums, write_text
from rdjax.runtime.state import create_train_state

TEACHER_FORMAT = "rdjax-teacher-v1"
CONFIG = "config.json"
TEACHER = "teacher"
CHECKPOINTS = "checkpoints"
CALIBRATION = "calibration.json"
OPT_STATE = "opt_state"  # a checkpoint's optimizer item (save_state)
HISTORY = "history"
STUDENT = "student"  # a package's (rdjax.deploy.package) trained variables, without optimizer state
PACKAGE_FORMAT = "rdjax-package-v1"


def _abs(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


# ----------------------------------------------------------------------------- history

KEPT = (CALIBRATION, "metrics.json", "results.md")  # the workdir's current results, beside eval/


def keep_results(workdir: Path, evaluation: Path) -> Path | None:
    """Before an evaluation writes its results: move ``evaluation`` (its eval/epoch_NNNN,
    where an earlier evaluation of that epoch left one), with copies of the workdir's
    current calibration.json, metrics.json and results.md, to history/<n> (n = 1, 2, ...,
    the oldest first), so that no evaluation replaces another's results without a trace.
    Returns history/<n>, or None where there was nothing to keep."""
    present = [name for name in KEPT if (workdir / name).is_file()]
    if not present and not evaluation.is_dir():
        return None
    folder = workdir / HISTORY
    n = 1 + max((int(p.name) for p in folder.glob("*") if p.name.isdigit()), default=0)
    target, staging = folder / str(n), folder / f".{n}.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # a copy a kill cut short
    staging.mkdir(parents=True)
    for name in present:
        shutil.copy2(workdir / name, staging / name)
    os.replace(staging, target)  # then the folder: a kill in between leaves it where it was
    if evaluation.is_dir():
        moved = target / evaluation.relative_to(workdir)
        moved.parent.mkdir(parents=True)
        os.replace(evaluation, moved)
    return target


# ----------------------------------------------------------------------------- config


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    write_text(_abs(workdir) / CONFIG, config.to_json_best_effort(indent=2, sort_keys=True))


def categories(workdir: str | os.PathLike) -> list[str]:
    """The per-category workdirs a run over several categories made below ``workdir``."""
    folder = _abs(workdir)
    return sorted(p.parent.name for p in folder.glob(f"*/{CONFIG}")) if folder.is_dir() else []


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The workdir's config, with keys added since it was written set to their defaults."""
    path = _abs(workdir) / CONFIG
    if not path.is_file():
        several = categories(workdir)
        if several:
            raise WorkdirError(f"{_abs(workdir)} holds one workdir per category ({', '.join(several)}); "
                               f"pass one of them, e.g. {_abs(workdir) / several[0]}")  # fmt: skip
        raise WorkdirError(f"{path}: no config.json; is this an rdjax workdir?")
    return config_lib.from_dict(read_json(path))


def saved_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a workdir was trained with, to evaluate it again: its own config.json,
    or for a run over several categories, the categories' config with the categories it
    holds as the list (not 'all': the root may hold others, never trained); one category
    is 'all', since a list of one would name the folder itself as the workdir."""
    if (_abs(workdir) / CONFIG).is_file() or not categories(workdir):
        return load_config(workdir)
    held = categories(workdir)
    config = load_config(_abs(workdir) / held[0])
    config.dataset.category = ",".join(held) if len(held) > 1 else "all"
    return config


# ----------------------------------------------------------------------------- teacher


def _save_tagged(directory: str | os.PathLike, variables: Any, meta: dict) -> None:
    """Variables (host numpy arrays) and a JSON tag saying what they are: the one format
    of a teacher and of a package's student."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            _abs(directory),
            args=ocp.args.Composite(variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)),
        )
    record_checksums(_abs(directory))


def _restore_tagged(path: Path, fmt: str, what: str) -> tuple[Any, dict]:
    """(variables, tag) saved by _save_tagged, its files verified first; a WorkdirError
    unless the tag's format is ``fmt``."""
    verify_checksums(path)
    with reading(path, what), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(
            path, args=ocp.args.Composite(variables=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        )
    meta = restored["meta"] if isinstance(restored["meta"], dict) else {}
    if meta.get("format") != fmt:
        raise WorkdirError(f"{path}: not {what}")
    return restored["variables"], meta


def save_teacher(directory: str | os.PathLike, arch: str, teacher_vars: Any) -> None:
    """Write the teacher as an orbax checkpoint that any host can read without torch.

    Saved as host numpy arrays: identical on every process, written once by the primary.
    """
    _save_tagged(directory, jax.tree_util.tree_map(np.asarray, teacher_vars), {"format": TEACHER_FORMAT, "arch": arch})


def restore_teacher(directory: str | os.PathLike, arch: str) -> Any:
    """The teacher variables in ``directory``; a WorkdirError if it holds another architecture."""
    path = _abs(directory)
    if not path.is_dir():
        raise WorkdirError(f"{path}: no teacher checkpoint")
    variables, meta = _restore_tagged(path, TEACHER_FORMAT, "an rdjax teacher checkpoint")
    if meta["arch"] != arch:
        raise WorkdirError(f"{path}: holds a {meta['arch']} teacher, but the model is {arch}")
    return variables


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str | os.PathLike, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    """``create=False`` for readers: a mistyped workdir is an error, not a new empty folder."""
    directory = _abs(workdir) / CHECKPOINTS
    if not create and not directory.is_dir():
        raise WorkdirError(f"{directory}: no checkpoint")
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create))


def save_state(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Save ``state`` as step ``step``, record its checksums (both items: a resume reads
    the optimizer state too), then drop the optimizer state of every older step: a resume
    needs only the latest, and the optimizer state is most of a checkpoint's size (Adam's
    two moments: twice the parameters). The dropped item's checksums stay recorded;
    readers verify only the items they read."""
    tree = flax.serialization.to_state_dict(state)
    optimizer = tree.pop(OPT_STATE)
    manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), opt_state=ocp.args.StandardSave(optimizer))
    )
    manager.wait_until_finished()
    record_checksums(Path(manager.directory) / str(step))
    if jax.process_index() == 0 and (Path(manager.directory) / str(step) / OPT_STATE).is_dir():  # saved: else keep
        for older in manager.all_steps():
            if older != step:
                _drop_optimizer(Path(manager.directory) / str(older))


def _drop_optimizer(step_dir: Path) -> None:
    """Remove a checkpoint's optimizer item: renamed first, so it is present whole or not
    at all; a removal cut short leaves only the renamed folder, removed next time."""
    if (step_dir / OPT_STATE).is_dir():
        os.replace(step_dir / OPT_STATE, step_dir / f".{OPT_STATE}.removed")
    shutil.rmtree(step_dir / f".{OPT_STATE}.removed", ignore_errors=True)


def restore_state(manager: ocp.CheckpointManager, template: Any, step: int | None = None) -> Any:
    """Restore into the structure (and shardings) of ``template``; latest step by default.
    A WorkdirError for a step whose optimizer state was dropped (save_state)."""
    step = manager.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, flax.serialization.to_state_dict(template))
    step_dir = Path(manager.directory) / str(step)
    if (step_dir / OPT_STATE).is_dir():
        verify_checksums(step_dir, ("state", OPT_STATE))
        student = {k: v for k, v in abstract.items() if k != OPT_STATE}
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(student), opt_state=ocp.args.StandardRestore(abstract[OPT_STATE])
        )
        with reading(step_dir, "the checkpoint"):
            restored = manager.restore(step, args=args)
        return flax.serialization.from_state_dict(template, {**restored["state"], OPT_STATE: restored[OPT_STATE]})
    verify_checksums(step_dir, ("state",))
    with reading(step_dir, "the checkpoint"):
        if OPT_STATE not in ocp.StandardCheckpointHandler().metadata(step_dir / "state").tree:
            raise WorkdirError(
                f"{step_dir}: this older checkpoint has no optimizer state (only the "
                "latest keeps it), so it can be evaluated but not resumed from"
            )
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return flax.serialization.from_state_dict(template, restored["state"])  # an older workdir's


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The workdir's latest checkpoint step (None: none), read from the folder names alone."""
    with checkpoint_manager(workdir, create=False) as manager:
        return manager.latest_step()


def restore_student(
    workdir: str | os.PathLike, student_shapes: Any, sharding: jax.sharding.Sharding, step: int | None = None
) -> tuple[int, Any]:
    """(step, student variables) of a checkpoint, without the optimizer state: evaluation
    and inference need no optimizer, so they never build one. Its 'state' item is
    verified first (verify_checksums)."""
    with checkpoint_manager(workdir, create=False) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise WorkdirError(f"{_abs(workdir) / CHECKPOINTS}: no checkpoint")
        if step not in manager.all_steps():
            steps = ", ".join(map(str, manager.all_steps())) or "none"
            raise WorkdirError(f"{_abs(workdir) / CHECKPOINTS}: no step {step} (its steps: {steps})")
        target = {
            "step": jax.ShapeDtypeStruct((), np.int32, sharding=sharding),
            **{
                k: jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), v)
                for k, v in student_shapes.items()
            },
        }
        args = ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
        step_dir = Path(manager.directory) / str(step)
        verify_checksums(step_dir, ("state",))
        with reading(step_dir, "the checkpoint"):
            restored = manager.restore(step, args=ocp.args.Composite(state=args))["state"]
    return int(restored["step"]), {k: restored[k] for k in student_shapes}


# ----------------------------------------------------------------------------- packages


def is_package(path: str | Path) -> bool:
    return (Path(path) / STUDENT).is_dir()


def _cast(tree: Any, dtype: str) -> Any:
    """Floating leaves to ``dtype`` (integer leaves, e.g. counters, stay)."""
    return jax.tree_util.tree_map(
        lambda a: np.asarray(jnp.asarray(a, dtype)) if jnp.issubdtype(a.dtype, jnp.floating) else np.asarray(a), tree
    )


def save_student(directory: Path, step: int, student_vars: Any, weights_dtype: str) -> None:
    meta = {"format": PACKAGE_FORMAT, "step": step, "weights_dtype": weights_dtype}
    _save_tagged(directory, _cast(student_vars, weights_dtype), meta)


def restore_package_student(package: Path, student_shapes: Any) -> tuple[int, Any]:
    """(step, student variables) of a package, cast to the shapes' dtypes (float32)."""
    path = (Path(package) / STUDENT).resolve()
    restored, meta = _restore_tagged(path, PACKAGE_FORMAT, "an rdjax package's student")
    variables = {k: restored[k] for k in student_shapes}
    as_shapes = jax.tree_util.tree_map(lambda a, s: jnp.asarray(a, s.dtype), variables, dict(student_shapes))
    return int(meta["step"]), as_shapes


def write_ported(out: Path, config: ml_collections.ConfigDict, tx: Any, teacher_vars: Any, student_vars: Any) -> None:
    """A workdir holding a model trained elsewhere (rdjax port). Its checkpoint has the
    train state's format with a fresh optimizer state, so it also resumes like one
    trained here."""
    state = create_train_state(jax.tree_util.tree_map(jnp.asarray, student_vars), tx)
    save_teacher(out / TEACHER, config.model.arch, teacher_vars)
    with checkpoint_manager(out, config.keep_checkpoints) as manager:
        save_state(manager, 0, state)
    save_config(out, config)
