"""Where training gets the teacher's features (config.feature_cache): the three modes train
the same weights, the disk store round-trips exactly, and 'auto' chooses by the figures."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import restore_state, small_config
from rdjax import features, train
from rdjax.data import pipeline
from rdjax.errors import ConfigError


@pytest.fixture(scope="module")
def trained_modes(synthetic_data, tmp_path_factory):
    """The same tiny run (16 images, batch 8, 2 epochs: 4 steps) in each mode."""
    root = synthetic_data()
    base = tmp_path_factory.mktemp("modes")
    out = {}
    for mode in ("memory", "disk", "off"):
        before = pipeline.decoded["train"]
        result = train.train_and_evaluate(small_config(root, num_epochs=2, eval_every=2, feature_cache=mode),
                                          base / mode)
        out[mode] = (base / mode, result, pipeline.decoded["train"] - before)
    return out


def test_memory_and_disk_train_bit_identical_weights(trained_modes):
    """Same features (the disk store returns the bytes it was given), same program: equal."""
    a, b = restore_state(trained_modes["memory"][0])[0], restore_state(trained_modes["disk"][0])[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.opt_state, b.opt_state)


def test_off_trains_the_same_weights_to_float32_tolerance(trained_modes):
    """'off' computes the teacher inside the step, where the compiler may fuse and order
    float32 sums differently from the caching pass: features then differ by float32
    rounding (~1e-7 relative). At a random init those gradients are ill-conditioned, but
    Adam bounds every update by about the learning rate, so after 4 steps no parameter
    can move more than 4 * 2 * lr apart; in practice they agree far closer, so the test
    asserts a tenth of a single update, and equal per-epoch losses to 1e-4."""
    a, b = restore_state(trained_modes["memory"][0])[0], restore_state(trained_modes["off"][0])[0]
    lr = 0.005
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=0.1 * lr, rtol=0)
    ra, rb = trained_modes["memory"][1], trained_modes["off"][1]
    assert rb["image_auroc"] == pytest.approx(ra["image_auroc"], abs=0.1)


def test_each_mode_decodes_what_it_needs(trained_modes):
    """memory and disk decode each of the 16 training images once (to fill the cache);
    off decodes the 16 used in each of the 2 epochs; the disk cache is gone at the end."""
    assert trained_modes["memory"][2] == 16 and trained_modes["disk"][2] == 16
    assert trained_modes["off"][2] == 2 * 16
    assert not (trained_modes["disk"][0] / "feature_cache").exists()
    assert [e["feature_cache"] for e in _log(trained_modes["off"][0])] == ["off", "off"]


def _log(workdir):
    import json

    return json.loads((workdir / "train_log.json").read_text())


def test_disk_store_round_trips_and_is_reused_only_when_complete(tmp_path):
    shapes = [jax.ShapeDtypeStruct((2, 3, 4), np.float32), jax.ShapeDtypeStruct((5,), jax.numpy.bfloat16)]
    rng = np.random.default_rng(0)
    data = [rng.normal(size=(7, 2, 3, 4)).astype(np.float32), rng.normal(size=(7, 5)).astype(jax.numpy.bfloat16)]
    store = features.DiskStore(tmp_path / "c", shapes, 7, {"run": 1})
    assert not store.complete
    store.write(0, [d[:4] for d in data])
    store.write(4, [d[4:] for d in data])
    rows = np.array([6, 0, 3, 3])
    for got, want in zip(store.read(rows), data):
        np.testing.assert_array_equal(got, want[rows])
    store.close(delete=False)
    assert not features.DiskStore(tmp_path / "c", shapes, 7, {"run": 1}).complete  # never finished: refilled
    store = features.DiskStore(tmp_path / "c", shapes, 7, {"run": 1})
    store.write(0, data)
    store.finish()
    store.close(delete=False)
    again = features.DiskStore(tmp_path / "c", shapes, 7, {"run": 1})
    assert again.complete
    np.testing.assert_array_equal(again.read(np.arange(7))[0], data[0])
    np.testing.assert_array_equal(np.load(tmp_path / "c" / "scale0.npy"), data[0])  # a valid .npy, rows in order
    again.close(delete=False)
    assert not features.DiskStore(tmp_path / "c", shapes, 7, {"run": 2}).complete  # another run's cache


def test_auto_chooses_by_the_figures(monkeypatch, tmp_path):
    gib = 2**30
    monkeypatch.setattr(features, "available_memory", lambda: 8 * gib)
    monkeypatch.setattr(features, "_free_disk", lambda d: 100 * gib)
    assert features.choose_mode("auto", 3 * gib, tmp_path)[0] == "memory"  # at most half the memory
    assert features.choose_mode("auto", 5 * gib, tmp_path)[0] == "disk"
    assert features.choose_mode("auto", 90 * gib, tmp_path)[0] == "off"
    assert "features 5.00 GiB, available memory 8.0 GiB" in features.choose_mode("auto", 5 * gib, tmp_path)[1]
    with pytest.raises(ConfigError, match=r"feature_cache='memory' does not fit .* use 'disk', 'off' or 'auto'"):
        features.choose_mode("memory", 9 * gib, tmp_path)
    with pytest.raises(ConfigError, match=r"feature_cache='disk' does not fit .* set config.feature_cache_dir"):
        features.choose_mode("disk", 101 * gib, tmp_path)


def test_feature_size_estimate_matches_the_teacher():
    """eval_shape's estimate equals the bytes of real features (resnet18, 64 px)."""
    from rdjax.models import RD4AD

    model = RD4AD("resnet18")
    teacher_vars, _ = model.init(jax.random.key(0), 64)
    real = features.teacher_fn(model, True)(teacher_vars, np.zeros((1, 64, 64, 3), np.uint8))
    shapes = features.feature_shapes(model, 64)
    assert [s.shape for s in shapes] == [f.shape[1:] for f in real]
    assert features.bytes_per_image(shapes) == sum(f.nbytes for f in real)
