"""The training loop: train_and_evaluate (flax examples' shape), evaluate and run.

Data flows one way: the dataset's splits (decoded batch by batch, each process its own
share) -> the teacher's features (config.feature_cache, rdjax.train.cache) -> the jitted
step -> maps -> the configured evaluators (rdjax.train.evaluating) -> the workdir
(rdjax.train.hooks.Writer).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
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
from rdjax.data import pipeline
from rdjax.data.pipeline import prefetch
from rdjax.errors import DataError, Interrupted, TrainingError, WorkdirError
from rdjax.modes import FeatureCache
from rdjax.outputs import files
from rdjax.runtime import disk, sharding
from rdjax.runtime import state as state_lib
from rdjax.runtime import workdir as workdir_lib
from rdjax.scoring import metrics
from rdjax.train import steps
from rdjax.train.cache import cached_features
from rdjax.train.evaluating import evaluate_student, keep_results, stale
from rdjax.train.hooks import Profiler, StopRequest, Writer
from rdjax.train.log import label, log, naming
from rdjax.train.prepare import Run, category_epochs, check_model_of, setup


def _remove_leftovers(workdir: Path) -> None:
    """What a killed run left under temporary names (disk.remove_leftovers),
    removed by the next run that writes the workdir, and named."""
    if jax.process_index() == 0:
        for path in disk.remove_leftovers(workdir):
            log("removed %s, left by a run that was stopped while writing it", path)


def _check_finite(losses: np.ndarray, epoch: int, steps_per_epoch: int, skip: int) -> None:
    if not np.all(np.isfinite(losses)):
        bad = int(np.flatnonzero(~np.isfinite(losses))[0])
        raise TrainingError(
            f"non-finite loss {losses[bad]} at step {(epoch - 1) * steps_per_epoch + skip + bad + 1} (epoch {epoch}); "
            f"stopped, the last good checkpoint is kept"
        )


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
    if int(state.step) < run.total_steps:  # a finished run is evaluated only (_stored_result says so)
        log("resuming from step %d (epoch %d%s)", int(state.step), epoch + 1 if skip else epoch, within)
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
    config = category_epochs(config)
    with naming(label(config)):
        return _train(config, workdir, dataset)


@dataclasses.dataclass
class _Progress:
    """Where a training run stands: its latest state, the step last saved, the epoch under
    way, and whether it finished (a disk cache is then deleted, else kept for the resume)."""

    manager: Any
    writer: Writer
    stop: StopRequest
    state: Any
    saved: int
    epoch: int
    finished: bool = False

    def save(self) -> None:
        """A checkpoint and the train log, written where Ctrl-C cannot cut them."""
        with self.stop.deferred():
            workdir_lib.save_state(self.manager, int(self.state.step), self.state)
            self.writer.checkpoint()
        self.saved = int(self.state.step)


def _train(config: Any, workdir: Path, dataset: data.Dataset | None) -> dict:
    run = setup(config, workdir, writing=True, dataset=dataset)
    config = run.config  # resolved against the workdir (config_lib.for_workdir)
    manager = workdir_lib.checkpoint_manager(workdir, config.keep_checkpoints)
    stored = _stored_result(run, manager)
    if stored is not None:
        return stored
    _remove_leftovers(workdir)
    writer = Writer(workdir)
    writer.config(config)
    tx = optimizer(run)
    result: dict = {}
    with contextlib.ExitStack() as cleanup, StopRequest() as stop:  # cleanup also on an error, whatever another raised
        state = _initial_state(run, tx, manager)
        start = int(state.step)
        start_epoch, skip = divmod(start, run.steps_per_epoch)
        if start >= run.total_steps:  # trained to the end, which may lie inside its last epoch
            start_epoch, skip = config.num_epochs, 0
        progress = _Progress(manager, writer, stop, state, saved=start, epoch=start_epoch + 1)
        cleanup.callback(manager.close)  # the checkpoints are flushed
        try:
            result = _run_epochs(run, tx, progress, cleanup, start_epoch, skip)
        except KeyboardInterrupt:  # outside a step (an evaluation, the feature cache), or a second press
            stop.requested = True
        if stop.requested:
            _interrupted(run, progress)
        progress.finished = True
    writer.finish(config)
    if jax.process_count() > 1:
        tqdm.tqdm.write(f"process {jax.process_index()} of {jax.process_count()}: decoded "
                        f"{pipeline.decoded['train']} training and {pipeline.decoded['test']} test images")  # fmt: skip
    return result


def _stored_result(run: Run, manager: Any) -> dict | None:
    """A run trained to the end whose stored evaluation is current: that evaluation's
    result, with nothing to do. None where there is training or an evaluation to do."""
    latest = manager.latest_step()
    if latest is None or latest < run.total_steps:
        return None
    why = stale(run, latest)
    if jax.process_count() > 1:  # every process must take the same path: the evaluation is a collective
        from jax.experimental import multihost_utils

        if np.max(multihost_utils.process_allgather(np.int32(why is not None))):
            why = why or "another process finds the stored evaluation out of date"
    if why is None:
        manager.close()
        folder = files.evaluation_dir(run.workdir, int(run.config.num_epochs))
        log("trained to step %d and evaluated with these settings (%s): nothing to do; "
            "`rdjax eval` evaluates again", latest, folder)  # fmt: skip
        return disk.read_json(folder / "metrics.json")
    log("trained to step %d already: evaluating it again, no training (%s)", latest, why)
    return None


def _run_epochs(
    run: Run,
    tx: optax.GradientTransformation,
    progress: _Progress,
    cleanup: contextlib.ExitStack,
    start_epoch: int,
    skip: int,
) -> dict:
    """The trainer, the writer's resume, the profiler and the overall bar (each closed by
    ``cleanup``), then `_epochs`."""
    config, start = run.config, int(progress.state.step)
    trainer = make_trainer(run, tx, start)
    cleanup.callback(lambda: trainer.close(progress.finished))  # a disk cache is kept for the resume
    progress.writer.resume(start_epoch)
    cleanup.callback(progress.writer.close)
    profiler = Profiler(run.workdir, config.profile_steps)
    cleanup.callback(profiler.abandon)
    total = run.total_steps
    overall = tqdm.tqdm(total=total, initial=min(start, total), desc=f"[{label(config)}] training",
                        unit="step", disable=None, dynamic_ncols=True)  # fmt: skip
    cleanup.callback(overall.close)
    if start > total:
        log("note: the workdir's step %d is past the run's %d steps: evaluating it as it is", start, total)
    return _epochs(run, trainer, progress, profiler, overall, start_epoch, skip)


def _epochs(
    run: Run, trainer: Trainer, progress: _Progress, profiler: Profiler, overall: Any, start_epoch: int, skip: int
) -> dict:
    """The epochs left, each followed by the hooks: checkpoint, the evaluators due, the
    writer. Returns the last evaluation's result (an already trained run: its state's)."""
    config, stop, writer = run.config, progress.stop, progress.writer
    result: dict = {}
    for epoch in range(start_epoch + 1, config.num_epochs + 1):
        progress.epoch = epoch
        progress.state, entry = trainer.epoch(progress.state, epoch, profiler, stop, overall, skip)
        skip = 0
        profiler.stop(progress.state)  # checkpoints and evaluations stay out of the trace
        if entry is None:  # stopped within the epoch
            break
        writer.train(entry)
        last = epoch == config.num_epochs
        if epoch % config.checkpoint_every == 0 or last:
            progress.save()
        if stop.requested:
            break
        due = evaluators_lib.due(config.evals, run.evaluators, epoch, config.eval_every, last)
        if due:
            result = evaluate_student(run, progress.state.student_vars, epoch, int(progress.state.step), due)
            writer.evaluation(result)
    if not stop.requested and not result:  # already trained: evaluate what is there
        result = evaluate_student(run, progress.state.student_vars, start_epoch, int(progress.state.step))
        writer.evaluation(result)
    return result


def _interrupted(run: Run, progress: _Progress) -> None:
    """After a stop: the state saved where it is whole and not saved yet, then Interrupted
    with where a rerun resumes."""
    if int(progress.state.step) != progress.saved and _whole(progress.state):
        progress.save()
    saved, config = progress.saved, run.config
    if saved >= run.total_steps:  # nothing left to train: the last evaluation was stopped
        raise Interrupted(
            f"interrupted after the last epoch ({config.num_epochs}, step {saved}), before its evaluation "
            "ended; the training is complete: rerun the same command to evaluate it"
        )
    resume_epoch, done = divmod(saved, run.steps_per_epoch)
    where = f"epoch {resume_epoch + 1}" + (f", step {saved}" if done else "")
    raise Interrupted(f"interrupted at epoch {progress.epoch}; rerun the same command to resume from {where}")


def evaluate(config: Any, workdir: str | Path, dataset: data.Dataset | None = None) -> dict:
    """Evaluate the latest checkpoint of a workdir (trained here or ported), without
    building an optimizer."""
    workdir = Path(workdir)
    if not (workdir / workdir_lib.CHECKPOINTS).is_dir():
        raise WorkdirError(f"{workdir / workdir_lib.CHECKPOINTS}: no checkpoint to evaluate")
    with naming(label(config)):
        run = setup(config, workdir, writing=False, dataset=dataset)
        student_shapes = run.model.abstract_variables()[1]
        step, student_vars = workdir_lib.restore_student(workdir, student_shapes, sharding.replicated(run.mesh))
        trained = workdir_lib.load_config(workdir)  # an evaluation may give another batch size
        epoch = step // max(pipeline.steps_per_epoch(len(run.train), trained.batch_size, trained.drop_last), 1)
        if trained.total_steps and step >= trained.total_steps:  # its last epoch may stop early
            epoch = int(trained.num_epochs)
        _remove_leftovers(workdir)
        if jax.process_index() == 0:  # the previous calibration and report, even of another epoch
            keep_results(workdir, files.evaluation_dir(workdir, epoch))
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
    check_model_of(workdir, config, evaluating=mode != "train")
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
