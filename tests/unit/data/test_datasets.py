"""VisA (1cls split CSV, non-0/255 masks) and plain folders, through the same training and
evaluation as MVTec AD; MPDD and BTAD (ok/ko folders) read by dataset 'mvtec'."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import rdjax
from rdjax import registry, train
from rdjax.data.preprocess import Recipe
from rdjax.errors import DataError

from conftest import RECOMPUTED, assert_auroc_within, rdjax_cli, small_config


@pytest.fixture(scope="module")
def source(synthetic_data):
    return synthetic_data(num_train=8, num_test_good=3, num_per_defect=2)


@pytest.fixture(scope="module")
def visa_root(source, tmp_path_factory):
    """A tiny tree in VisA's layout: JPG images, 0/1 masks, and split_csv/1cls.csv."""
    root = tmp_path_factory.mktemp("visa")
    rows = []
    for category in ("candle", "pcb1"):
        base = root / category / "Data"
        for sub in ("Images/Normal", "Images/Anomaly", "Masks/Anomaly"):
            (base / sub).mkdir(parents=True)
        for i, p in enumerate(sorted((source / "disk/train/good").glob("*.png"))):
            Image.open(p).convert("RGB").save(base / "Images/Normal" / f"{i:04d}.JPG", quality=95)
            rows.append([category, "train", "normal", f"{category}/Data/Images/Normal/{i:04d}.JPG", ""])
        for i, p in enumerate(sorted((source / "disk/test/good").glob("*.png"))):
            Image.open(p).convert("RGB").save(base / "Images/Normal" / f"t{i:03d}.JPG", quality=95)
            rows.append([category, "test", "normal", f"{category}/Data/Images/Normal/t{i:03d}.JPG", ""])
        defects = sorted((source / "disk/test").glob("[!g]*/*.png"))
        for i, p in enumerate(defects):
            Image.open(p).convert("RGB").save(base / "Images/Anomaly" / f"{i:03d}.JPG", quality=95)
            gt = source / "disk/ground_truth" / p.parent.name / f"{p.stem}_mask.png"
            Image.fromarray((np.asarray(Image.open(gt)) > 0).astype(np.uint8)).save(
                base / "Masks/Anomaly" / f"{i:03d}.png"
            )
            rows.append(
                [
                    category,
                    "test",
                    "anomaly",
                    f"{category}/Data/Images/Anomaly/{i:03d}.JPG",
                    f"{category}/Data/Masks/Anomaly/{i:03d}.png",
                ]
            )
    (root / "split_csv").mkdir()
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def counts(source) -> tuple[int, int, int]:
    """(training, good test, defective test) images of the generated source category: what
    every layout built from it must hold."""
    disk = source / "disk"
    return (
        len(list((disk / "train/good").glob("*.png"))),
        len(list((disk / "test/good").glob("*.png"))),
        len(list((disk / "test").glob("[!g]*/*.png"))),
    )


def dataset_config(tmp_path, **dataset):
    config = small_config(tmp_path)
    for k, v in dataset.items():
        config.dataset[k] = v
    return config


def reevaluate(workdir, split):
    """Maps and scores of a split from the saved workdir, for an independent check: they
    differ from the run's by float32 rounding between batch sizes, so the run's AUROCs
    must lie in the range they allow (conftest.assert_auroc_within)."""
    return rdjax.load(workdir).predict_resized(split.images())


def test_visa_split_and_masks(visa_root, source, tmp_path):
    config = dataset_config(
        tmp_path, name="visa", root=str(visa_root), category="pcb1", data_dir=str(tmp_path / "tfds")
    )
    assert registry.build_dataset(dict_with(config.dataset, category="all")).categories() == ["candle", "pcb1"]
    train_split, test = registry.build_dataset(config.dataset).load("pcb1", Recipe(size=64))
    n_train, n_good, n_bad = counts(source)
    assert len(train_split) == n_train and len(test) == n_good + n_bad
    assert test.has_masks and set(test.defect_types) == {"good", "anomaly"}
    # 0/1 masks are binarized before the resize: they match the 0/255 originals.
    want = np.asarray(Image.open(source / "disk/ground_truth/hole/000_mask.png").resize((64, 64), Image.BILINEAR)) > 127
    i = test.filenames.index("anomaly/000.JPG")
    np.testing.assert_array_equal(test.masks()[i], want)


def test_visa_unknown_category(visa_root, tmp_path):
    config = dataset_config(
        tmp_path, name="visa", root=str(visa_root), category="fryum", data_dir=str(tmp_path / "tfds")
    )
    with pytest.raises(DataError, match="no rows for category 'fryum'; found: candle, pcb1"):
        registry.build_dataset(config.dataset).load("fryum", Recipe(size=64))


