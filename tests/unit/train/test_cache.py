"""Where training gets the teacher's features (config.feature_cache): 'off' computes the
same function as the cache, the disk store round-trips exactly, and 'auto' chooses by
the figures. (Kill and resume in each mode: test_interrupt.py.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rdjax import config as config_lib
from rdjax.errors import ConfigError
from rdjax.runtime import state as state_lib
from rdjax.train import cache

from conftest import random_variables


@pytest.mark.slow  # a second whole training run in this process
def test_off_trains_end_to_end(trained, trained_off):
    """The 'off' run (teacher in every step) trains and evaluates like the cached one.
    That it computes the same function is shown in float64 below; in float32 its
    weights drift from the cached run's by rounding, as between device counts
    (docs/scaling.md). That 'disk' equals 'memory' bit for bit is shown in the slow tier
    (test_interrupt.py: a killed and resumed 'disk' run equals the in-process 'memory' run)."""
    (_, memory, ra), (_, off, rb) = trained, trained_off
    assert rb["step"] == ra["step"] == 9 and rb["num_images"] == ra["num_images"]
    log_a, log_b = _log(memory), _log(off)
    assert [e["feature_cache"] for e in log_a] == ["memory"] * 3 and [e["feature_cache"] for e in log_b] == ["off"] * 3
    # The first epoch starts from the same state on the same batches: its mean loss agrees
    # to float32 rounding of the features (~1e-7) amplified by at most one Adam step.
    assert log_b[0]["loss"] == pytest.approx(log_a[0]["loss"], rel=1e-2)
    assert not (memory / "feature_cache").exists() and not (off / "feature_cache").exists()


def _log(workdir):
    import json

    return json.loads((workdir / "train_log.json").read_text())


def test_disk_store_round_trips_and_is_reused_only_when_complete(tmp_path):
    shapes = [jax.ShapeDtypeStruct((2, 3, 4), np.float32), jax.ShapeDtypeStruct((5,), jax.numpy.bfloat16)]
    rng = np.random.default_rng(0)
    data = [rng.normal(size=(7, 2, 3, 4)).astype(np.float32), rng.normal(size=(7, 5)).astype(jax.numpy.bfloat16)]
    store = cache.DiskStore(tmp_path / "c", shapes, 7, {"run": 1})
    assert not store.complete
    store.write(0, [d[:4] for d in data])
    store.write(4, [d[4:] for d in data])
    rows = np.array([6, 0, 3, 3])
    for got, want in zip(store.read(rows), data):
        np.testing.assert_array_equal(got, want[rows])
    store.close(delete=False)
    assert not cache.DiskStore(tmp_path / "c", shapes, 7, {"run": 1}).complete  # never finished: refilled
    store = cache.DiskStore(tmp_path / "c", shapes, 7, {"run": 1})
    store.write(0, data)
    store.finish()
    store.close(delete=False)
    again = cache.DiskStore(tmp_path / "c", shapes, 7, {"run": 1})
    assert again.complete
    np.testing.assert_array_equal(again.read(np.arange(7))[0], data[0])
    np.testing.assert_array_equal(np.load(tmp_path / "c" / "scale0.npy"), data[0])  # a valid .npy, rows in order
    again.close(delete=False)
    assert not cache.DiskStore(tmp_path / "c", shapes, 7, {"run": 2}).complete  # another run's cache


def test_auto_chooses_by_the_figures(monkeypatch, tmp_path):
    gib = 2**30
    monkeypatch.setattr(cache, "available_memory", lambda: 8 * gib)
    monkeypatch.setattr(cache, "_free_disk", lambda d: 100 * gib)
    assert cache.choose_mode("auto", gib // 2, tmp_path)[0] == "memory"  # small: kept in the process
    assert cache.choose_mode("auto", 3 * gib, tmp_path)[0] == "disk"  # larger: through the page cache
    assert cache.choose_mode("auto", 90 * gib, tmp_path)[0] == "off"  # fits nowhere
    monkeypatch.setattr(cache, "_free_disk", lambda d: 1 * gib)
    assert cache.choose_mode("auto", 3 * gib, tmp_path)[0] == "memory"  # no disk room, memory has
    assert cache.choose_mode("auto", 5 * gib, tmp_path)[0] == "off"  # more than half the memory
    monkeypatch.setattr(cache, "_free_disk", lambda d: 100 * gib)
    assert "features 5.00 GiB, available memory 8.0 GiB" in cache.choose_mode("auto", 5 * gib, tmp_path)[1]
    with pytest.raises(ConfigError, match=r"feature_cache='memory' does not fit .* use 'disk', 'off' or 'auto'"):
        cache.choose_mode("memory", 9 * gib, tmp_path)
    with pytest.raises(ConfigError, match=r"feature_cache='disk' does not fit .* set config.feature_cache_dir"):
        cache.choose_mode("disk", 101 * gib, tmp_path)


def test_feature_size_estimate_matches_the_teacher():
    """eval_shape's estimate equals the bytes of real features (resnet18, 64 px)."""
    from rdjax.models.rd4ad import RD4AD

    model = RD4AD("resnet18")
    teacher_vars, _ = random_variables(model, 64, seed=0, dtype=np.float32)
    real = cache.teacher_fn(model, True)(teacher_vars, np.zeros((1, 64, 64, 3), np.uint8))
    shapes = cache.feature_shapes(model, 64)
    assert [s.shape for s in shapes] == [f.shape[1:] for f in real]
    assert cache.bytes_per_image(shapes) == sum(f.nbytes for f in real)


@pytest.mark.slow  # three float64 programs to compile
def test_off_step_equals_the_cached_step_in_float64():
    """The 'off' step (teacher inside the jitted step) against the cached path (the
    caching pass's teacher function, then the step on its features): three Adam steps
    from the same state on the same images, in float64, where the ill-conditioning of
    these gradients at a random init (percent-level in float32, see test_invariance.py)
    stays ~1e-9: parameters agree to rtol 1e-6, atol 1e-7."""
    from rdjax.models.rd4ad import RD4AD
    from rdjax.runtime import sharding
    from rdjax.train import steps

    with jax.enable_x64(True):
        model = RD4AD("resnet18", "float64")
        teacher_vars, student_vars = random_variables(RD4AD("resnet18"), 32, seed=0)
        tx = model.optimizer(config_lib.defaults())
        mesh = sharding.make_mesh()
        images = [np.random.default_rng(i).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for i in range(3)]
        off = steps.make_image_train_step(model, tx, mesh)
        cached = steps.make_train_step(model, tx, mesh)
        teacher = jax.jit(cache.teacher_fn(model, True))
        # Committed, replicated states (as rdjax.train.loop makes them): an uncommitted first
        # argument would compile each step twice.
        a, b = (
            jax.device_put(state_lib.create_train_state(student_vars, tx), sharding.replicated(mesh)) for _ in range(2)
        )  # each step donates its own
        for x in images:
            valid = np.ones(len(x), np.float32)
            a, loss_a = off(a, teacher_vars, x, valid)
            b, loss_b = cached(b, teacher(teacher_vars, x), valid)
            assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-12)
        assert jax.tree_util.tree_leaves(a.params)[0].dtype == np.float64
        for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
