"""MVTec AD 2: its published folders load (non-square images, masks under
test_public/ground_truth), resize.mode='fit' windows them without distortion, and
`rdjax predict --format=mvtec_ad_2` writes the tree MVTec's evaluation server takes,
checked against the rules of MVTec's own checker (check_and_prepare_data_for_upload.py)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tifffile
from PIL import Image

import rdjax
from rdjax import registry, train
from rdjax.data import mvtec_ad2
from rdjax.data.preprocess import Recipe
from rdjax.errors import DataError
from rdjax.scoring import tiling

from conftest import rdjax_cli, small_config

PRIVATE = {"test_private": "regular", "test_private_mixed": "mixed"}


def widen(path: Path) -> np.ndarray:
    """A 64x64 synthetic image as 96 wide by 64 high: its first 32 columns repeated on the
    right, so the copy is as normal (or as defective) as the original."""
    a = np.asarray(Image.open(path))
    return np.concatenate([a, a[:, :32]], axis=1)


@pytest.fixture(scope="module")
def source(synthetic_data):
    return synthetic_data(num_train=8, num_test_good=3, num_per_defect=2)


@pytest.fixture(scope="module")
def ad2_root(source, tmp_path_factory):
    """Category 'can' in MVTec AD 2's layout, every image 96x64."""
    root = tmp_path_factory.mktemp("mvtec_ad_2")
    disk, can = source / "disk", root / "can"
    for sub in ("train/good", "validation/good", "test_public/good", "test_public/bad", "test_public/ground_truth/bad"):
        (can / sub).mkdir(parents=True)
    (can / "test_private").mkdir()
    (can / "test_private_mixed").mkdir()
    good = sorted((disk / "train/good").glob("*.png"))
    for i, p in enumerate(good[:6]):
        Image.fromarray(widen(p)).save(can / "train/good" / f"{i:03d}_regular.png")
    for i, p in enumerate(good[6:]):
        Image.fromarray(widen(p)).save(can / "validation/good" / f"{i:03d}_regular.png")
    for i, p in enumerate(sorted((disk / "test/good").glob("*.png"))):
        Image.fromarray(widen(p)).save(can / "test_public/good" / f"{i:03d}_regular.png")
    bad = sorted((disk / "test").glob("[!g]*/*.png"))
    for i, p in enumerate(bad):
        Image.fromarray(widen(p)).save(can / "test_public/bad" / f"{i:03d}_regular.png")
        gt = disk / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"
        Image.fromarray(widen(gt)).save(can / "test_public/ground_truth/bad" / f"{i:03d}_regular_mask.png")
    for split, kind in PRIVATE.items():
        for i, p in enumerate(bad[:2] + good[:1]):
            Image.fromarray(widen(p)).save(can / split / f"{i:03d}_{kind}.png")
    return root


def ad2_config(root: Path, tmp_path: Path, **resize) -> ml_collections.ConfigDict:
    config = small_config(root, category="can")
    config.dataset.name = "mvtec_ad2"
    config.dataset.data_dir = str(tmp_path / "tfds")
    for key, value in resize.items():
        config.resize[key] = value
    return config


def test_the_published_layout_loads_at_its_own_resolution(ad2_root, source, tmp_path):
    config = ad2_config(ad2_root, tmp_path)
    config.dataset.category = "all"
    dataset = registry.build_dataset(config.dataset)
    assert dataset.categories() == ["can"]
    train_split, test = dataset.load("can", Recipe(size=64))
    bad = sorted((source / "disk/test").glob("[!g]*/*.png"))
    assert len(train_split) == 6 and not train_split.labels.any()  # train/good only: validation/ is not read
    assert len(test) == 3 + len(bad) and int(test.labels.sum()) == len(bad)
    assert set(test.defect_types) == {"good", "bad"} and test.has_masks
    row = test.filenames.index("bad/001_regular.png")
    gt = Image.open(ad2_root / "can/test_public/ground_truth/bad/001_regular_mask.png")
    np.testing.assert_array_equal(test.masks([row])[0], np.asarray(gt.resize((64, 64), Image.BILINEAR)) > 127)
    assert test.native_image(row).shape == (64, 96, 3) and test.images([row]).shape == (1, 64, 64, 3)