@pytest.mark.slow
def test_visa_all_categories_through_the_cli(visa_root, source, tmp_path):
    result = rdjax_cli(
        "train",
        "--config=visa",
        f"--workdir={tmp_path / 'w'}",
        f"--config.dataset.root={visa_root}",
        "--config.dataset.category=all",
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        "--config.model.arch=resnet18",
        "--config.model.teacher_weights=none",
        "--config.image_size=64",
        "--config.num_epochs=1",
        "--config.batch_size=4",
    )  # VisA's 16: more than these 8 training images, of which the default calibration holds out one
    assert result.code == 0, result.stderr[-3000:]
    table = (tmp_path / "w" / "results.md").read_text()
    assert "| candle |" in table and "| pcb1 |" in table and "**mean**" in table
    assert table in result.stdout
    metrics = json.loads((tmp_path / "w" / "pcb1" / "metrics.json").read_text())
    assert metrics["num_images"] == sum(counts(source)[1:])
    _, test = registry.build_dataset(
        dict_with(small_config(tmp_path).dataset, name="visa", root=str(visa_root), data_dir=str(tmp_path / "tfds"))
    ).load("pcb1", Recipe(size=64))
    maps, _ = reevaluate(tmp_path / "w" / "pcb1", test)
    assert_auroc_within(metrics["pixel_auroc"], test.masks(), maps)


def test_mpdd_reads_as_mvtec(source, tmp_path):
    """MPDD is in MVTec AD's layout exactly (train/good, test/<type>, ground_truth/<type>/<stem>_mask.png)."""
    root = tmp_path / "MPDD"
    for category in ("bracket_black", "tubes"):
        shutil.copytree(source / "disk", root / category)
    config = dataset_config(tmp_path, name="mvtec", root=str(root), category="all", data_dir=str(tmp_path / "tfds"))
    dataset = registry.build_dataset(config.dataset)
    assert dataset.categories() == ["bracket_black", "tubes"]
    train_split, test = dataset.load("tubes", Recipe(size=64))
    n_train, n_good, n_bad = counts(source)
    assert len(train_split) == n_train and len(test) == n_good + n_bad and int(test.labels.sum()) == n_bad
    assert test.has_masks and set(test.defect_types) == {"good", "hole", "scratch", "stain"}


@pytest.fixture(scope="module")
def btad_root(source, tmp_path_factory):
    """BTAD's layout: train/ok, test/ok, test/ko, masks in ground_truth/ko named as their
    image; .bmp images with .png masks (as its 01) and with .bmp masks."""
    root = tmp_path_factory.mktemp("BTech_Dataset_transformed")
    disk = source / "disk"
    for category, mask_ext in (("01", ".png"), ("03", ".bmp")):
        for sub in ("train/ok", "test/ok", "test/ko", "ground_truth/ko"):
            (root / category / sub).mkdir(parents=True)
        for split in ("train", "test"):
            for p in sorted((disk / split / "good").glob("*.png")):
                Image.open(p).save(root / category / split / "ok" / f"{p.stem}.bmp")
        for i, p in enumerate(sorted((disk / "test").glob("[!g]*/*.png"))):
            Image.open(p).save(root / category / "test/ko" / f"{i:04d}.bmp")
            gt = disk / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"
            Image.open(gt).save(root / category / "ground_truth/ko" / f"{i:04d}{mask_ext}")
    return root


@pytest.mark.parametrize("category", ["01", "03"])
def test_btad_ok_and_ko_folders(btad_root, source, tmp_path, category):
    config = dataset_config(
        tmp_path, name="mvtec", root=str(btad_root), category="all", data_dir=str(tmp_path / "tfds")
    )
    dataset = registry.build_dataset(config.dataset)
    assert dataset.categories() == ["01", "03"]
    train_split, test = dataset.load(category, Recipe(size=64))
    n_train, n_good, n_bad = counts(source)
    assert len(train_split) == n_train and not train_split.labels.any()
    assert len(test) == n_good + n_bad and int(test.labels.sum()) == n_bad and test.has_masks
    assert set(test.defect_types) == {"good", "ko"} and "good/000.bmp" in test.filenames
    bad = sorted((source / "disk/test").glob("[!g]*/*.png"))
    row = test.filenames.index("ko/0002.bmp")
    gt = source / "disk/ground_truth" / bad[2].parent.name / f"{bad[2].stem}_mask.png"
    np.testing.assert_array_equal(test.masks([row])[0], np.asarray(Image.open(gt)) > 127)
    np.testing.assert_array_equal(test.images([row])[0], np.asarray(Image.open(bad[2]).convert("RGB")))


