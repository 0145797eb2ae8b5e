"""Train state, loss and the jitted train step.

The train state holds only what trains (OCBE + decoder) and its optimizer state. The
teacher's variables are a separate argument: they are never differentiated, never seen
by the optimizer, and never donated or rewritten.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging

from rdjax.data.preprocess import Split
from rdjax.models.layers import at_least_float32
from rdjax.models.rd4ad import RD4AD, Features, Variables


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def student_vars(self) -> Variables:
        return {"params": self.params, "batch_stats": self.batch_stats}


def make_optimizer(learning_rate: float = 0.005, b1: float = 0.5, b2: float = 0.999) -> optax.GradientTransformation:
    """Adam with the official defaults (lr 0.005, betas (0.5, 0.999))."""
    return optax.adam(learning_rate, b1=b1, b2=b2)


def create_train_state(student_vars: Variables, tx: optax.GradientTransformation) -> TrainState:
    params = student_vars["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=student_vars["batch_stats"],
        opt_state=tx.init(params),
    )


def cosine_distance_loss(teacher: Features, student: Features, eps: float = 1e-8) -> jax.Array:
    """Official loss: per sample, 1 - cos between the *flattened* (H*W*C) feature maps,
    averaged over the batch and summed over the three scales.

    The paper's text describes a per-pixel loss; the code's flattened one is what
    produced the published numbers (see shared design notes), so rdjax uses it.
    """
    total = jnp.zeros((), jnp.float32)
    for t, s in zip(teacher, student):
        t = at_least_float32(t.reshape(t.shape[0], -1))
        s = at_least_float32(s.reshape(s.shape[0], -1))
        dot = jnp.sum(t * s, axis=1)
        norm = jnp.linalg.norm(t, axis=1) * jnp.linalg.norm(s, axis=1)
        total = total + jnp.mean(1.0 - dot / jnp.maximum(norm, eps))
    return total


def train_step_features(
    model: RD4AD, tx: optax.GradientTransformation, state: TrainState, teacher_feats: Features
) -> tuple[TrainState, jax.Array]:
    """One optimizer step given the teacher's features (precomputed or fresh)."""

    def loss_fn(params: Any) -> tuple[jax.Array, Any]:
        s, batch_stats = model.student_features(
            {"params": params, "batch_stats": state.batch_stats}, teacher_feats, train=True
        )
        return cosine_distance_loss(teacher_feats, s), batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    return new_state, loss