def test_a_missing_mask_names_the_ground_truth_folder(ad2_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(ad2_root, root)
    (root / "can/test_public/ground_truth/bad/001_regular_mask.png").unlink()
    with pytest.raises(DataError, match=r"test_public/ground_truth/bad: no mask for 1 of 6 'bad' images"):
        registry.build_dataset(ad2_config(root, tmp_path).dataset).load("can", Recipe(size=64))


def test_fit_windows_the_long_side_at_the_short_sides_scale(ad2_root, tmp_path):
    """resize.mode='fit' on the 96x64 images and image_size 32: the short side is scaled
    to 32, so the copy is 48x32, undistorted; two 32x32 windows cover it, and a 'model'
    whose map is its window's first channel blends back to that copy's first channel."""
    _, test = registry.build_dataset(ad2_config(ad2_root, tmp_path).dataset).load("can", Recipe(size=32))
    native = [test.native_image(r) for r in range(2)]
    scales = [tiling.scale_for("fit", image.shape[:2], 32, None) for image in native]
    assert scales == [0.5, 0.5]
    seen = []

    def run(windows: np.ndarray) -> np.ndarray:
        seen.append(windows.shape)
        return windows[..., 0].astype(np.float32) / 255

    blended = tiling.tiled_maps(native, Recipe(size=32), scales, 8, run)
    assert seen == [(4, 32, 32, 3)]
    for image, amap in zip(native, blended):
        scaled = np.asarray(Image.fromarray(image).resize((48, 32), Image.BILINEAR))[..., 0] / 255
        np.testing.assert_allclose(amap, scaled, rtol=1e-6)


def check_submission(out: Path, category_dir: Path, thresholded: bool) -> int:
    """The layout, names and files of MVTec AD 2's upload format for one category, as
    MVTec's checker (check_and_prepare_data_for_upload.py and its utils) states them:
    anomaly_images/<category>/{test_private,test_private_mixed}/NNN_{regular,mixed}.tiff,
    single-channel float16; anomaly_images_thresholded/... the same names as .png,
    single-channel with values in {0, 255}. Here also: one output per input image, named
    as the input, as large as the input. Returns the number of maps checked."""
    folders = {"anomaly_images": ".tiff"} | ({"anomaly_images_thresholded": ".png"} if thresholded else {})
    assert sorted(p.name for p in out.iterdir()) == sorted(folders)
    checked = 0
    for folder, ext in folders.items():
        assert category_dir.name in [p.name for p in (out / folder).iterdir()]  # beside the other categories
        assert sorted(p.name for p in (out / folder / category_dir.name).iterdir()) == sorted(PRIVATE)
        for split, kind in PRIVATE.items():
            inputs = sorted((category_dir / split).iterdir())
            written = sorted((out / folder / category_dir.name / split).iterdir())
            assert [p.name for p in written] == [f"{i:03d}_{kind}{ext}" for i in range(len(inputs))]
            assert [p.stem for p in written] == [p.stem for p in inputs]
            for image, result in zip(inputs, written):
                shape = Image.open(image).size[::-1]
                if ext == ".tiff":
                    amap = tifffile.imread(result)
                    assert amap.dtype == np.float16 and amap.shape == shape and np.isfinite(amap).all()
                else:
                    png = Image.open(result)
                    assert png.mode == "L" and png.size[::-1] == shape
                    assert set(np.unique(np.asarray(png))) <= {0, 255}
                checked += 1
    return checked


def test_the_writer_makes_what_the_checker_takes(ad2_root, tmp_path):
    can = ad2_root / "can"
    rng = np.random.default_rng(0)
    for split, f in mvtec_ad2.private_images(can):
        amap = rng.random((64, 96), np.float32) * 3
        mvtec_ad2.write_submission(tmp_path / "sub", "can", split, f, amap, amap > 2)
        written = tifffile.imread(tmp_path / "sub" / mvtec_ad2.submission_name("can", split, f, thresholded=False))
        np.testing.assert_array_equal(written, amap.astype(np.float16))
        png = np.asarray(Image.open(tmp_path / "sub" / mvtec_ad2.submission_name("can", split, f, thresholded=True)))
        np.testing.assert_array_equal(png == 255, amap > 2)
    assert check_submission(tmp_path / "sub", can, thresholded=True) == 12


def test_the_checker_refuses_what_the_server_would(ad2_root, tmp_path):
    """The check itself: a float32 map, a missing map and a grey thresholded pixel fail it."""
    can = ad2_root / "can"
    inputs = mvtec_ad2.private_images(can)

    def write(out: Path) -> None:
        for split, f in inputs:
            mvtec_ad2.write_submission(out, "can", split, f, np.zeros((64, 96), np.float32), np.zeros((64, 96), bool))

    for n, damage in enumerate(
        [
            lambda out, f: tifffile.imwrite(f, np.zeros((64, 96), np.float32)),
            lambda out, f: f.unlink(),
            lambda out, f: Image.fromarray(np.full((64, 96), 128, np.uint8)).save(f.with_suffix(".png").as_posix()),
        ]
    ):
        out = tmp_path / f"sub{n}"
        write(out)
        split, image = inputs[0]
        target = out / mvtec_ad2.submission_name("can", split, image, thresholded=n == 2)
        damage(out, target)
        with pytest.raises(AssertionError):
            check_submission(out, can, thresholded=True)


def test_predict_refuses_a_folder_without_the_private_sets(ad2_root, tmp_path):
    """The dataset's root instead of a category folder: one line, before any model is loaded."""
    result = rdjax_cli(
        "predict", "--format=mvtec_ad_2", f"--workdir={tmp_path}", f"--input={ad2_root}", f"--output={tmp_path / 'sub'}"
    )
    assert "test_private: no images" in result.error_line() and "category folder of MVTec AD 2" in result.error_line()
    assert not (tmp_path / "sub").exists()


@pytest.mark.slow  # a model restored and run on every private image
def test_predict_writes_the_submission_of_a_category(ad2_root, trained, tmp_path, monkeypatch):
    """The shared 64 px model on 96x64 private images with resize 'fit': every map at the
    input's resolution as float16, its thresholded PNG the model's own mask."""
    _, work, _ = trained
    out = tmp_path / "submission"
    result = rdjax_cli(
        "predict",
        "--format=mvtec_ad_2",
        f"--workdir={work}",
        f"--input={ad2_root / 'can'}",
        f"--output={out}",
        "--resize=fit",
    )
    assert result.code == 0, result.stderr[-3000:]
    assert check_submission(out, ad2_root / "can", thresholded=True) == 12
    image = ad2_root / "can/test_private_mixed/001_mixed.png"
    pred = rdjax.load(work).predict(str(image), resize="fit")
    amap = tifffile.imread(out / "anomaly_images/can/test_private_mixed/001_mixed.tiff")
    np.testing.assert_allclose(amap, pred.maps[0].astype(np.float16), rtol=1e-3)
    png = np.asarray(Image.open(out / "anomaly_images_thresholded/can/test_private_mixed/001_mixed.png"))
    assert pred.masks is not None
    np.testing.assert_array_equal(png == 255, pred.masks[0])
    # The submission gathers every category in one --output (docs/datasets.md's loop): a second
    # category joins it; the same category again is refused unless --overwrite.
    shutil.copytree(ad2_root / "can", tmp_path / "jar")
    flags = ["predict", "--format=mvtec_ad_2", f"--workdir={work}", f"--output={out}", "--resize=fit"]
    assert rdjax_cli(*flags, f"--input={tmp_path / 'jar'}").code == 0
    assert check_submission(out, tmp_path / "jar", thresholded=True) == 12
    assert "--overwrite" in rdjax_cli(*flags, f"--input={ad2_root / 'can'}").error_line()
    assert rdjax_cli(*flags, f"--input={ad2_root / 'can'}", "--overwrite").code == 0
    assert check_submission(out, ad2_root / "can", thresholded=True) == 12
    # A full disk while writing a third category: one line, its partial maps gone, the others kept.
    shutil.copytree(ad2_root / "can", tmp_path / "box")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    written = []

    def fill_disk(path, *args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        return real_imwrite(path, *args, **kwargs)

    real_imwrite = tifffile.imwrite
    monkeypatch.setattr(tifffile, "imwrite", fill_disk)
    full = rdjax_cli(*flags, f"--input={tmp_path / 'box'}")
    assert "No space left on device" in full.error_line() and written
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.slow  # an evaluation pass and a prediction
def test_evaluation_with_fit_scores_as_predict_does(ad2_root, trained, tmp_path):
    """The shared 64 px model evaluated on the 96x64 test_public images with
    resize.mode='fit': the scores it writes are Predictor.predict's on the same files (the
    setting is recorded in calibration.json), within float32 batching, and the same
    images squeezed to 64x64 score differently."""
    import csv
    import json

    config, work, _ = trained
    workdir = tmp_path / "w"
    shutil.copytree(work, workdir)
    saved = json.loads((workdir / "config.json").read_text())
    saved["dataset"].update(name="mvtec_ad2", category="can")  # the model, as if trained on this tree
    (workdir / "config.json").write_text(json.dumps(saved))
    fitted = ad2_config(ad2_root, tmp_path, mode="fit", overlap=8)
    fitted.model = config.model
    result = train.evaluate(fitted, workdir)
    assert result["num_images"] == 9 and result["num_defective"] == 6
    assert json.loads((workdir / "calibration.json").read_text())["resize"]["mode"] == "fit"
    table = workdir / "eval" / f"epoch_{result['epoch']:04d}" / "scores.csv"
    scores = {row["file"]: float(row["score"]) for row in csv.DictReader(table.open())}
    files = [ad2_root / "can/test_public" / name for name in scores]
    model = rdjax.load(workdir)
    np.testing.assert_allclose(model.predict([str(f) for f in files]).scores, list(scores.values()), atol=1e-5)
    squeezed = model.predict([str(f) for f in files], resize="squeeze").scores
    assert np.abs(squeezed - np.array(list(scores.values()))).max() > 1e-3