def dict_with(node, **changes):
    copy = node.copy_and_resolve_references()
    for k, v in changes.items():
        copy[k] = v
    return copy


@pytest.mark.slow  # two whole training runs in this process
@pytest.mark.parametrize("with_masks", [True, False])
def test_folder_dataset(source, tmp_path, with_masks):
    anomalous, masks = tmp_path / "bad", tmp_path / "masks"
    anomalous.mkdir()
    masks.mkdir()
    for p in sorted((source / "disk/test").glob("[!g]*/*.png")):
        name = f"{p.parent.name}_{p.stem}"
        (anomalous / f"{name}.png").write_bytes(p.read_bytes())
        (masks / f"{name}_mask.png").write_bytes(
            (source / "disk/ground_truth" / p.parent.name / f"{p.stem}_mask.png").read_bytes()
        )
    config = dataset_config(
        tmp_path,
        name="folder",
        category="parts",
        data_dir=str(tmp_path / "tfds"),
        train_dir=str(source / "disk/train/good"),
        test_good_dir=str(source / "disk/test/good"),
        test_anomalous_dir=str(anomalous),
        mask_dir=str(masks) if with_masks else "",
    )
    result = train.train_and_evaluate(config, tmp_path / "w")
    _, n_good, n_bad = counts(source)
    assert result["num_images"] == n_good + n_bad and result["num_defective"] == n_bad
    _, test = registry.build_dataset(config.dataset).load("parts", Recipe(size=64))
    maps, scores = reevaluate(tmp_path / "w", test)
    assert_auroc_within(result["image_auroc"], test.labels, scores)
    if with_masks:
        assert_auroc_within(result["pixel_auroc"], test.masks(), maps)
        assert not result["warnings"][1:]
    else:
        assert np.isnan(result["pixel_auroc"]) and np.isnan(result["aupro"])
        assert any("image-level metrics only" in w for w in result["warnings"])
        assert "image-level metrics only" in (tmp_path / "w" / "results.md").read_text()


@pytest.fixture
def mock_tfds():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=80, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_novelty_split_protocol(mock_tfds, name, tmp_path):
    import tensorflow_datasets as tfds

    config = dict_with(small_config(tmp_path).dataset, name=name, normal_class="3", data_dir="")
    dataset = registry.build_dataset(config)
    assert dataset.categories() == ["class_3"]
    assert registry.build_dataset(dict_with(config, normal_class="all")).categories() == [
        f"class_{c}" for c in range(10)
    ]
    train_split, test = dataset.load("class_3", Recipe(size=32))
    source = {s: tfds.builder(name).as_data_source(split=s) for s in ("train", "test")}
    all_train = np.array([int(source["train"][i]["label"]) for i in range(len(source["train"]))])
    all_test = np.array([int(source["test"][i]["label"]) for i in range(len(source["test"]))])
    assert len(train_split) == int((all_train == 3).sum()) and not train_split.labels.any()
    assert len(test) == len(all_test)
    np.testing.assert_array_equal(test.labels, (all_test != 3).astype(int))
    assert train_split.images().shape[1:] == (32, 32, 3) and not test.has_masks
    if name != "cifar10":  # grayscale -> three equal channels
        np.testing.assert_array_equal(test.images()[..., 0], test.images()[..., 2])


@pytest.mark.slow
def test_novelty_trains_and_reports_both_scores(mock_tfds, tmp_path):
    from rdjax.configs import mnist as mnist_config

    config = mnist_config.get_config()
    config.dataset.normal_class = "3"
    config.model.teacher_weights = "none"
    config.num_epochs = 1
    config.batch_size = 8  # the mock has 12 training images of class 3
    assert config.imagenet_normalize is False  # as the official MNIST helper
    results = train.run(config, tmp_path / "w")
    assert list(results) == ["class_3"]
    result = results["class_3"]
    assert np.isnan(result["pixel_auroc"])
    _, test = registry.build_dataset(config.dataset).load("class_3", Recipe(size=32))
    maps, scores = reevaluate(tmp_path / "w", test)
    assert_auroc_within(result["image_auroc"], test.labels, scores)
    # A sum of H*W values each within RECOMPUTED: within H*W times that.
    sum_tol = RECOMPUTED * maps[0].size
    assert_auroc_within(result["image_auroc_sum"], test.labels, maps.sum(axis=(1, 2)), sum_tol)
    from rdjax.outputs.tables import summary_markdown

    table = summary_markdown({"class_3": result}, registry.build_dataset(config.dataset).summary_keys)
    assert "image AUROC (sum of map)" in table and "**mean**" in table
