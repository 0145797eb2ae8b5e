"""The training loop: train_and_evaluate (flax examples' shape) and evaluate.

Data flows one way: the dataset's splits (decoded batch by batch, each process its own
share) -> the teacher's features (config.feature_cache) -> the jitted step -> maps ->
the configured evaluators -> the workdir.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from rdjax import config as config_lib
from rdjax import data, modes, registry
from rdjax import evaluators as evaluators_lib
from rdjax.data import features, pipeline
from rdjax.data.pipeline import prefetch
from rdjax.data.preprocess import Recipe, Split
from rdjax.errors import ConfigError, DataError, Interrupted, TrainingError, WorkdirError
from rdjax.evaluators.calibration import calibration_split
from rdjax.models import Model
from rdjax.modes import FeatureCache
from rdjax.outputs import results as outputs
from rdjax.runtime import sharding, weights
from rdjax.runtime import state as state_lib
from rdjax.runtime import workdir as workdir_lib
from rdjax.scoring import maps, metrics, tiling
from rdjax.scoring import passes as evaluation
from rdjax.scoring import router as router_lib
from rdjax.scoring import thresholds as calibration_lib
from rdjax.train import steps, teacher

_CATEGORY: contextvars.ContextVar[str] = contextvars.ContextVar("category", default="")


def _log(fmt: str, *args: Any) -> None:
    """Progress lines on stdout, above any progress bar, each naming the category it is
    about (two categories' runs look alike otherwise)."""
    if jax.process_index() == 0:
        prefix = f"[{_CATEGORY.get()}] " if _CATEGORY.get() else ""
        tqdm.tqdm.write(prefix + fmt % args)


def label(config: Any) -> str:
    """What a run's log lines and bars call it: its category, or 'unified'."""
    unified = modes.Setting(config.setting) is modes.Setting.UNIFIED
    return modes.Setting.UNIFIED.value if unified else str(config.dataset.category)


@contextlib.contextmanager
def _naming(category: str) -> Iterator[None]:
    """_log's lines within the block start with ``category``."""
    token = _CATEGORY.set(category)
    try:
        yield
    finally:
        _CATEGORY.reset(token)


class StopRequest:
    """Ctrl-C (SIGINT) while training. Inside `deferred` (the steps, a checkpoint's write)
    the first press only asks the loop to stop at the next step boundary, so the state is
    whole and can be saved; a second press stops at once. Elsewhere (evaluations, the
    feature cache) a press raises KeyboardInterrupt at once, and the state, which no step
    is using then, is saved by the loop. Installed only in the main thread of a
    single-process run: the processes of a pod must stop at the same step, which a signal
    to one of them cannot promise, so there a press stops as before (the latest
    checkpoint is where a rerun resumes)."""

    def __init__(self) -> None:
        self.requested = False
        self._deferring = False
        self._previous: Any = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._deferring and not self.requested:
            self.requested = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False


@dataclasses.dataclass(frozen=True)
class Part:
    """One category's evaluation data: its test split and its held-out normal images."""

    test: Split
    validation: Split | None


@dataclasses.dataclass
class Run:
    """What one run works with, built once by `setup`: one category's data, or (the
    unified setting) every category's training images as one split and each category's
    evaluation data apart."""

    config: Any
    workdir: Path
    model: Model
    mesh: jax.sharding.Mesh
    put: Callable[[Any], Any]
    teacher_vars: Any
    warnings: list[str]
    train: Split
    parts: dict[str, Part]  # category -> its evaluation data
    unified: bool
    evaluators: dict[str, evaluators_lib.Evaluator]  # config.evals, built in run order
    feature_mode: str = FeatureCache.OFF.value  # config.feature_cache resolved (training only)
    feature_dir: Path | None = None  # where 'disk' keeps this process's share

    @property
    def steps_per_epoch(self) -> int:
        return max(pipeline.steps_per_epoch(len(self.train), self.config.batch_size, self.config.drop_last), 1)

    @property
    def total_steps(self) -> int:
        """The optimizer steps the run trains: config.total_steps, else num_epochs epochs."""
        return int(self.config.total_steps) or self.config.num_epochs * self.steps_per_epoch

    def epoch_steps(self, epoch: int) -> int:
        """Steps in ``epoch`` (1-based): all of them, but the last epoch of a run with
        config.total_steps stops there (an iteration-counted loop's last epoch)."""
        return max(min(self.steps_per_epoch, self.total_steps - (epoch - 1) * self.steps_per_epoch), 0)

    @property
    def eval_batch(self) -> int:
        return sharding.round_up(self.config.eval_batch_size, self.mesh.size)


def setup(config: Any, workdir: Path, writing: bool, dataset: data.Dataset | None = None) -> Run:
    """Check the config, load the data, then (and only then) touch the workdir: bad
    settings and bad data fail before anything is written. ``writing``: the run will
    write checkpoints, so the workdir must take them. With config.offline nothing here
    downloads (the teacher's weights, a TFDS dataset)."""
    with weights.offline_scope(config.offline):
        return _setup(config, workdir, writing, dataset)


def _setup(config: Any, workdir: Path, writing: bool, dataset: data.Dataset | None) -> Run:
    config_lib.check(config, jax.device_count())
    registry.check(config)
    model = registry.build_model(config)
    saved_config = workdir_lib.load_config(workdir) if (workdir / workdir_lib.CONFIG).is_file() else None
    config = config_lib.for_workdir(config, saved_config, model.input_filter)
    if saved_config is not None:  # a trained workdir: its weights' settings stay as they are
        for note in config_lib.check_rerun(workdir, saved_config, config, evaluating=not writing):
            _log("note: %s", note)
    recipe = Recipe.from_config(config)
    crop = outputs.crop_note(recipe)
    if crop:
        _log("note: %s", crop)
    dataset = dataset or registry.build_dataset(config.dataset)
    unified = modes.Setting(config.setting) is modes.Setting.UNIFIED
    categories = dataset.categories() if unified else [config.dataset.category]
    if not categories:
        raise DataError(f"{config.dataset.root}: no categories found (folders with train/ and test/)")
    if unified and not dataset.unifiable:
        raise ConfigError(
            f"config.setting='unified': dataset {config.dataset.name!r} has one-class problems, each class "
            "the others' anomalies; train them per category"
        )
    if unified:
        _check_categories(workdir, categories)
    trains, parts = {}, {}
    for category in categories:  # each category holds out its own share of its train/good images
        with _naming(category):
            train_split, test_split = dataset.load(category, recipe)
            trains[category], validation = data.hold_out(train_split, config.threshold.validation_size, config.seed)
            parts[category] = Part(test_split, validation)
            check_exact_metrics(config, max(len(test_split), len(validation or ())))
            warning = _few_images_warning(config, parts[category])
            if warning:
                _log("warning: %s", warning)
    train_split = Split.concat(trains) if unified else trains[categories[0]]
    if config.total_steps > 0:  # an iteration-counted schedule: as many epochs as its steps take
        spe = max(pipeline.steps_per_epoch(len(train_split), config.batch_size, config.drop_last), 1)
        config = config.copy_and_resolve_references()
        config.num_epochs = -(-int(config.total_steps) // spe)
    if modes.ResizeMode(config.resize.mode) is not modes.ResizeMode.SQUEEZE and test_split.read_native is None:
        raise ConfigError(
            f"config.resize.mode={config.resize.mode!r}: dataset {config.dataset.name!r} has no images "
            "beyond image_size to tile; use 'squeeze'"
        )
    feature_mode, feature_dir = FeatureCache.OFF.value, None
    if writing:
        pipeline.lanes(len(train_split), config.batch_size, config.seed)  # fails if the batch is larger than the data
        feature_mode, feature_dir = _feature_mode(config, model, workdir, len(train_split))
    teacher_vars, warnings, saved = teacher.for_run(config, model, workdir)  # a bad weights file fails here
    if writing:
        student = model.abstract_variables()[1]
        params = sum(x.size for x in jax.tree_util.tree_leaves(student))
        workdir_lib.check_writable(workdir, params * 4 * 3 * 2)  # params + Adam's two moments, float32, twice
    if not saved:
        workdir_lib.save_teacher(workdir / workdir_lib.TEACHER, model.arch, teacher_vars)  # every process takes part
    mesh = sharding.make_mesh()
    return Run(
        config=config,
        workdir=workdir,
        model=model,
        mesh=mesh,
        put=functools.partial(sharding.put_batch, sharding=sharding.batch_sharding(mesh)),
        teacher_vars=jax.device_put(teacher_vars, sharding.replicated(mesh)),
        warnings=warnings,
        train=train_split,
        parts=parts,
        unified=unified,
        evaluators=evaluators_lib.build(config.evals, registry.EVALUATORS.get),
        feature_mode=feature_mode,
        feature_dir=feature_dir,
    )


def _check_categories(workdir: Path, categories: list[str]) -> None:
    """A unified workdir's model and global thresholds belong to the categories it was
    calibrated on (calibration.json's 'categories'): a root that gained or lost one, or
    another dataset.category list, would change the union silently."""
    path = workdir / workdir_lib.CALIBRATION
    known = sorted(workdir_lib.read_json(path).get("categories", {})) if path.is_file() else []
    if known and known != sorted(categories):
        raise DataError(
            f"{workdir} was trained on the categories {', '.join(known)}, but this run has "
            f"{', '.join(sorted(categories))}: use a new --workdir, or pass --config.dataset.category="
            f"{','.join(known)} with the dataset's folders as they were"
        )


def _few_images_warning(config: Any, part: Part) -> str | None:
    """A category's thresholds will rest on too few images (calibration.few_images): said
    once when the run starts, not at every evaluation. A unified model's global threshold
    rests on more images than any category's, so its categories' warnings cover it."""
    if not any(evaluators_lib.type_of(n, s) == "calibration" for n, s in config.evals.items()):
        return None
    split, source = calibration_split(config, part.test, part.validation)
    return calibration_lib.few_images({"num_images": len(split), "source": source, "method": config.threshold.method})


EXACT_BYTES_PER_PIXEL = 48  # maps and masks kept, then the exact metrics' sort and float64 weights


def check_exact_metrics(config: Any, images: int) -> None:
    """Exact pixel metrics keep every map: refuse before any work where that cannot fit."""
    pixels = images * map_side(config) ** 2
    need, have = EXACT_BYTES_PER_PIXEL * pixels, features.available_memory()
    if pixels <= config.exact_metrics_max_pixels and need > have:
        raise ConfigError(
            f"exact pixel metrics over {pixels} pixels need about {need / 2**30:.1f} GiB but "
            f"{have / 2**30:.1f} GiB are available; lower config.exact_metrics_max_pixels (binned metrics)"
        )


def map_side(config: Any) -> int:
    """The side of the maps the metrics compare: config.map_size, else the input's."""
    return int(config.map_size) or int(config.image_size)


def _eval_functions(run: Run, student_vars: Any) -> tuple[Callable, Callable]:
    """(run_pass(split, kind), predict(split, rows)) for this student and config.resize."""
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

    def run_pass(split: Split, kind: str = "validation") -> evaluation.PassResult:
        exact = len(split) * map_side(config) ** 2 <= config.exact_metrics_max_pixels
        return evaluation.run_pass(
            pass_step, run.teacher_vars, student_vars, split, run.eval_batch, run.put, exact, kind, tiler,
            config.map_size,
        )  # fmt: skip

    def predict(split: Split, rows: np.ndarray) -> np.ndarray:
        if tiler is not None:
            return tiler([split.native_image(r) for r in rows])[0]
        step = lambda x: eval_step(run.teacher_vars, student_vars, x)
        return sharding.map_global_batches(step, split.images(rows), run.eval_batch, run.put, "evaluating")[0]

    return run_pass, predict


def evaluate_student(run: Run, student_vars: Any, epoch: int, step: int, names: list[str] | None = None) -> dict:
    """One evaluation pass over the test images and the evaluators ``names`` (in run
    order; default: all of run.evaluators); returns the result for Writer.evaluation.
    The evaluators write their own files into eval/epoch_NNNN on process 0, beside the
    config.json they ran with; what that folder held before goes to history/ first.

    Unified: each category is evaluated on its own test split, by every evaluator, into
    eval/epoch_NNNN/<category>; the result holds them under 'categories', their mean
    at the top, and a global calibration fitted on the union of the categories' data
    (each category's own stays in calibration.json's 'categories')."""
    config = run.config
    evaluators = {n: e for n, e in run.evaluators.items() if names is None or n in names}
    run_pass, predict = _eval_functions(run, student_vars)
    out_dir = outputs.evaluation_dir(run.workdir, epoch) if jax.process_index() == 0 else None
    if out_dir is not None:
        if out_dir.is_dir():  # this epoch was evaluated before (a finished run's rerun, a rerun after a kill)
            _keep_results(run.workdir, out_dir)
        workdir_lib.save_config(out_dir, config)  # what made these results: a rerun compares it (_stale)
    if not run.unified:
        ((category, part),) = run.parts.items()
        result = _evaluate_part(run, category, part, evaluators, run_pass, predict, out_dir, epoch)[0]
        return _finish_result(run, result, epoch, step)
    union: dict[str, evaluation.PassResult | None] = {"test": None, "validation": None}
    # The union keeps exact maps within half the exact budget, so with the category's own
    # exact pass beside it the total stays within what check_exact_metrics allowed.
    budget = config.exact_metrics_max_pixels // 2
    calibrating = {n: e for n, e in evaluators.items() if evaluators_lib.type_of(n, config.evals[n]) == "calibration"}

    def merge(kind: str, passed: evaluation.PassResult) -> None:
        if calibrating:  # only the global calibration reads the union
            union[kind] = evaluation.merge(union[kind], passed, budget)

    results = {}
    for category, part in run.parts.items():

        def recording(split: Split, kind: str = "validation", part: Part = part) -> evaluation.PassResult:
            passed = run_pass(split, kind)
            if split is part.validation:
                merge("validation", passed)
            return passed

        with _naming(category):
            results[category], test_pass = _evaluate_part(
                run, category, part, evaluators, recording, predict, out_dir and out_dir / category, epoch
            )
        merge("test", test_pass)
    result = _unified_result(run, results, calibrating, union, run_pass, predict, epoch)
    result["router_accuracy"] = route_categories(run)
    seconds = sum(len(run.parts[c].test) / r["eval_images_per_second"] for c, r in results.items())
    result["eval_images_per_second"] = sum(len(p.test) for p in run.parts.values()) / seconds  # the test passes'
    return _finish_result(run, result, epoch, step)


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
    _log("category router: %.1f%% of the test images recognised (%s)", 100 * accuracy["all"], router_lib.ROUTER)
    return accuracy


def _evaluate_part(
    run: Run,
    category: str,
    part: Part,
    evaluators: dict,
    run_pass: Callable,
    predict: Callable,
    out_dir: Path | None,
    epoch: int,
) -> tuple[dict, evaluation.PassResult]:
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
        _log("note: %s", w)
    result.update(category=category, eval_images_per_second=len(part.test) / seconds)
    if "image_auroc" in result and run.unified:
        _log("%s", metrics.headline(result))
    return result, test_pass


def _unified_result(
    run: Run,
    results: dict[str, dict],
    calibrating: dict,
    union: dict[str, evaluation.PassResult | None],
    run_pass: Callable,
    predict: Callable,
    epoch: int,
) -> dict:
    """The categories' results, their mean, and the global calibration: the
    ``calibrating`` evaluators run once more over the union of the categories' test splits and held-out
    images, whose passes were merged as the categories went (none is run again)."""
    config = run.config
    result: dict[str, Any] = {"categories": results, "warnings": []}
    for key in metrics.METRIC_NAMES:
        values = [r[key] for r in results.values() if key in r]
        if values:
            result[key] = metrics.nanmean(values)
    if calibrating:
        validations = {c: p.validation for c, p in run.parts.items() if p.validation is not None}
        validation = Split.concat(validations) if len(validations) == len(run.parts) else None
        test = Split.concat({c: p.test for c, p in run.parts.items()})
        test_pass = union["test"]
        assert test_pass is not None

        def merged(split: Split, kind: str = "validation") -> evaluation.PassResult:
            return (
                union["validation"]
                if split is validation and union["validation"] is not None
                else run_pass(split, kind)
            )

        context = evaluators_lib.EvalContext(config, test, test_pass, merged, predict, validation, None, epoch)
        union_result = evaluators_lib.run_all(calibrating, context)  # one evaluator of a type at most
        cal = union_result["calibration"]
        cal["source"] += f" of {len(run.parts)} categories"
        cal["categories"] = {c: r["calibration"] for c, r in results.items()}
        result.update(calibration=cal, threshold_note=f"global {calibration_lib.describe(cal)}",
                      confusion=union_result["confusion"])  # fmt: skip
    return result


def _finish_result(run: Run, result: dict, epoch: int, step: int) -> dict:
    """What every evaluation's result records beside its metrics, and its log lines."""
    config = run.config
    result["warnings"] = list(run.warnings) + result["warnings"]
    calibrations = [result.get("calibration")] + [r.get("calibration") for r in result.get("categories", {}).values()]
    for cal in calibrations:
        if cal is not None:
            cal.update(step=step, epoch=epoch, resize=config.resize.to_dict(), max_ratio=config.max_ratio)
    for part in result.get("categories", {}).values():
        part.update(epoch=epoch, step=step, seed=config.seed)
    category = "unified" if run.unified else next(iter(run.parts))
    result.update(
        epoch=epoch, step=step, seed=config.seed, category=category, model=config.model.name,
        arch=config.model.arch, teacher_weights=config.model.teacher_weights, dtype=config.dtype,
        image_size=config.image_size, setting=config.setting,
    )  # fmt: skip
    if "image_auroc" in result:
        _log("epoch %d: %s%s", epoch, "mean " if run.unified else "", metrics.headline(result))
    if "threshold_note" in result:
        _log("epoch %d: %s", epoch, result["threshold_note"])
    return result


def _remove_leftovers(workdir: Path) -> None:
    """What a killed run left under temporary names (workdir_lib.remove_leftovers),
    removed by the next run that writes the workdir, and named."""
    if jax.process_index() == 0:
        for path in workdir_lib.remove_leftovers(workdir):
            _log("removed %s, left by a run that was stopped while writing it", path)


def _keep_results(workdir: Path, evaluation: Path) -> None:
    """workdir_lib.keep_results, and a line saying where the previous results went."""
    kept = workdir_lib.keep_results(workdir, evaluation)
    if kept is not None:
        names = sorted(p.name for p in kept.iterdir() if p.is_file())
        names += sorted(f"{p.relative_to(kept).as_posix()}/" for p in kept.glob("*/*") if p.is_dir())
        _log("the previous %s are kept in %s", ", ".join(names), kept)


def _stale(run: Run, step: int) -> str | None:
    """Why a finished run's stored evaluation (eval/epoch_NNNN of its last epoch) is not
    current, or None where it is: it holds a complete evaluation (metrics.json, written
    last) of ``step``, the latest checkpoint, made with the config.json beside it, which
    equals run.config in every key an evaluation reads."""
    folder = outputs.evaluation_dir(run.workdir, int(run.config.num_epochs))
    name = folder.relative_to(run.workdir)
    if not (folder / "metrics.json").is_file():
        return f"{name} holds no complete evaluation"
    evaluated = workdir_lib.read_json(folder / "metrics.json").get("step")
    if evaluated != step:
        return f"{name} evaluated step {evaluated}"
    if not (folder / workdir_lib.CONFIG).is_file():
        return f"{name} does not record the config it was evaluated with"
    before, now = (
        config_lib.evaluation_settings(workdir_lib.load_config(folder)),
        config_lib.evaluation_settings(run.config),
    )
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        return f"config.{changed[0]} is {now.get(changed[0])!r}, {name} was evaluated with {before.get(changed[0])!r}"
    return None


def _feature_mode(config: Any, model: Model, workdir: Path, rows: int) -> tuple[str, Path]:
    """config.feature_cache resolved for this process's share of ``rows`` training rows,
    then agreed on by all processes: the most frugal choice of any process wins, since
    'off' compiles a different step. Returns (mode, the folder 'disk' uses). A model
    whose every step needs the images (RD++'s noised branch) trains with 'off'."""
    if model.needs_images:
        if config.feature_cache not in (FeatureCache.AUTO, FeatureCache.OFF):
            raise ConfigError(
                f"config.feature_cache={config.feature_cache!r}: model {config.model.name!r} runs the "
                "teacher on new noised images in every step; use 'auto' or 'off'"
            )
        _log("feature cache: off (model %s needs the images in every step)", config.model.name)
        return FeatureCache.OFF.value, workdir / "feature_cache"
    p, count = jax.process_index(), jax.process_count()
    owned = len(pipeline.owned_rows(rows, config.batch_size, config.seed, p, count))
    folder = (
        Path(config.feature_cache_dir).expanduser() / label(config)
        if config.feature_cache_dir
        else (workdir / "feature_cache")
    )
    directory = folder / f"process_{p}_of_{count}"
    need = features.bytes_per_image(features.feature_shapes(model, config.image_size)) * owned
    mode, figures = features.choose_mode(config.feature_cache, need, directory)
    if count > 1:
        from jax.experimental import multihost_utils

        order = [m.value for m in (FeatureCache.MEMORY, FeatureCache.DISK, FeatureCache.OFF)]
        mode = order[int(np.max(multihost_utils.process_allgather(np.int32(order.index(mode)))))]
    _log(
        "feature cache: %s (%s%s)",
        mode,
        figures,
        ", requested 'auto'" if config.feature_cache == FeatureCache.AUTO else "",
    )
    return mode, directory


def _cache_identity(run: Run) -> dict:
    """What the cached features are a function of: a disk cache with other values (another
    dataset, teacher file, size, order) is never reused."""
    config = run.config
    weights = Path(config.model.teacher_weights).expanduser()
    stamp = [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.is_file() else None
    return {
        "model": config.model.to_dict(),
        "teacher_file": stamp,
        "dataset": config.dataset.to_dict(),
        "image_size": config.image_size,
        "input": config.input.to_dict(),  # the recipe that made the images the teacher saw
        "dtype": config.dtype,
        "imagenet_normalize": config.imagenet_normalize,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "validation_size": config.threshold.validation_size,
        "train_rows": len(run.train),
        "train_files": list(run.train.filenames)[:1] + list(run.train.filenames)[-1:],
    }


def cached_features(run: Run, owned: np.ndarray, mode: str, directory: Path) -> Any:
    """This process's share of the training images' teacher features, in a store
    (features.MemoryStore or DiskStore), computed once (a complete disk cache of the same
    run is reused, e.g. on resume)."""
    config, model = run.config, run.model
    shapes = features.feature_shapes(model, config.image_size)
    store: features.MemoryStore | features.DiskStore
    if mode == FeatureCache.MEMORY:
        store = features.MemoryStore(shapes, len(owned))
    else:
        store = features.DiskStore(directory, shapes, len(owned), _cache_identity(run))
        complete = store.complete
        if jax.process_count() > 1:  # reuse only if every process can: the fill is a collective
            from jax.experimental import multihost_utils

            complete = bool(np.min(multihost_utils.process_allgather(np.int32(complete))))
            if not complete:
                store.invalidate()
        if complete:
            _log("feature cache: reusing %s", directory)
            return store
    local_batch = run.eval_batch // jax.process_count()
    most = max(
        len(pipeline.owned_rows(len(run.train), config.batch_size, config.seed, q, jax.process_count()))
        for q in range(jax.process_count())
    )
    steps = -(-most // local_batch)
    chunks = [owned[i * local_batch : (i + 1) * local_batch] for i in range(steps)]
    batches = [sharding.pad(c if len(c) else owned[-1:], local_batch)[0] for c in chunks]
    teacher = jax.jit(features.teacher_fn(model, config.imagenet_normalize))

    def compute(images: np.ndarray) -> list[np.ndarray]:
        return [sharding.local_rows(f) for f in teacher(run.teacher_vars, run.put(images))]

    features.fill(store, len(owned), local_batch, steps, pipeline.load_batches(run.train, batches, "train"), compute)
    if isinstance(store, features.DiskStore):
        store.finish()
    return store


def _check_finite(losses: np.ndarray, epoch: int, steps_per_epoch: int, skip: int) -> None:
    if not np.all(np.isfinite(losses)):
        bad = int(np.flatnonzero(~np.isfinite(losses))[0])
        raise TrainingError(
            f"non-finite loss {losses[bad]} at step {(epoch - 1) * steps_per_epoch + skip + bad + 1} (epoch {epoch}); "
            f"stopped, the last good checkpoint is kept"
        )


class Writer:
    """Every file of a run's own (config, train log, metrics, TensorBoard): process 0
    writes, the others do not (the one place that policy lives; evaluators write into the
    folder only process 0 is given). Training calls `resume` once it knows where it
    starts: the train log keeps the epochs before, and TensorBoard opens; an evaluation
    alone never does. train_log.json is rewritten at each checkpoint."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.log_path = workdir, workdir / "train_log.json"
        self.primary = jax.process_index() == 0
        self.train_log: list[dict] = []
        self.board: Any = None

    def resume(self, start_epoch: int) -> None:
        if self.log_path.is_file():
            self.train_log = [e for e in workdir_lib.read_json(self.log_path) if e["epoch"] <= start_epoch]
        if self.primary:
            from tensorboardX import SummaryWriter

            self.board = SummaryWriter(str(self.workdir / "tensorboard"))

    def config(self, config: Any) -> None:
        if self.primary:
            workdir_lib.save_config(self.workdir, config)

    def train(self, entry: dict) -> None:
        _log("epoch %d: loss %.5f, %.1f img/s", entry["epoch"], entry["loss"], entry["images_per_second"])
        self.train_log.append(entry)
        if self.board is not None:
            self.board.add_scalar("train/loss", entry["loss"], entry["step"])
            self.board.add_scalar("train/images_per_second", entry["images_per_second"], entry["step"])

    def evaluation(self, result: dict) -> None:
        wrong = calibration_lib.problem(result["calibration"]) if "calibration" in result else None
        if wrong:  # the schema every reader checks (calibration.read): never write what they refuse
            raise TrainingError(f"the evaluation at step {result['step']} fitted unusable thresholds ({wrong}); "
                                "calibration.json is left as it was")  # fmt: skip
        if self.primary:
            outputs.write_evaluation(self.workdir, result["epoch"], result)
        if self.board is not None:
            for key in metrics.TABLE_KEYS:
                if key in result:
                    self.board.add_scalar(f"eval/{key}", result[key], result["step"])
            self.board.flush()

    def checkpoint(self) -> None:
        if self.primary:
            workdir_lib.write_json(self.log_path, self.train_log)

    def summary(self, results: dict[str, dict], keys: tuple[str, ...]) -> None:
        """results.md over the categories of a run, with the mean row."""
        if self.primary:
            workdir_lib.write_text(self.workdir / "results.md", outputs.summary_markdown(results, keys))

    def finish(self, config: Any) -> None:
        if self.primary and config.report_best_on_test:
            outputs.write_best_on_test(self.workdir)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class Profiler:
    """config.profile_steps > 0: a jax.profiler trace of that many steps from the run's
    second step (the first compiles), ending at the end of its epoch at the latest, so
    checkpoints and evaluations stay out of it; into workdir/profile (TensorBoard,
    Perfetto), with several processes each into its own profile/process_<i>."""

    def __init__(self, workdir: Path, steps: int) -> None:
        self.directory = workdir / "profile"
        if jax.process_count() > 1:
            self.directory = self.directory / f"process_{jax.process_index()}"
        self.steps, self.seen, self.active = steps, 0, False

    def step(self, state: Any) -> None:
        """After each step: the window opens once the first step is done (before the
        second runs) and closes after ``steps`` traced steps."""
        self.seen += 1
        if self.steps > 0 and self.seen == 1:
            jax.block_until_ready(state)
            jax.profiler.start_trace(str(self.directory))
            self.active = True
        elif self.active and self.seen == 1 + self.steps:
            self.stop(state)

    def stop(self, state: Any) -> None:
        """End the window once ``state`` (a live step's output) is computed."""
        if self.active:
            jax.block_until_ready(state)
            self.abandon()

    def abandon(self) -> None:
        """End an open trace without waiting on anything (after an error: the last state
        may have been donated to a step that failed)."""
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


IN_FLIGHT = 2  # steps dispatched beyond the last one the progress bars count as done


@dataclasses.dataclass
class Trainer:
    """The jitted step and where each epoch's inputs come from (the images, or a cache)."""

    run: Run
    step_fn: Callable[[Any, Any, Any], tuple[Any, jax.Array]]  # (state, inputs, valid)
    mode: str  # the feature cache in use: 'memory', 'disk' or 'off'
    store: Any = None
    position: np.ndarray | None = None  # training row -> its place in this process's store

    def inputs(self, epoch: int, skip: int = 0) -> Iterator[tuple[Any, Any]]:
        """The epoch's (inputs, valid) batches from its ``skip``-th on (a resume within the epoch)."""
        run, config = self.run, self.run.config
        rows, valid = pipeline.epoch_batches(len(run.train), config.batch_size, config.seed, epoch, config.drop_last)
        mine = pipeline.share(config.batch_size, jax.process_index(), jax.process_count())
        limit = run.epoch_steps(epoch)
        rows, valid = rows[skip:limit, mine], valid[skip:limit, mine]
        store, position = self.store, self.position
        if store is None or position is None:
            images = (b["image"] for b in pipeline.load_batches(run.train, rows, "train"))
            return prefetch(zip(images, valid), run.put)
        return prefetch(zip(rows, valid), lambda r_v: run.put((store.read(position[r_v[0]]), r_v[1])))

    def epoch(
        self, state: Any, epoch: int, profiler: Profiler, stop: StopRequest, overall: Any, skip: int = 0
    ) -> tuple[Any, dict | None]:
        """One epoch of steps from its ``skip``-th; the losses come to the host once, at its
        end. The bars advance as steps finish (IN_FLIGHT steps behind the dispatch, which
        keeps the device busy). Returns (state, None) when a stop was requested before
        the epoch's end: the state is that of the last step done."""
        config = self.run.config
        limit = self.run.epoch_steps(epoch)
        steps = limit - skip
        desc = f"[{label(config)}] epoch {epoch}/{config.num_epochs}"
        bar = tqdm.tqdm(total=limit, initial=skip, desc=desc, unit="step", leave=False, disable=None)
        on_device: list[jax.Array] = []
        in_flight: collections.deque = collections.deque()
        start = time.perf_counter()

        def finished(count: int) -> None:
            for _ in range(count):
                in_flight.popleft().block_until_ready()
                bar.update()
                overall.update()

        with stop.deferred():
            for x, valid in self.inputs(epoch, skip):
                state, loss = self.step_fn(state, x, valid)
                profiler.step(state)
                on_device.append(loss)
                in_flight.append(loss)
                finished(max(len(in_flight) - IN_FLIGHT, 0))
                if stop.requested:
                    break
            finished(len(in_flight))
        losses = np.asarray(jax.device_get(on_device))
        seconds = time.perf_counter() - start
        bar.close()
        _check_finite(losses, epoch, self.run.steps_per_epoch, skip)
        if len(losses) < steps:
            return state, None
        # The images trained on (every step but an epoch's last is full; padding is not counted).
        full = limit < self.run.steps_per_epoch or config.drop_last
        total = limit * config.batch_size if full else len(self.run.train)
        speed = (total - skip * config.batch_size) / seconds
        return state, {"epoch": epoch, "step": int(state.step), "loss": float(losses.mean()), "steps": steps,
                       "images_per_second": speed, "feature_cache": self.mode}  # fmt: skip

    def close(self, finished: bool) -> None:
        if self.store is not None:
            self.store.close(delete=finished)  # a finished run needs its cache no more; a failed one resumes


def make_trainer(run: Run, tx: optax.GradientTransformation, start_step: int) -> Trainer:
    """The step for config.feature_cache as resolved: from cached features, or from the
    images (nothing left to train needs no cache)."""
    config = run.config
    mode = run.feature_mode if start_step < run.total_steps else FeatureCache.OFF.value
    if mode == FeatureCache.OFF:
        image_step = steps.make_image_train_step(run.model, tx, run.mesh, config.imagenet_normalize, config.seed)
        return Trainer(run, lambda state, images, valid: image_step(state, run.teacher_vars, images, valid), mode)
    n, p, count = len(run.train), jax.process_index(), jax.process_count()
    owned = pipeline.owned_rows(n, config.batch_size, config.seed, p, count)
    position = np.full(n, -1, np.int64)
    position[owned] = np.arange(len(owned))
    assert run.feature_dir is not None  # setup resolves it for every training run
    store = cached_features(run, owned, mode, run.feature_dir)
    return Trainer(run, steps.make_train_step(run.model, tx, run.mesh, config.seed), mode, store, position)


def _category_epochs(config: Any) -> Any:
    """config with num_epochs from num_epochs_by_category where the category has its own."""
    if modes.Setting(config.setting) is modes.Setting.UNIFIED:
        return config  # one schedule over the union
    epochs = config.num_epochs_by_category.get(config.dataset.category)
    if epochs is None or epochs == config.num_epochs:
        return config
    _log("category %s: %d epochs (config.num_epochs_by_category, over num_epochs=%d)",
         config.dataset.category, epochs, config.num_epochs)  # fmt: skip
    config = config.copy_and_resolve_references()
    config.num_epochs = int(epochs)
    return config


def optimizer(run: Run) -> optax.GradientTransformation:
    """The model's optimizer; with config.lr_decay_epoch > 0, every update (so every
    learning rate, the model's one or several) is multiplied by config.lr_decay_factor
    after that many epochs: ADer's step schedule, applied around any model without
    touching it (Adam's update is linear in its rate). An epoch, not a fraction of the
    run, so a rerun that extends num_epochs leaves the boundary where it was. Without it
    the optimizer state is the model's own, as in every workdir before the key existed."""
    config = run.config
    tx = run.model.optimizer(config, run.total_steps)
    if config.lr_decay_epoch <= 0:
        return tx
    boundary = int(config.lr_decay_epoch) * run.steps_per_epoch
    factor = float(config.lr_decay_factor)
    return optax.chain(tx, optax.scale_by_schedule(lambda count: jnp.where(count < boundary, 1.0, factor)))


def _initial_state(run: Run, tx: optax.GradientTransformation, manager: Any) -> Any:
    """A fresh train state, or the workdir's latest (which an interrupt may have saved
    within an epoch)."""
    _, student_vars = run.model.init(jax.random.key(run.config.seed), run.config.image_size)
    state = jax.device_put(state_lib.create_train_state(student_vars, tx), sharding.replicated(run.mesh))
    if manager.latest_step() is None:
        return state
    state = workdir_lib.restore_state(manager, state)
    epoch, skip = divmod(int(state.step), run.steps_per_epoch)
    within = f", {skip} of its {run.steps_per_epoch} steps done" if skip else ""
    if int(state.step) < run.total_steps:  # a finished run is evaluated only (_train says so)
        _log("resuming from step %d (epoch %d%s)", int(state.step), epoch + 1 if skip else epoch, within)
    return state


def _whole(state: Any) -> bool:
    """No buffer of ``state`` was given to a step that did not finish (a second Ctrl-C)."""
    return not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree_util.tree_leaves(state))


def train_and_evaluate(config: Any, workdir: str | Path, dataset: data.Dataset | None = None) -> dict:
    """Train config.dataset.category (resuming from the workdir's latest checkpoint); after
    each epoch the hooks: checkpoint, the evaluators due (config.evals), the writer.
    Ctrl-C saves the state where that is safe (StopRequest) and raises Interrupted, so
    a rerun loses at most the epoch in progress. Returns the last evaluation's result."""
    workdir = Path(workdir)
    config = _category_epochs(config)
    with _naming(label(config)):
        return _train(config, workdir, dataset)


def _train(config: Any, workdir: Path, dataset: data.Dataset | None) -> dict:
    run = setup(config, workdir, writing=True, dataset=dataset)
    config = run.config  # resolved against the workdir (config_lib.for_workdir)
    manager = workdir_lib.checkpoint_manager(workdir, config.keep_checkpoints)
    latest = manager.latest_step()
    if latest is not None and latest >= run.total_steps:  # trained to the end: nothing to train
        why = _stale(run, latest)
        if jax.process_count() > 1:  # every process must take the same path: the evaluation is a collective
            from jax.experimental import multihost_utils

            if np.max(multihost_utils.process_allgather(np.int32(why is not None))):
                why = why or "another process finds the stored evaluation out of date"
        if why is None:
            manager.close()
            folder = outputs.evaluation_dir(workdir, int(config.num_epochs))
            _log("trained to step %d and evaluated with these settings (%s): nothing to do; "
                 "`rdjax eval` evaluates again", latest, folder)  # fmt: skip
            return workdir_lib.read_json(folder / "metrics.json")
        _log("trained to step %d already: evaluating it again, no training (%s)", latest, why)
    _remove_leftovers(workdir)
    writer = Writer(workdir)
    writer.config(config)
    tx = optimizer(run)
    spe = run.steps_per_epoch
    result: dict = {}
    finished = [False]
    with contextlib.ExitStack() as cleanup, StopRequest() as stop:  # cleanup also on an error, whatever another raised
        state = _initial_state(run, tx, manager)
        saved = start = int(state.step)
        start_epoch, skip = divmod(start, spe)
        if start >= run.total_steps:  # trained to the end, which may lie inside its last epoch
            start_epoch, skip = config.num_epochs, 0
        epoch = start_epoch + 1
        cleanup.callback(manager.close)  # the checkpoints are flushed

        def save() -> None:
            nonlocal saved
            with stop.deferred():
                workdir_lib.save_state(manager, int(state.step), state)
                writer.checkpoint()
            saved = int(state.step)

        try:
            trainer = make_trainer(run, tx, start)
            cleanup.callback(lambda: trainer.close(finished[0]))  # a disk cache is kept for the resume
            writer.resume(start_epoch)
            cleanup.callback(writer.close)
            profiler = Profiler(workdir, config.profile_steps)
            cleanup.callback(profiler.abandon)
            total = run.total_steps
            overall = tqdm.tqdm(total=total, initial=min(start, total), desc=f"[{label(config)}] training",
                                unit="step", disable=None, dynamic_ncols=True)  # fmt: skip
            cleanup.callback(overall.close)
            if start > total:
                _log("note: the workdir's step %d is past the run's %d steps: evaluating it as it is", start, total)
            for epoch in range(start_epoch + 1, config.num_epochs + 1):
                state, entry = trainer.epoch(state, epoch, profiler, stop, overall, skip)
                skip = 0
                profiler.stop(state)  # checkpoints and evaluations stay out of the trace
                if entry is None:  # stopped within the epoch
                    break
                writer.train(entry)
                last = epoch == config.num_epochs
                if epoch % config.checkpoint_every == 0 or last:
                    save()
                if stop.requested:
                    break
                due = evaluators_lib.due(config.evals, run.evaluators, epoch, config.eval_every, last)
                if due:
                    result = evaluate_student(run, state.student_vars, epoch, int(state.step), due)
                    writer.evaluation(result)
            if not stop.requested and not result:  # already trained: evaluate what is there
                result = evaluate_student(run, state.student_vars, start_epoch, int(state.step))
                writer.evaluation(result)
        except KeyboardInterrupt:  # outside a step (an evaluation, the feature cache), or a second press
            stop.requested = True
        if stop.requested:
            if int(state.step) != saved and _whole(state):
                save()
            if saved >= run.total_steps:  # nothing left to train: the last evaluation was stopped
                raise Interrupted(
                    f"interrupted after the last epoch ({config.num_epochs}, step {saved}), before its evaluation "
                    "ended; the training is complete: rerun the same command to evaluate it"
                )
            resume_epoch, done = divmod(saved, spe)
            where = f"epoch {resume_epoch + 1}" + (f", step {saved}" if done else "")
            raise Interrupted(f"interrupted at epoch {epoch}; rerun the same command to resume from {where}")
        finished[0] = True
    writer.finish(config)
    if jax.process_count() > 1:
        tqdm.tqdm.write(f"process {jax.process_index()} of {jax.process_count()}: decoded "
                        f"{pipeline.decoded['train']} training and {pipeline.decoded['test']} test images")  # fmt: skip
    return result


def evaluate(config: Any, workdir: str | Path, dataset: data.Dataset | None = None) -> dict:
    """Evaluate the latest checkpoint of a workdir (trained here or ported), without
    building an optimizer."""
    workdir = Path(workdir)
    if not (workdir / workdir_lib.CHECKPOINTS).is_dir():
        raise WorkdirError(f"{workdir / workdir_lib.CHECKPOINTS}: no checkpoint to evaluate")
    with _naming(label(config)):
        run = setup(config, workdir, writing=False, dataset=dataset)
        student_shapes = run.model.abstract_variables()[1]
        step, student_vars = workdir_lib.restore_student(workdir, student_shapes, sharding.replicated(run.mesh))
        trained = workdir_lib.load_config(workdir)  # an evaluation may give another batch size
        epoch = step // max(pipeline.steps_per_epoch(len(run.train), trained.batch_size, trained.drop_last), 1)
        if trained.total_steps and step >= trained.total_steps:  # its last epoch may stop early
            epoch = int(trained.num_epochs)
        _remove_leftovers(workdir)
        if jax.process_index() == 0:  # the previous calibration and report, even of another epoch
            _keep_results(workdir, outputs.evaluation_dir(workdir, epoch))
        result = evaluate_student(run, student_vars, epoch, step)
    Writer(workdir).evaluation(result)
    return result


def run(config: Any, workdir: str | Path, mode: str = "train") -> dict[str, dict]:
    """Train ('train') or evaluate ('eval') every category the config asks for:
    {category: result}. With dataset.category='all' (or all ten novelty classes) each
    category runs in workdir/<category>, and workdir/results.md holds one table over
    them with the mean row. config.setting='unified': one model over every category, in
    workdir itself, whose results.md is that table."""
    workdir = Path(workdir)
    config_lib.check(config, jax.device_count())  # before the dataset is built (it may generate or extract)
    registry.check(config)
    dataset = registry.build_dataset(config.dataset)
    categories = dataset.categories()
    if not categories:
        raise DataError(f"{config.dataset.root}: no categories found (folders with train/ and test/)")
    step = train_and_evaluate if mode == "train" else evaluate
    if modes.Setting(config.setting) is modes.Setting.UNIFIED:  # one model, one workdir: the table is its results.md
        return dict(step(config, workdir, dataset)["categories"])
    several = len(categories) > 1 or config.dataset.category == "all"
    results = {}
    for category in categories:
        run_config = config.copy_and_resolve_references()  # the caller's config keeps 'all'
        run_config.dataset.category = category
        results[category] = step(run_config, workdir / category if several else workdir, dataset)
    if several:
        Writer(workdir).summary(results, dataset.summary_keys or metrics.TABLE_KEYS)
    return results
