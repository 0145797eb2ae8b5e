"""The training loop: train_and_evaluate (flax examples' shape) and evaluate.

Data flows one way: the dataset's splits -> the teacher's features (cached once) -> the
jitted step -> maps -> the configured evaluators -> the workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import tqdm

from rdjax import config as config_lib, data, evaluators, maps, outputs, sharding, steps, teacher, workdir as workdir_lib
from rdjax.data.pipeline import epoch_batches, prefetch
from rdjax.data.preprocess import Split
from rdjax.errors import DataError, TrainingError, WorkdirError
from rdjax.features import cache_teacher_features
from rdjax.registry import MODELS


def _log(fmt: str, *args: Any) -> None:
    """Progress lines on stdout, above any progress bar (library logs stay at WARNING)."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(fmt % args)


@dataclasses.dataclass
class Run:
    """What one run of one category works with, built once by `setup`."""

    config: Any
    workdir: Path
    model: Any
    mesh: jax.sharding.Mesh
    put: Callable[[Any], Any]
    teacher_vars: Any
    warnings: list[str]
    train: Split
    test: Split
    validation: Split | None

    @property
    def steps_per_epoch(self) -> int:
        return max(len(epoch_batches(len(self.train), self.config.batch_size, self.config.seed, 0, self.mesh.size)), 1)

    @property
    def eval_batch(self) -> int:
        return sharding.round_up(self.config.eval_batch_size, self.mesh.size)


def setup(config: Any, workdir: Path, writing: bool, dataset: data.Dataset | None = None) -> Run:
    """Check the config, load the data, then (and only then) touch the workdir: bad
    settings and bad data fail before anything is written. ``writing``: the run will
    write checkpoints, so the workdir must take them."""
    config_lib.check(config, jax.device_count())
    model = MODELS.get(config.model.name)(config.model.arch, config.dtype)
    dataset = dataset or data.build(config.dataset)
    train_split, test_split = dataset.load(config.dataset.category, config.image_size)
    train_split, validation = data.hold_out(train_split, config.threshold.validation_size, config.seed)
    teacher_vars, warnings, saved = teacher.for_run(config, model, workdir)  # a bad weights file fails here
    if writing:
        student = model.abstract_variables()[1]
        params = sum(x.size for x in jax.tree_util.tree_leaves(student))
        workdir_lib.check_writable(workdir, params * 4 * 3 * 2)  # params + Adam's two moments, float32, twice
    if not saved:
        workdir_lib.save_teacher(workdir / workdir_lib.TEACHER, model.arch, teacher_vars)  # every process takes part
    mesh = sharding.make_mesh()
    return Run(
        config=config, workdir=workdir, model=model, mesh=mesh,
        put=functools.partial(sharding.put_batch, sharding=sharding.batch_sharding(mesh)),
        teacher_vars=jax.device_put(teacher_vars, sharding.replicated(mesh)), warnings=warnings,
        train=train_split, test=test_split, validation=validation,
    )


def evaluate_student(run: Run, student_vars: Any, epoch: int, step: int, writer: Any = None) -> dict:
    """Maps of every test image, the configured evaluators, and their files."""
    config = run.config
    eval_step = maps.eval_step_for(run.model, config)

    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return maps.predict_images(eval_step, run.teacher_vars, student_vars, images, run.eval_batch, run.put)

    start = time.perf_counter()
    test_maps, scores = predict(run.test.images)
    seconds = time.perf_counter() - start
    out_dir = outputs.evaluation_dir(run.workdir, epoch) if jax.process_index() == 0 else None
    result = evaluators.run_all(config.evaluators, evaluators.EvalData(
        config=config, test=run.test, maps=test_maps, scores=scores, predict=predict, validation=run.validation,
        out_dir=out_dir, result={"warnings": list(run.warnings)},
    ))
    for w in result["warnings"][len(run.warnings):]:
        _log("note: %s", w)
    if "calibration" in result:
        result["calibration"].update(step=step, epoch=epoch)
    result.update(
        epoch=epoch, step=step, seed=config.seed, category=config.dataset.category, model=config.model.name,
        arch=config.model.arch, teacher_weights=config.model.teacher_weights, dtype=config.dtype,
        image_size=config.image_size, eval_images_per_second=len(run.test) / seconds,
    )
    if jax.process_index() == 0:
        outputs.write_evaluation(run.workdir, epoch, result)
        if writer is not None:
            for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
                if key in result:
                    writer.add_scalar(f"eval/{key}", result[key], step)
            writer.flush()
    if "image_auroc" in result:
        _log("epoch %d: image AUROC %.4f  pixel AUROC %.4f  AUPRO %.4f",
             epoch, result["image_auroc"], result["pixel_auroc"], result["aupro"])
    return result


def _check_finite(losses: np.ndarray, epoch: int, steps_per_epoch: int) -> None:
    if not np.all(np.isfinite(losses)):
        bad = int(np.flatnonzero(~np.isfinite(losses))[0])
        raise TrainingError(
            f"non-finite loss {losses[bad]} at step {(epoch - 1) * steps_per_epoch + bad + 1} (epoch {epoch}); "
            f"stopped, the last good checkpoint is kept"
        )


