"""`rdjax package --workdir=W --out=P`: what a line PC needs of a trained workdir, and
nothing else.

A package is a folder:
  config.json       the workdir's config;
  teacher/          the frozen teacher (orbax, as in a workdir);
  student/          the trained student's variables at the latest checkpoint, without
                    the optimizer state (orbax: 'variables' + 'meta' JSON: format, step,
                    weights dtype);
  calibration.json  thresholds and the normalized-score range (when calibrated);
  contract.json     the inputs, outputs and decision rule (rdjax.deploy.export.contract), and
                    for a unified model the category it decides with by default
                    (--category; none: its global thresholds, with a warning where the
                    categories' own differ);
  router.npz        a unified workdir's category router (rdjax.scoring.router), when it has one.
teacher/ and student/ each hold sha256.json, their files' SHA-256, which every load
verifies (rdjax.runtime.disk.verify_checksums).
A unified package keeps every category's thresholds: predict --category and serve's
?category= choose another than the default per call.
`rdjax.load`, `rdjax predict`, `rdjax export` and `rdjax serve` read it as they read a
workdir. Stored in float32 it scores exactly as the workdir; in bfloat16 (--weights_dtype)
it is half the size and is computed in the config's dtype after a cast back, so scores
move by the weights' rounding (thresholds near a score may decide differently).
"""

from __future__ import annotations

import glob
import shutil
import sys
import uuid
from pathlib import Path

import jax
from absl import flags

from rdjax import modes
from rdjax.errors import ConfigError, RdjaxError, WorkdirError, one_line
from rdjax.runtime import disk
from rdjax.runtime import workdir as workdir_lib
from rdjax.scoring.router import ROUTER

CONTRACT = "contract.json"
WEIGHTS_DTYPES = ("float32", "bfloat16")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove_leftovers(out: Path) -> list[Path]:
    """The temporary folders of earlier package runs onto ``out`` that were killed
    before renaming theirs into place (package_workdir's '.NAME.1a2b3c4d.tmp'), removed."""
    found = [p for p in out.parent.glob(f".{glob.escape(out.name)}.*.tmp") if disk.LEFTOVER.search(p.name)]
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(found)


def package_workdir(
    workdir: str | Path, out: Path, weights_dtype: str = "float32", category: str | None = None
) -> None:
    """Write the package ``out`` from ``workdir``'s latest checkpoint. Every argument is
    checked first; the package is written beside ``out`` and renamed into place, so a
    failure (a full disk included: one line) leaves nothing, and a kill leaves a
    temporary folder that the next run onto ``out`` removes."""
    from rdjax.deploy import export, predictor

    if weights_dtype not in WEIGHTS_DTYPES:
        raise ConfigError(f"--weights_dtype={weights_dtype}: choose one of {', '.join(WEIGHTS_DTYPES)}")
    if out.exists():
        raise WorkdirError(f"{out}: already exists; choose a new --out")
    if not out.parent.is_dir():
        raise WorkdirError(f"{out.parent}: no such folder for --out")
    workdir = Path(workdir)
    if workdir_lib.is_package(workdir):
        raise WorkdirError(f"{workdir}: is a package already; --workdir takes a trained workdir")
    model = predictor.load(workdir, category=category)
    for left in remove_leftovers(out):
        print(f"note: removed {left}, left by a package run that was stopped", file=sys.stderr)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir()
        workdir_lib.save_config(tmp, model.config)
        workdir_lib.save_teacher(tmp / workdir_lib.TEACHER, model.config.model.arch, model.teacher_vars)
        workdir_lib.save_student(
            tmp / workdir_lib.STUDENT, model.step, jax.device_get(model.student_vars), weights_dtype
        )
        if model.calibrations is not None:
            disk.write_json(tmp / workdir_lib.CALIBRATION, model.calibrations.to_json())
        if model.router is not None:
            model.router.save(tmp / ROUTER)
        disk.write_json(tmp / CONTRACT, export.contract(model, "package", weights_dtype))
        tmp.rename(out)
    except RdjaxError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # a full disk: OSError, or tensorstore's ValueError
        why = one_line(e) if isinstance(e, OSError) else f"{type(e).__name__}: {one_line(e)[:300]}"
        raise WorkdirError(f"{out}: cannot write the package ({why}); nothing was left there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size, whole = folder_bytes(out), folder_bytes(workdir)
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {weights_dtype} student; the workdir holds {whole / 2**20:.1f} MiB)")


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    """`rdjax package`'s flags."""
    flags.DEFINE_string("workdir", None, "A trained (or ported) rdjax workdir.", flag_values=fv)
    flags.DEFINE_string("out", None, "The package folder to write (must not exist).", flag_values=fv)
    flags.DEFINE_string(
        "weights_dtype", "float32", "The student's stored weights: float32 (exact) or bfloat16 (half).", flag_values=fv
    )
    flags.DEFINE_string("category", None, modes.CATEGORY_HELP, flag_values=fv)
    flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


def main(fv: flags.FlagValues, args: list[str]) -> None:
    """`rdjax package`."""
    package_workdir(fv.workdir, Path(fv.out), fv.weights_dtype, fv.category)
