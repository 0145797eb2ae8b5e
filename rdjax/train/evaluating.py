"""Evaluating the student during a run (and `rdjax eval`): one pass over each test split,
the configured evaluators, and in the unified setting each category apart, their mean,
the global calibration over the union of their passes and the category router."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rdjax import config as config_lib
from rdjax import evaluators as evaluators_lib
from rdjax import modes
from rdjax.data.preprocess import Recipe, Split
from rdjax.outputs import files
from rdjax.runtime import disk, sharding
from rdjax.runtime import workdir as workdir_lib
from rdjax.scoring import maps, metrics, tiling
from rdjax.scoring import passes as passes_lib
from rdjax.scoring import router as router_lib
from rdjax.scoring import thresholds as calibration_lib
from rdjax.train.log import log, naming
from rdjax.train.prepare import Part, Run, map_side


@dataclasses.dataclass(frozen=True)
class Passes:
    """The evaluation passes and predictions of one student under config.resize: what the
    evaluators get as run_pass and predict."""

    run: Run
    eval_step: maps.EvalStep
    fixed: passes_lib.PassSetup  # what stays fixed across the passes

    @classmethod
    def of(cls, run: Run, student_vars: Any) -> Passes:
        config = run.config
        eval_step = maps.eval_step_for(run.model, config)
        tiler: Callable | None = None
        if modes.ResizeMode(config.resize.mode) is modes.ResizeMode.SQUEEZE:
            pass_step = maps.eval_step_for(run.model, config, full_pass=True)
        else:
            windows = maps.local_runner(eval_step, run.teacher_vars, student_vars, config.eval_batch_size)
            recipe = Recipe.from_config(config)
            tiler = functools.partial(tiling.evaluation_maps, recipe=recipe, setting=config.resize, run=windows)
            pass_step = lambda teacher_vars, student_vars, *batch: maps.stats_step(*batch)
        fixed = passes_lib.PassSetup(
            pass_step, run.teacher_vars, student_vars, run.eval_batch, run.put, tiler, config.map_size
        )
        return cls(run, eval_step, fixed)

    def run_pass(self, split: Split, kind: str = "validation") -> passes_lib.PassResult:
        """An evaluation pass over ``split``, exact where its maps fit the exact budget."""
        config = self.run.config
        exact = len(split) * map_side(config) ** 2 <= config.exact_metrics_max_pixels
        return passes_lib.run_pass(self.fixed, split, exact, kind)

    def predict(self, split: Split, rows: np.ndarray) -> np.ndarray:
        """The maps of ``rows`` of ``split``."""
        run, fixed = self.run, self.fixed
        if fixed.tiler is not None:
            return fixed.tiler([split.native_image(r) for r in rows])[0]
        step = lambda x: self.eval_step(run.teacher_vars, fixed.student_vars, x)
        return sharding.map_global_batches(step, split.images(rows), run.eval_batch, run.put, "evaluating")[0]


@dataclasses.dataclass
class _Union:
    """A unified run's passes of every category, merged as the categories go: what the
    global calibration reads (none is run again). Kept only where a calibration reads
    it (``active``), with exact maps within ``budget`` pixels."""

    budget: int
    active: bool
    test: passes_lib.PassResult | None = None
    validation: passes_lib.PassResult | None = None

    def add_test(self, passed: passes_lib.PassResult) -> None:
        if self.active:
            self.test = passes_lib.merge(self.test, passed, self.budget)

    def add_validation(self, passed: passes_lib.PassResult) -> None:
        if self.active:
            self.validation = passes_lib.merge(self.validation, passed, self.budget)


@dataclasses.dataclass(frozen=True)
class _Recording:
    """The run_pass of one category's evaluators in a unified run: the pass over the
    category's held-out images (``validation``, the Split object its Part holds, which
    the evaluators pass on) also joins the union."""

    passes: Passes
    validation: Split | None
    union: _Union

    def __call__(self, split: Split, kind: str = "validation") -> passes_lib.PassResult:
        passed = self.passes.run_pass(split, kind)
        if split is self.validation:
            self.union.add_validation(passed)
        return passed


@dataclasses.dataclass(frozen=True)
class _Reusing:
    """The run_pass of the global calibration: its held-out split (``split``, the union of
    the categories' ones) is not passed again, the categories' merged pass (``passed``)
    stands for it."""

    passes: Passes
    split: Split | None
    passed: passes_lib.PassResult | None

    def __call__(self, split: Split, kind: str = "validation") -> passes_lib.PassResult:
        if split is self.split and self.passed is not None:
            return self.passed
        return self.passes.run_pass(split, kind)


def evaluate_student(run: Run, student_vars: Any, epoch: int, step: int, names: list[str] | None = None) -> dict:
    """One evaluation pass over the test images and the evaluators ``names`` (in run
    order; default: all of run.evaluators); returns the result for Writer.evaluation.
    The evaluators write their own files into eval/epoch_NNNN on process 0, beside the
    config.json they ran with; what that folder held before goes to history/ first.

    Unified: each category is evaluated on its own test split, by every evaluator, into
    eval/epoch_NNNN/<category>; the result holds them under 'categories', their mean
    at the top, and a global calibration fitted on the union of the categories' data
    (each category's own stays in calibration.json's 'categories')."""
    evaluators = {n: e for n, e in run.evaluators.items() if names is None or n in names}
    passes = Passes.of(run, student_vars)
    out_dir = _results_dir(run, epoch)
    if not run.unified:
        ((category, part),) = run.parts.items()
        result = _evaluate_part(run, category, part, evaluators, passes.run_pass, passes.predict, out_dir, epoch)[0]
        return _finish_result(run, result, epoch, step)
    return _finish_result(run, _evaluate_unified(run, evaluators, passes, out_dir, epoch), epoch, step)


def _results_dir(run: Run, epoch: int) -> Path | None:
    """eval/epoch_NNNN on process 0 (None elsewhere), holding the config it is evaluated
    with (a rerun compares it: `stale`)."""
    out_dir = files.evaluation_dir(run.workdir, epoch) if jax.process_index() == 0 else None
    if out_dir is not None:
        if out_dir.is_dir():  # this epoch was evaluated before (a finished run's rerun, a rerun after a kill)
            keep_results(run.workdir, out_dir)
        workdir_lib.save_config(out_dir, run.config)
    return out_dir


def _evaluate_unified(run: Run, evaluators: dict, passes: Passes, out_dir: Path | None, epoch: int) -> dict:
    """Each category apart, then `_unified_result`, the router's accuracy and the test
    passes' speed."""
    config = run.config
    calibrating = {n: e for n, e in evaluators.items() if evaluators_lib.type_of(n, config.evals[n]) == "calibration"}
    # The union keeps exact maps within half the exact budget, so with the category's own
    # exact pass beside it the total stays within what check_exact_metrics allowed.
    union = _Union(budget=config.exact_metrics_max_pixels // 2, active=bool(calibrating))
    results = {}
    for category, part in run.parts.items():
        recording = _Recording(passes, part.validation, union)
        with naming(category):
            results[category], test_pass = _evaluate_part(
                run, category, part, evaluators, recording, passes.predict, out_dir and out_dir / category, epoch
            )
        union.add_test(test_pass)
    result = _unified_result(run, results, calibrating, union, passes, epoch)
    result["router_accuracy"] = route_categories(run)
    seconds = sum(len(run.parts[c].test) / r["eval_images_per_second"] for c, r in results.items())
    result["eval_images_per_second"] = sum(len(p.test) for p in run.parts.values()) / seconds  # the test passes'
    return result


def route_categories(run: Run) -> dict[str, float]:
    """The category router of a unified run (rdjax.scoring.router), built from up to PER_CATEGORY
    training images of each category and written to the workdir (process 0), then
    measured on every category's test images. Built again at each evaluation (a few
    batches of the frozen teacher), so every process holds the same router without
    reading a file another process wrote."""

    def embed(split: Split, rows: np.ndarray) -> np.ndarray:  # a few batches decoded at a time
        chunk = 8 * run.eval_batch
        return np.concatenate([
            router_lib.embeddings(run.model, bool(run.config.imagenet_normalize), run.teacher_vars,
                                  split.images(rows[i : i + chunk]), run.eval_batch, run.put)
            for i in range(0, len(rows), chunk)
        ])  # fmt: skip

    categories = tuple(run.parts)
    owner = np.array([f.split("/", 1)[0] for f in run.train.filenames])
    rows = [np.flatnonzero(owner == c)[router_lib.spread(int(np.sum(owner == c)))] for c in categories]
    labels = np.concatenate([np.full(len(r), i) for i, r in enumerate(rows)])
    router = router_lib.Router(embed(run.train, np.concatenate(rows)), labels, categories)
    if jax.process_index() == 0:
        router.save(run.workdir / router_lib.ROUTER)
    accuracy = {}
    for category, part in run.parts.items():
        tests = np.arange(len(part.test))
        routed = (router.route(embed(part.test, tests[i : i + 256])) for i in range(0, len(tests), 256))
        accuracy[category] = sum(int(r == category) for chunk in routed for r in chunk) / max(len(tests), 1)
    total = sum(len(p.test) for p in run.parts.values())
    accuracy["all"] = sum(accuracy[c] * len(p.test) for c, p in run.parts.items()) / max(total, 1)
    log("category router: %.1f%% of the test images recognised (%s)", 100 * accuracy["all"], router_lib.ROUTER)
    return accuracy


def _evaluate_part(
    run: Run,
    category: str,
    part: Part,
    evaluators: dict,
    run_pass: Callable[..., passes_lib.PassResult],
    predict: Callable[[Split, np.ndarray], np.ndarray],
    out_dir: Path | None,
    epoch: int,
) -> tuple[dict, passes_lib.PassResult]:
    """One category's evaluation: (its evaluators' results, its test pass)."""
    config = run.config
    if run.unified:  # what the evaluators read of the config names the category they are about
        config = config.copy_and_resolve_references()
        config.dataset.category = category
    start = time.perf_counter()
    test_pass = run_pass(part.test, "test")
    seconds = time.perf_counter() - start
    context = evaluators_lib.EvalContext(
        config, part.test, test_pass, run_pass, predict, part.validation, out_dir, epoch
    )
    result = evaluators_lib.run_all(evaluators, context)
    for w in result["warnings"]:
        log("note: %s", w)
    result.update(category=category, eval_images_per_second=len(part.test) / seconds)
    if "image_auroc" in result and run.unified:
        log("%s", metrics.headline(result))
    return result, test_pass


def _unified_result(
    run: Run, results: dict[str, dict], calibrating: dict, union: _Union, passes: Passes, epoch: int
) -> dict:
    """The categories' results, their mean, and the global calibration (`_global_calibration`)."""
    result: dict[str, Any] = {"categories": results, "warnings": []}
    for key in metrics.METRIC_NAMES:
        values = [r[key] for r in results.values() if key in r]
        if values:
            result[key] = metrics.nanmean(values)
    if calibrating:
        result.update(_global_calibration(run, results, calibrating, union, passes, epoch))
    return result


def _global_calibration(
    run: Run, results: dict[str, dict], calibrating: dict, union: _Union, passes: Passes, epoch: int
) -> dict:
    """The ``calibrating`` evaluators run once more over the union of the categories' test
    splits and held-out images, whose passes were merged as the categories went (none is
    run again): the calibration, its note and its confusion."""
    validations = {c: p.validation for c, p in run.parts.items() if p.validation is not None}
    validation = Split.concat(validations) if len(validations) == len(run.parts) else None
    test = Split.concat({c: p.test for c, p in run.parts.items()})
    assert union.test is not None
    merged = _Reusing(passes, validation, union.validation)
    context = evaluators_lib.EvalContext(run.config, test, union.test, merged, passes.predict, validation, None, epoch)
    union_result = evaluators_lib.run_all(calibrating, context)  # one evaluator of a type at most
    fit = calibration_lib.Calibration.from_json(union_result["calibration"])
    cal = dataclasses.replace(
        fit, source=f"{fit.source} of {len(run.parts)} categories",
        categories={c: calibration_lib.Calibration.from_json(r["calibration"]) for c, r in results.items()},
    ).to_json()  # fmt: skip
    return {"calibration": cal, "threshold_note": f"global {calibration_lib.describe(cal)}",
            "confusion": union_result["confusion"]}  # fmt: skip


def _finish_result(run: Run, result: dict, epoch: int, step: int) -> dict:
    """What every evaluation's result records beside its metrics, and its log lines."""
    config = run.config
    result["warnings"] = list(run.warnings) + result["warnings"]
    for part in [result, *result.get("categories", {}).values()]:  # the thresholds and each category's
        if "calibration" in part:
            fit = calibration_lib.Calibration.from_json(part["calibration"])
            part["calibration"] = fit.fitted(step, epoch, config.resize.to_dict(), config.max_ratio).to_json()
    for part in result.get("categories", {}).values():
        part.update(epoch=epoch, step=step, seed=config.seed)
    category = "unified" if run.unified else next(iter(run.parts))
    result.update(
        epoch=epoch, step=step, seed=config.seed, category=category, model=config.model.name,
        arch=config.model.arch, teacher_weights=config.model.teacher_weights, dtype=config.dtype,
        image_size=config.image_size, setting=config.setting,
    )  # fmt: skip
    if "image_auroc" in result:
        log("epoch %d: %s%s", epoch, "mean " if run.unified else "", metrics.headline(result))
    if "threshold_note" in result:
        log("epoch %d: %s", epoch, result["threshold_note"])
    return result


def keep_results(workdir: Path, evaluation: Path) -> None:
    """workdir_lib.keep_results, and a line saying where the previous results went."""
    kept = workdir_lib.keep_results(workdir, evaluation)
    if kept is not None:
        names = sorted(p.name for p in kept.iterdir() if p.is_file())
        names += sorted(f"{p.relative_to(kept).as_posix()}/" for p in kept.glob("*/*") if p.is_dir())
        log("the previous %s are kept in %s", ", ".join(names), kept)


def stale(run: Run, step: int) -> str | None:
    """Why a finished run's stored evaluation (eval/epoch_NNNN of its last epoch) is not
    current, or None where it is: it holds a complete evaluation (metrics.json, written
    last) of ``step``, the latest checkpoint, made with the config.json beside it, which
    equals run.config in every key an evaluation reads."""
    folder = files.evaluation_dir(run.workdir, int(run.config.num_epochs))
    name = folder.relative_to(run.workdir)
    if not (folder / "metrics.json").is_file():
        return f"{name} holds no complete evaluation"
    evaluated = disk.read_json(folder / "metrics.json").get("step")
    if evaluated != step:
        return f"{name} evaluated step {evaluated}"
    if not (folder / workdir_lib.CONFIG).is_file():
        return f"{name} does not record the config it was evaluated with"
    before, now = (
        config_lib.evaluation_settings(workdir_lib.load_config(folder), run.model),
        config_lib.evaluation_settings(run.config, run.model),
    )
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        return f"config.{changed[0]} is {now.get(changed[0])!r}, {name} was evaluated with {before.get(changed[0])!r}"
    return None