def make_train_step(model: RD4AD, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh):
    """The jitted step with explicit shardings: state replicated, features split along the
    batch axis over every device; the old state's buffers are donated."""
    from rdjax.data.pipeline import batch_sharding, replicated

    return jax.jit(
        functools.partial(train_step_features, model, tx),
        in_shardings=(replicated(mesh), batch_sharding(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=0,
    )


def train_step(
    model: RD4AD, tx: optax.GradientTransformation, state: TrainState, teacher_vars: Variables, images: jax.Array
) -> tuple[TrainState, jax.Array]:
    """One step from images: one teacher forward, then the student update."""
    return train_step_features(model, tx, state, model.teacher_features(teacher_vars, images))


# ----------------------------------------------------------------------------- the loop


def _log(fmt: str, *args: Any) -> None:
    """Progress lines on stdout, above any progress bar (library logs stay at WARNING)."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(fmt % args)


class TrainingError(RuntimeError):
    """Training cannot go on (for example a non-finite loss)."""


def load_teacher_vars(config: Any, model: RD4AD, workdir: Path) -> tuple[Variables, list[str]]:
    """The workdir's own teacher if it has one (resume, eval), else config.model.teacher_weights,
    saved into the workdir so the run never depends on the original file again."""
    from rdjax import checkpoint, port

    warnings: list[str] = []
    teacher_dir = workdir / "teacher"
    if teacher_dir.exists():
        arch, variables = checkpoint.restore_teacher(teacher_dir)
        if arch != model.arch:
            raise port.PortError(f"{teacher_dir}: holds a {arch} teacher, but config.model.arch is {model.arch}")
        source = checkpoint.load_config(workdir).model.teacher_weights if (workdir / "config.json").exists() else "workdir"
    else:
        source = config.model.teacher_weights
        if source == "none":
            variables, _ = model.init(jax.random.key(config.seed), config.image_size)
        else:
            variables = port.load_teacher(model.arch, source)
        checkpoint.save_teacher(teacher_dir, model.arch, variables)  # orbax: every process takes part
    if source == "none":
        warnings.append(
            "the teacher is RANDOM (config.model.teacher_weights='none'): results are not comparable with the paper"
        )
        logging.warning("=" * 70)
        logging.warning("RANDOM TEACHER: %s", warnings[-1])
        logging.warning("=" * 70)
    return variables, warnings


def cache_teacher_features(
    model: RD4AD, teacher_vars: Variables, images: np.ndarray, batch_size: int, put, imagenet_normalize: bool = True
) -> list[np.ndarray]:
    """The frozen teacher's features of every training image, computed once.

    With no augmentation (the paper's protocol) they are identical in every epoch, so the
    teacher forward leaves the training loop entirely.
    """
    from rdjax.evaluate import normalize

    from rdjax.data.pipeline import map_global_batches

    @jax.jit
    def features(x: jax.Array) -> Features:
        # Stored in the compute dtype: bfloat16 halves the cache.
        return tuple(f.astype(model.dtype) for f in model.teacher_features(teacher_vars, normalize(x, imagenet_normalize)))

    return map_global_batches(features, images, batch_size, put, desc="teacher features")


def check_config(config: Any) -> None:
    """Fail before any work on settings that cannot run: one clear line each."""
    from rdjax.models.resnet import check_image_size

    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.dtype={config.dtype!r} is not supported; choose 'float32' or 'bfloat16'")
    RD4AD(config.model.arch, config.dtype)  # unknown arch
    size = config.image_size
    if size % 32:
        check_image_size((1, size, size, 3))
    for key in ("batch_size", "eval_batch_size", "num_epochs", "eval_every", "checkpoint_every", "keep_checkpoints"):
        if config[key] < 1:
            raise ValueError(f"config.{key}={config[key]} must be at least 1")
    if config.batch_size % jax.device_count():
        raise ValueError(
            f"config.batch_size={config.batch_size} does not divide evenly over {jax.device_count()} devices; "
            f"use a multiple of {jax.device_count()}"
        )
    if config.threshold.method not in ("f1", "quantile"):
        raise ValueError(f"config.threshold.method={config.threshold.method!r}; choose 'f1' or 'quantile'")
    if config.threshold.method == "quantile" and config.threshold.validation_size < 1:
        raise ValueError("config.threshold.method='quantile' needs config.threshold.validation_size >= 1 held-out images")
    if config.map_mode not in ("add", "mul"):
        raise ValueError(f"config.map_mode={config.map_mode!r}; choose 'add' or 'mul'")


def hold_out(train_split: Split, config: Any) -> tuple[Split, Split | None]:
    """Take config.threshold.validation_size normal images out of training, chosen by the
    seed, for threshold calibration; (train, None) when none are asked for."""
    k = config.threshold.validation_size
    if k <= 0:
        return train_split, None
    if k >= len(train_split):
        raise ValueError(f"config.threshold.validation_size={k} leaves no training images (there are {len(train_split)})")
    order = np.random.default_rng([config.seed, 7]).permutation(len(train_split))
    return train_split.subset(np.sort(order[k:])), train_split.subset(np.sort(order[:k]))


def check_workdir(workdir: Path, student_vars: Variables) -> None:
    """A workdir that cannot take a checkpoint fails now, not after hours of training."""
    import shutil
    import tempfile

    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OSError(f"{workdir}: workdir is not writable ({e.strerror or e})") from None
    params = sum(x.size for x in jax.tree_util.tree_leaves(student_vars))
    need = params * 4 * 3 * 2  # params + Adam's two moments, float32, with room for a second copy
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise OSError(f"{workdir}: only {free / 2**20:.0f} MiB free, a checkpoint needs about {need / 2**21:.0f} MiB")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _evaluate_and_write(
    config: Any, workdir: Path, model: RD4AD, teacher_vars: Variables, student_vars: Variables,
    test: Split, epoch: int, step: int, warnings: list[str], put, writer, validation: Split | None = None,
) -> dict:
    from rdjax import evaluate, inference, metrics, report

    eval_step = evaluate.make_eval_step(model, config.map_mode, config.blur_sigma, config.imagenet_normalize)
    start = time.perf_counter()
    batch = _round_up(config.eval_batch_size, jax.device_count())
    maps, scores = evaluate.predict_split(eval_step, teacher_vars, student_vars, test.images, batch, put)
    seconds = time.perf_counter() - start
    result = metrics.compute_all(maps, scores, test.masks, test.labels, test.defect_types, pixel=test.has_masks)
    result["image_auroc_sum"] = metrics.auroc(test.labels, maps.sum(axis=(1, 2)))  # the novelty benchmarks' second score
    if not test.has_masks:
        warnings = warnings + ["the anomalous test images have no masks: image-level metrics only"]
        _log("note: %s", warnings[-1])
    result.update(
        epoch=epoch, step=step, seed=config.seed, category=config.dataset.category, arch=config.model.arch,
        teacher_weights=config.model.teacher_weights, dtype=config.dtype, image_size=config.image_size,
        eval_images_per_second=len(test) / seconds, warnings=warnings,
    )
    if config.threshold.method == "quantile":
        v_maps, v_scores = evaluate.predict_split(eval_step, teacher_vars, student_vars, validation.images, batch, put)
        calibration = inference.calibrate("quantile", v_scores, validation.labels, v_maps, validation.masks,
                                          config.threshold.quantile, f"{len(validation)} held-out train/good images")
    else:
        calibration = inference.calibrate("f1", scores, test.labels, maps, test.masks, config.threshold.quantile,
                                          f"{len(test)} labelled test images")
    calibration.update(step=step, epoch=epoch)
    result["calibration"] = calibration
    if jax.process_index() == 0:
        out = workdir / "eval" / f"epoch_{epoch:04d}"
        evaluate.write_json(workdir / "calibration.json", calibration)
        report.write_report(out / "report.png", test, maps, scores, calibration)
        evaluate.write_overlays(out / "images", test, maps, scores)
        evaluate.write_json(out / "metrics.json", result)
        evaluate.write_text(out / "results.md", evaluate.results_markdown(result))
        evaluate.write_json(workdir / "metrics.json", result)
        evaluate.write_text(workdir / "results.md", evaluate.results_markdown(result))
        if writer is not None:
            for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
                writer.add_scalar(f"eval/{key}", result[key], step)
            writer.flush()
    _log(
        "epoch %d: image AUROC %.4f  pixel AUROC %.4f  AUPRO %.4f",
        epoch, result["image_auroc"], result["pixel_auroc"], result["aupro"],
    )
    return result


def _setup(config: Any, workdir: Path):
    from rdjax.data import pipeline

    model = RD4AD(config.model.arch, config.dtype)
    mesh = pipeline.make_mesh()
    sharding = pipeline.batch_sharding(mesh)
    put = functools.partial(pipeline.put_batch, sharding=sharding)
    teacher_vars, warnings = load_teacher_vars(config, model, workdir)
    teacher_vars = jax.device_put(teacher_vars, pipeline.replicated(mesh))
    _, student_vars = model.init(jax.random.key(config.seed), config.image_size)
    tx = make_optimizer(config.learning_rate, config.adam_b1, config.adam_b2)
    state = jax.device_put(create_train_state(student_vars, tx), pipeline.replicated(mesh))
    return model, mesh, put, teacher_vars, warnings, tx, state


def train_and_evaluate(config: Any, workdir: str | Path) -> dict:
    """Train (resuming from the workdir's latest checkpoint), evaluating every
    config.eval_every epochs and at the end. Returns the last evaluation's metrics."""
    from rdjax import checkpoint
    from rdjax.data import pipeline
    from rdjax.data.datasets import load_dataset

    workdir = Path(workdir)
    check_config(config)
    train_split, test_split = load_dataset(config)  # bad data fails before the workdir is touched
    train_split, validation = hold_out(train_split, config)
    check_workdir(workdir, jax.eval_shape(lambda: RD4AD(config.model.arch).init(jax.random.key(0), 32))[1])
    model, mesh, put, teacher_vars, warnings, tx, state = _setup(config, workdir)
    if jax.process_index() == 0:
        checkpoint.save_config(workdir, config)

    num_devices = mesh.devices.size
    steps_per_epoch = len(pipeline.epoch_batches(len(train_split), config.batch_size, config.seed, 0, num_devices))

    manager = checkpoint.checkpoint_manager(workdir, config.keep_checkpoints)
    start_epoch = 0
    if manager.latest_step() is not None:
        state = checkpoint.restore_state(manager, state)
        start_epoch = int(state.step) // steps_per_epoch
        _log("resuming from step %d (epoch %d)", int(state.step), start_epoch)

    eval_batch = _round_up(config.eval_batch_size, num_devices)
    features = cache_teacher_features(model, teacher_vars, train_split.images, eval_batch, put, config.imagenet_normalize)
    step_fn = make_train_step(model, tx, mesh)
    writer = None
    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(workdir / "tensorboard"))

    log_path = workdir / "train_log.json"
    train_log = [e for e in (json.loads(log_path.read_text()) if log_path.is_file() else []) if e["epoch"] <= start_epoch]
    result: dict = {}
    for epoch in range(start_epoch + 1, config.num_epochs + 1):
        batches = pipeline.epoch_batches(len(train_split), config.batch_size, config.seed, epoch, num_devices)
        gather = lambda idx: put(tuple(f[pipeline.local_share(idx)] for f in features))  # noqa: E731
        losses = []
        start = time.perf_counter()
        bar = tqdm.tqdm(total=len(train_split), desc=f"epoch {epoch}/{config.num_epochs}", unit="img", leave=False, disable=None)
        for idx, feats in zip(batches, pipeline.prefetch(batches, gather)):
            state, loss = step_fn(state, feats)
            losses.append(loss)
            bar.update(len(idx))
        losses = np.asarray(jax.device_get(losses))  # one host round-trip per epoch
        seconds = time.perf_counter() - start
        bar.set_postfix(loss=f"{losses.mean():.4f}", img_s=f"{len(train_split) / seconds:.1f}")
        bar.close()
        if not np.all(np.isfinite(losses)):
            bad = int(np.flatnonzero(~np.isfinite(losses))[0])
            raise TrainingError(
                f"non-finite loss {losses[bad]} at step {(epoch - 1) * steps_per_epoch + bad + 1} (epoch {epoch}); "
                f"stopped, the last good checkpoint is kept"
            )
        _log("epoch %d: loss %.5f, %.1f img/s", epoch, losses.mean(), len(train_split) / seconds)
        train_log.append({"epoch": epoch, "step": int(state.step), "loss": float(losses.mean()),
                          "images_per_second": len(train_split) / seconds})
        if writer is not None:
            writer.add_scalar("train/loss", float(losses.mean()), int(state.step))
            writer.add_scalar("train/images_per_second", len(train_split) / seconds, int(state.step))
        last = epoch == config.num_epochs
        if epoch % config.checkpoint_every == 0 or last:
            checkpoint.save_state(manager, int(state.step), state)
            if jax.process_index() == 0:
                from rdjax.evaluate import write_json

                write_json(workdir / "train_log.json", train_log)
        if epoch % config.eval_every == 0 or last:
            result = _evaluate_and_write(
                config, workdir, model, teacher_vars, state.student_vars, test_split, epoch, int(state.step), warnings,
                put, writer, validation,
            )
    if not result:  # already trained: evaluate what is there
        result = _evaluate_and_write(
            config, workdir, model, teacher_vars, state.student_vars, test_split,
            int(state.step) // steps_per_epoch, int(state.step), warnings, put, writer, validation,
        )
    manager.close()
    if writer is not None:
        writer.close()
    return result


def evaluate_workdir(config: Any, workdir: str | Path) -> dict:
    """--mode=eval: evaluate the latest checkpoint of a workdir (trained here or ported)."""
    from rdjax import checkpoint
    from rdjax.data import pipeline
    from rdjax.data.datasets import load_dataset

    workdir = Path(workdir)
    with checkpoint.checkpoint_manager(workdir, config.keep_checkpoints) as manager:
        if manager.latest_step() is None:
            raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoint to evaluate")
        train_split, test_split = load_dataset(config)
        train_split, validation = hold_out(train_split, config)
        model, mesh, put, teacher_vars, warnings, tx, state = _setup(config, workdir)
        state = checkpoint.restore_state(manager, state)
    steps_per_epoch = len(pipeline.epoch_batches(len(train_split), config.batch_size, config.seed, 0, mesh.devices.size))
    step = int(state.step)
    return _evaluate_and_write(
        config, workdir, model, teacher_vars, state.student_vars, test_split, step // max(steps_per_epoch, 1), step, warnings,
        put, None, validation,
    )
