"""Large and non-square images: the windows cover the image, blending is exact, 'fit'
equals the squeeze on square inputs, and a small defect in a 1024x768 image is found by
tiling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import rdjax
from rdjax import train
from rdjax.data import synthetic
from rdjax.data.preprocess import Recipe
from rdjax.errors import ConfigError, DataError
from rdjax.scoring import tiling

from conftest import small_config


def test_window_starts_cover_the_length():
    assert tiling.starts(64, 64, 48) == [0]
    assert tiling.starts(100, 64, 48) == [0, 36]
    assert tiling.starts(200, 64, 64) == [0, 64, 128, 136]
    for length, size, stride in ((1536, 64, 48), (2048, 64, 64), (77, 32, 20)):
        s = tiling.starts(length, size, stride)
        covered = np.zeros(length, bool)
        for a in s:
            covered[a : a + size] = True
        assert covered.all() and s[-1] + size == length and np.all(np.diff(s) <= stride)


def test_blending_reproduces_a_map_that_windows_agree_on():
    """Windows whose maps are crops of one underlying map blend back to that map: the
    weights are normalized wherever windows overlap (float32 rounding only)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 230, 3), dtype=np.uint8)
    truth = image[..., 0].astype(np.float32) / 255
    crops = lambda windows: windows[..., 0].astype(np.float32) / 255  # noqa: E731  (a 'model' that is a crop)
    for overlap in (0, 7, 20):
        out = tiling.tiled_maps(
            [image, image[:100]], Recipe(size=64), [1.0, 1.0], overlap, crops
        )  # two images, one batch
        np.testing.assert_allclose(out[0], truth, rtol=1e-6)
        np.testing.assert_allclose(out[1], truth[:100], rtol=1e-6)
    w = tiling.ramp(16, 4)
    assert w.min() > 0 and w[8, 8] == 1 and w[0, 8] == pytest.approx(0.2)


@pytest.mark.parametrize("filter_", ["pil_bilinear", "cv2_bilinear"])
def test_windows_are_cut_from_a_copy_scaled_by_the_recipe(filter_):
    """Tiling scales by the model's own filter (RD++: OpenCV's, float inputs): a crop
    'model' blends back to the scaled copy that filter makes, in the recipe's dtype."""
    image = np.random.default_rng(1).integers(0, 256, (150, 230, 3), dtype=np.uint8)
    recipe = Recipe(filter_, size=32)
    scaled = recipe.scale(image, 115, 75)
    assert scaled.dtype == recipe.dtype
    unit = lambda windows: windows[..., 0].astype(np.float32) / (255 if windows.dtype == np.uint8 else 1)  # noqa: E731
    (out,) = tiling.tiled_maps([image], recipe, [0.5], 5, unit)
    np.testing.assert_allclose(out, unit(scaled), rtol=1e-6)


def test_modes_reject_what_they_cannot_do():
    assert tiling.scale_for("fit", (480, 640), 256, None) == pytest.approx(256 / 480)
    assert tiling.scale_for("tile", (2048, 2048), 256, 512) == 0.5
    with pytest.raises(DataError, match="smaller than one tile"):
        tiling.scale_for("tile", (100, 300), 256, None)
    with pytest.raises(ConfigError, match="resize='crop' is not supported"):
        tiling.scale_for("crop", (100, 300), 256, None)
    with pytest.raises(ConfigError, match="resize='squeeze' has no windows"):
        tiling.scale_for("squeeze", (100, 300), 256, None)


def test_fit_on_a_square_input_is_the_squeeze(trained):
    config, work, _ = trained
    model = rdjax.load(work)
    file = sorted((Path(config.dataset.root) / "disk" / "test" / "hole").glob("*.png"))[0]
    squeezed, fitted = model.predict(str(file)), model.predict(str(file), resize="fit")
    np.testing.assert_array_equal(fitted.maps[0], squeezed.maps[0])
    assert fitted.scores[0] == squeezed.scores[0]


