"""The unified setting: one model over every category (config.setting='unified')."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import metrics as skm

from rdjax import config as config_lib
from rdjax import evaluation, maps, metrics, train
from rdjax.data.preprocess import Split


def _split(seed: int, n: int, size: int = 8, records: np.ndarray | None = None) -> Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    masks = rng.random((n, size, size)) > 0.7
    labels = rng.integers(0, 2, n)
    split = Split.from_arrays(images, masks, labels, ["good" if x == 0 else "cut" for x in labels],
                              [f"{i:03d}.png" for i in range(n)])  # fmt: skip
    split = dataclasses.replace(split, read_native=lambda r: images[r][::2])
    return split if records is None else split.subset(records)


def test_concat_reads_every_row_from_its_own_split():
    """Rows of the joined split decode as the same rows of their parts, even where a
    part's records are sparse (after the hold-out took some out)."""
    a, b = _split(0, 7, records=np.array([0, 2, 5, 6])), _split(1, 5)
    joined = Split.concat({"a": a, "b": b})
    assert len(joined) == 9 and len(set(joined.records.tolist())) == 9
    for row in range(9):
        part, own = (a, row) if row < 4 else (b, row - 4)
        np.testing.assert_array_equal(joined.example(row)[0], part.example(own)[0])
        np.testing.assert_array_equal(joined.example(row)[1], part.example(own)[1])
        np.testing.assert_array_equal(joined.native_image(row), part.native_image(own))
    assert joined.filenames[0] == "a/000.png" and joined.filenames[4] == "b/000.png"
    np.testing.assert_array_equal(joined.labels, np.concatenate([a.labels, b.labels]))


def _pass(rng: np.random.Generator, n: int, exact: bool) -> evaluation.PassResult:
    """A pass over n random 16x16 maps, its statistics accumulated as the jitted step does."""
    amaps = rng.random((n, 16, 16)).astype(np.float32)
    masks = rng.random((n, 16, 16)) > 0.8
    weights, regions = zip(*(metrics.region_weights(m) for m in masks))
    stats = maps.stats_step(jnp.asarray(amaps), jnp.asarray(amaps.max((1, 2))), jnp.asarray(masks),
                            jnp.asarray(np.stack(weights), jnp.float32), jnp.asarray(regions, jnp.int32),
                            jnp.ones(n, bool))[3]  # fmt: skip
    acc = evaluation._Accumulator()
    acc.add_stats(jax.device_get(stats))
    acc.scores, acc.sums, acc.pro_images = [amaps.max((1, 2))], [amaps.sum((1, 2))], [np.zeros(n)]
    acc.maps, acc.masks = [amaps], [masks]
    return acc.result(exact)


@pytest.mark.parametrize("exact", [True, False])
def test_merged_passes_equal_one_pass_over_both(exact):
    """The global calibration's statistics, merged category by category, are those of
    one pass over the union: per-image numbers concatenated, histograms summed (integer
    counts: exact), the exact maps kept only while within the pixel limit."""
    rng = np.random.default_rng(0)
    a, b = _pass(rng, 5, exact), _pass(rng, 3, exact)
    merged = evaluation.merge(evaluation.merge(None, a, 10**6), b, 10**6)
    np.testing.assert_array_equal(merged.scores, np.concatenate([a.scores, b.scores]))
    np.testing.assert_array_equal(merged.pixels.neg, a.pixels.neg + b.pixels.neg)
    assert merged.pixels.num_regions == a.pixels.num_regions + b.pixels.num_regions
    assert merged.pixels.exact is exact
    if exact:  # and then its AUROC is that of every pixel of both, as sklearn computes it
        labels = np.concatenate([a.pixels.masks, b.pixels.masks]).ravel()
        values = np.concatenate([a.pixels.maps, b.pixels.maps]).ravel()
        assert merged.pixels.auroc() == pytest.approx(skm.roc_auc_score(labels, values), abs=1e-12)
        assert not evaluation.merge(a, b, a.pixels.maps.size).pixels.exact  # beyond the limit: binned


def test_step_schedule_scales_every_rate_from_its_boundary():
    """config.lr_decay_at wraps the model's optimizer; its updates equal those of optax's
    own Adam on a piecewise-constant rate (independent: the rate inside Adam), to float32
    rounding (a handful of ulps on values of order lr)."""
    config = config_lib.defaults()
    config.num_epochs, config.lr_decay_at, config.lr_decay_factor = 10, 0.5, 0.1

    class _Model:
        def optimizer(self, config):
            return optax.adam(config.learning_rate, b1=config.adam_b1, b2=config.adam_b2)

    run = train.Run.__new__(train.Run)
    run.config, run.model = config, _Model()
    run.train = _split(0, 4)
    config.batch_size = 2  # 2 steps per epoch: the boundary is step 10
    tx = train.optimizer(run)
    reference = optax.adam(optax.piecewise_constant_schedule(config.learning_rate, {10: 0.1}), b1=0.5, b2=0.999)
    params = {"w": jnp.ones(3)}
    state, ref_state = tx.init(params), reference.init(params)
    for i in range(14):
        g = {"w": jnp.asarray(np.random.default_rng(i).normal(size=3), jnp.float32)}
        u, state = tx.update(g, state)
        r, ref_state = reference.update(g, ref_state)
        np.testing.assert_allclose(u["w"], r["w"], rtol=1e-6, atol=0)
