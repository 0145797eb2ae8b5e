"""Workdir and checkpoint layout, shared by training, evaluation, the port and rdjax.load.

A workdir is self-describing:
  config.json     the full config (ml_collections), so no flags are needed to restore;
  teacher/        the frozen teacher, saved once (orbax: 'variables' + 'meta' JSON);
  checkpoints/N/  orbax CheckpointManager steps holding the train state.
Orbax writes each checkpoint to a temporary directory and renames it when complete,
so a killed save never becomes the latest checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np
import ml_collections
import orbax.checkpoint as ocp

TEACHER_FORMAT = "rdjax-teacher-v1"


def _abs(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def save_teacher(directory: str | os.PathLike, arch: str, teacher_vars: Any) -> None:
    """Write the teacher as an orbax checkpoint that any host can read without torch.

    Saved as host numpy arrays: identical on every process, written once by the primary.
    """
    teacher_vars = jax.tree_util.tree_map(np.asarray, teacher_vars)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            _abs(directory),
            args=ocp.args.Composite(
                variables=ocp.args.StandardSave(teacher_vars),
                meta=ocp.args.JsonSave({"format": TEACHER_FORMAT, "arch": arch}),
            ),
        )


def restore_teacher(directory: str | os.PathLike) -> tuple[str, Any]:
    """(arch, teacher variables) from a directory written by save_teacher."""
    path = _abs(directory)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(
            path, args=ocp.args.Composite(variables=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        )
    meta = restored["meta"] or {}
    if meta.get("format") != TEACHER_FORMAT:
        raise ValueError(f"{path}: not an rdjax teacher checkpoint")
    return meta["arch"], restored["variables"]


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    path = _abs(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    path = _abs(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; is this an rdjax workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def checkpoint_manager(workdir: str | os.PathLike, keep: int = 3) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        _abs(workdir) / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )


def save_state(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(flax.serialization.to_state_dict(state))))
    manager.wait_until_finished()


def restore_state(manager: ocp.CheckpointManager, template: Any, step: int | None = None) -> Any:
    """Restore into the structure (and shardings) of ``template``; latest step by default."""
    step = manager.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, flax.serialization.to_state_dict(template))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return flax.serialization.from_state_dict(template, restored["state"])