@pytest.mark.slow
def test_a_small_defect_in_a_large_image_is_found_by_tiling(synthetic_data, tmp_path):
    """A model trained on 64 px weave images (the texture's period is 8 px at any size)
    looks at a 1024x768 weave with a dark hole of radius 4 px. Tiled at the native
    resolution, the blended map peaks on the hole away from the image's outer border,
    and there it is higher than anywhere on the same image without the hole. The outer
    border is left out: this briefly trained model's maps are high along every image
    border, in both images alike (docs/usage.md, "Large and non-square images"). Squeezed
    to 64 px the hole is a quarter of a pixel wide (the comparison is in the docs)."""
    root = synthetic_data(categories=("weave",))
    train.train_and_evaluate(small_config(root, category="weave", num_epochs=3, eval_every=3), tmp_path / "w")
    model = rdjax.load(tmp_path / "w")
    rng = np.random.default_rng(7)
    clean = synthetic._weave(rng, 1024)[:768]
    yy, xx = np.mgrid[:768, :1024]
    hole = (yy - 450) ** 2 + (xx - 650) ** 2 <= 16
    broken = synthetic._apply_defect(rng, clean, hole, "hole")
    images = [synthetic._to_uint8(clean), synthetic._to_uint8(broken)]
    tiled = model.predict(images, resize="tile", overlap=16)
    inner = (slice(32, -32), slice(32, -32))  # half a window in from the image's outer border
    peak = np.unravel_index(int(np.argmax(tiled.maps[1][inner])), hole[inner].shape)
    assert abs(peak[0] + 32 - 450) <= 8 and abs(peak[1] + 32 - 650) <= 8, peak
    assert tiled.maps[1][inner].max() > tiled.maps[0][inner].max()
    squeezed = model.predict(images)
    print(
        f"tile: inner max {[float(m[inner].max()) for m in tiled.maps]}, whole max {tiled.scores}; "
        f"squeeze: inner max {[float(m[inner].max()) for m in squeezed.maps]}, whole max {squeezed.scores}, "
        f"inner peak {np.unravel_index(int(np.argmax(squeezed.maps[1][inner])), hole[inner].shape)}"
    )


def _evaluate_on(config, workdir: Path, root: Path, **resize) -> dict[str, float]:
    """Evaluate ``workdir`` on the generated ``root`` with config.resize set: its scores.csv."""
    import csv

    config = config.copy_and_resolve_references()
    config.dataset.root, config.dataset.data_dir = str(root), str(root / "_tfds")
    for key, value in resize.items():
        config.resize[key] = value
    result = train.evaluate(config, workdir)
    table = workdir / "eval" / f"epoch_{result['epoch']:04d}" / "scores.csv"
    return {row["file"]: float(row["score"]) for row in csv.DictReader(table.open())}


@pytest.mark.slow  # three evaluations and predictions over a second dataset
def test_evaluation_tiles_as_predict_does(trained, synthetic_data, tmp_path):
    """The trained 64 px model evaluated on 128 px images. (1) One 128 px tile per image
    is the squeeze: PIL resizes the same file to 64 px on both paths, so the scores agree
    up to the order of float32 sums (windows and images batch differently): 1e-5 of the
    score, far below any score gap, plus 1e-6 for scores.csv's six decimals. (2) 64 px
    tiles with overlap: the evaluation pass
    (this process's device, rdjax.scoring.tiling.evaluation_maps) scores every image as
    Predictor.predict does by default afterwards, since calibration.json records the setting."""
    import json
    import shutil

    config, work, _ = trained
    root = synthetic_data(size=128)
    workdir = tmp_path / "w"
    shutil.copytree(work, workdir)
    squeezed = _evaluate_on(config, workdir, root)
    one_tile = _evaluate_on(config, workdir, root, mode="tile", tile_size=128)
    assert squeezed.keys() == one_tile.keys() and len(squeezed) == 13
    np.testing.assert_allclose([one_tile[k] for k in squeezed], list(squeezed.values()), rtol=1e-5, atol=1e-6)

    tiled = _evaluate_on(config, workdir, root, mode="tile", tile_size=64, overlap=8)
    assert json.loads((workdir / "calibration.json").read_text())["resize"] == {
        "mode": "tile",
        "tile_size": 64,
        "overlap": 8,
    }
    files = {f"{p.parent.name}/{p.name}": p for p in (root / "disk" / "test").rglob("*.png")}
    model = rdjax.load(workdir)
    pred = model.predict([str(files[k]) for k in tiled])
    np.testing.assert_allclose(pred.scores, list(tiled.values()), rtol=1e-5, atol=1e-6)
    assert max(abs(a - b) for a, b in zip(tiled.values(), squeezed.values())) > 1e-3  # the tiles saw other pixels
    np.testing.assert_array_equal(pred.decisions, np.array(list(tiled.values())) >= model.image_threshold)


@pytest.mark.parametrize("max_ratio", [0.0, 0.05])
def test_blended_maps_of_several_sizes_are_each_scored_by_the_rule(max_ratio):
    """Maps of mixed sizes, scored a size at a time, keep their order, and each score is
    the rule on that map alone: the max (exactly), or the mean of its int(H * W * r)
    highest pixels (np.sort in float64 here). The float32 mean of k <= 30 positive values
    errs by at most (k - 1) roundings of the running sum and one of the division, each
    2^-24 relative: below 30 * 2^-24 = 1.8e-6 on any CPU, so rtol 2e-6."""
    rng = np.random.default_rng(0)
    blended = [rng.random(shape).astype(np.float32) for shape in ((20, 30), (16, 16), (20, 30), (9, 40))]
    scores = tiling.blended_scores(blended, max_ratio)
    for amap, score in zip(blended, scores):
        k = max(1, int(amap.size * max_ratio))
        if max_ratio:
            np.testing.assert_allclose(score, np.sort(amap.ravel().astype(np.float64))[::-1][:k].mean(), rtol=2e-6)
        else:
            assert score == amap.max()