def train_and_evaluate(config: Any, workdir: str | Path, dataset: data.Dataset | None = None) -> dict:
    """Train config.dataset.category (resuming from the workdir's latest checkpoint),
    evaluating every config.eval_every epochs and at the end. Returns the last
    evaluation's result."""
    workdir = Path(workdir)
    run = setup(config, workdir, writing=True, dataset=dataset)
    if jax.process_index() == 0:
        workdir_lib.save_config(workdir, config)
    tx = steps.optimizer_from_config(config)
    _, student_vars = run.model.init(jax.random.key(config.seed), config.image_size)
    state = jax.device_put(steps.create_train_state(student_vars, tx), sharding.replicated(run.mesh))
    steps_per_epoch = run.steps_per_epoch
    manager = workdir_lib.checkpoint_manager(workdir, config.keep_checkpoints)
    start_epoch = 0
    if manager.latest_step() is not None:
        state = workdir_lib.restore_state(manager, state)
        start_epoch = int(state.step) // steps_per_epoch
        _log("resuming from step %d (epoch %d)", int(state.step), start_epoch)

    features = cache_teacher_features(run.model, run.teacher_vars, run.train.images, run.eval_batch, run.put,
                                      config.imagenet_normalize)
    step_fn = steps.make_train_step(run.model, tx, run.mesh)
    writer = None
    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(workdir / "tensorboard"))

    log_path = workdir / "train_log.json"
    train_log = [e for e in (json.loads(log_path.read_text()) if log_path.is_file() else []) if e["epoch"] <= start_epoch]
    n = len(run.train)
    result: dict = {}
    for epoch in range(start_epoch + 1, config.num_epochs + 1):
        batches = epoch_batches(n, config.batch_size, config.seed, epoch, run.mesh.size)
        gather = lambda idx: run.put(tuple(f[sharding.local_share(idx)] for f in features))  # noqa: E731
        losses = []
        start = time.perf_counter()
        bar = tqdm.tqdm(total=n, desc=f"epoch {epoch}/{config.num_epochs}", unit="img", leave=False, disable=None)
        for idx, feats in zip(batches, prefetch(batches, gather)):
            state, loss = step_fn(state, feats)
            losses.append(loss)
            bar.update(len(idx))
        losses = np.asarray(jax.device_get(losses))  # one host round-trip per epoch
        seconds = time.perf_counter() - start
        bar.close()
        _check_finite(losses, epoch, steps_per_epoch)
        _log("epoch %d: loss %.5f, %.1f img/s", epoch, losses.mean(), n / seconds)
        train_log.append({"epoch": epoch, "step": int(state.step), "loss": float(losses.mean()),
                          "images_per_second": n / seconds})
        if writer is not None:
            writer.add_scalar("train/loss", float(losses.mean()), int(state.step))
            writer.add_scalar("train/images_per_second", n / seconds, int(state.step))
        last = epoch == config.num_epochs
        if epoch % config.checkpoint_every == 0 or last:
            workdir_lib.save_state(manager, int(state.step), state)
            if jax.process_index() == 0:
                workdir_lib.write_json(log_path, train_log)
        if epoch % config.eval_every == 0 or last:
            result = evaluate_student(run, state.student_vars, epoch, int(state.step), writer)
    if not result:  # already trained: evaluate what is there
        result = evaluate_student(run, state.student_vars, int(state.step) // steps_per_epoch, int(state.step), writer)
    manager.close()
    if writer is not None:
        writer.close()
    return result


def evaluate(config: Any, workdir: str | Path, dataset: data.Dataset | None = None) -> dict:
    """Evaluate the latest checkpoint of a workdir (trained here or ported), without
    building an optimizer."""
    workdir = Path(workdir)
    if not (workdir / workdir_lib.CHECKPOINTS).is_dir():
        raise WorkdirError(f"{workdir / workdir_lib.CHECKPOINTS}: no checkpoint to evaluate")
    run = setup(config, workdir, writing=False, dataset=dataset)
    student_shapes = run.model.abstract_variables()[1]
    step, student_vars = workdir_lib.restore_student(workdir, student_shapes, sharding.replicated(run.mesh))
    return evaluate_student(run, student_vars, step // run.steps_per_epoch, step)


def run(config: Any, workdir: str | Path, mode: str = "train") -> dict[str, dict]:
    """Train ('train') or evaluate ('eval') every category the config asks for:
    {category: result}. With dataset.category='all' (or all ten novelty classes) each
    category runs in workdir/<category>, and workdir/results.md holds one table over
    them with the mean row."""
    workdir = Path(workdir)
    config_lib.check(config, jax.device_count())  # before the dataset is built (it may generate or extract)
    dataset = data.build(config.dataset)
    categories = dataset.categories()
    if not categories:
        raise DataError(f"{config.dataset.root}: no categories found (folders with train/ and test/)")
    several = len(categories) > 1 or config.dataset.category == "all"
    step = train_and_evaluate if mode == "train" else evaluate
    results = {}
    for category in categories:
        run_config = config.copy_and_resolve_references()  # the caller's config keeps 'all'
        run_config.dataset.category = category
        results[category] = step(run_config, workdir / category if several else workdir, dataset)
    if several and jax.process_index() == 0:
        workdir_lib.write_text(workdir / "results.md", outputs.summary_markdown(results, dataset.summary_keys))
    return results
