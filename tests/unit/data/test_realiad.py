"""Real-IAD through its split files: a tiny tree in the published layout (five views per
sample, a defective sample whose unaffected views are listed as OK without masks) loads
with the official loader's labels, one row per image, its sample and view in its name."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rdjax import registry
from rdjax.data.preprocess import Recipe
from rdjax.data.realiad import sample_and_view
from rdjax.errors import DataError

from conftest import small_config

VIEWS = ("C1", "C2", "C3", "C4", "C5")
# (status folder, sample number, anomaly class per view: 'OK' = no defect visible, no mask)
TRAIN = [("OK", n, ["OK"] * 5) for n in range(1, 5)]
TEST = [
    ("OK", 5, ["OK"] * 5),
    ("NG/AK", 6, ["AK", "AK", "AK", "OK", "OK"]),
    ("NG/HS", 7, ["HS"] * 5),
]


def mask_of(number: int, view: str) -> np.ndarray:
    """A 0/255 square whose place depends on the sample and view."""
    mask = np.zeros((32, 32), np.uint8)
    k = number + VIEWS.index(view)
    mask[k : k + 8, 2 * k : 2 * k + 8] = 255
    return mask


def write_samples(category_dir: Path, samples, category: str) -> list[dict]:
    """The images (and masks) of ``samples`` in Real-IAD's folders; their split records."""
    rng = np.random.default_rng(len(samples))
    records = []
    for status, number, classes in samples:
        folder = category_dir / status / f"S{number:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        tag = "OK" if status == "OK" else "NG_" + status.split("/")[1]
        for view, anomaly_class in zip(VIEWS, classes):
            name = f"{category}_{number:04d}_{tag}_{view}_20230922141159"
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{name}.jpg")
            mask_path = None
            if anomaly_class != "OK":
                Image.fromarray(mask_of(number, view)).save(folder / f"{name}.png")
                mask_path = f"{status}/S{number:04d}/{name}.png"
            records.append(
                {
                    "category": category,
                    "anomaly_class": anomaly_class,
                    "image_path": f"{status}/S{number:04d}/{name}.jpg",
                    "mask_path": mask_path,
                }
            )
    return records


def split_file(folder: Path, category: str, train: list[dict], test: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"prefix": f"{category}/", "normal_class": "OK", "pre_transform": None}
    (folder / f"{category}.json").write_text(json.dumps({"meta": meta, "train": train, "test": test}))


@pytest.fixture(scope="module")
def realiad_root(tmp_path_factory) -> Path:
    """Real-IAD/realiad_256/{audiojack,toy}, their multi-view split files in realiad_jsons/,
    and a single-view set (C1 only) inside it as realiad_jsons/realiad_jsons_sv/."""
    base = tmp_path_factory.mktemp("Real-IAD")
    for category in ("audiojack", "toy"):
        train = write_samples(base / "realiad_256" / category, TRAIN, category)
        test = write_samples(base / "realiad_256" / category, TEST, category)
        split_file(base / "realiad_jsons", category, train, test)
        c1 = [r for r in train + test if "_C1_" in r["image_path"]]
        split_file(base / "realiad_jsons" / "realiad_jsons_sv", category, c1[:4], c1[4:])
    return base


def realiad_config(base: Path, tmp_path: Path, category: str = "audiojack"):
    config = small_config(base / "realiad_256", category=category)
    config.dataset.name = "realiad"
    config.dataset.data_dir = str(tmp_path / "tfds")
    return config


def test_split_file_rows_labels_masks_and_views(realiad_root, tmp_path):
    config = realiad_config(realiad_root, tmp_path)
    config.dataset.category = "all"
    dataset = registry.build_dataset(config.dataset)
    assert dataset.categories() == ["audiojack", "toy"]
    train, test = dataset.load("audiojack", Recipe(size=32))
    assert len(train) == 20 and not train.labels.any()
    assert len(test) == 15 and int(test.labels.sum()) == 8  # AK's C4 and C5 show no defect: normal
    assert Counter(test.defect_types) == {"good": 7, "AK": 3, "HS": 5} and test.has_masks
    assert Counter(sample_and_view(f)[1] for f in train.filenames) == {v: 4 for v in VIEWS}
    assert Counter(sample_and_view(f)[1] for f in test.filenames) == {v: 3 for v in VIEWS}
    assert {sample_and_view(f)[0] for f in test.filenames} == {
        "audiojack_0005_OK",
        "audiojack_0006_NG_AK",
        "audiojack_0007_NG_HS",
    }
    masks = test.masks()
    for row, name in enumerate(test.filenames):
        sample, view = sample_and_view(name)
        expected = mask_of(int(sample.split("_")[1]), view) > 0 if test.labels[row] else np.zeros((32, 32), bool)
        np.testing.assert_array_equal(masks[row], expected, err_msg=name)
    row = test.filenames.index("good/audiojack_0006_NG_AK_C4_20230922141159.jpg")
    assert test.labels[row] == 0 and not masks[row].any()


def test_the_single_view_split_set(realiad_root, tmp_path):
    config = realiad_config(realiad_root, tmp_path, category="toy")
    config.dataset.split_set = "realiad_jsons_sv"
    train, test = registry.build_dataset(config.dataset).load("toy", Recipe(size=32))
    assert len(train) == 4 and len(test) == 3 and test.labels.tolist() == [1, 1, 0]
    assert {sample_and_view(f)[1] for f in train.filenames + test.filenames} == {"C1"}


def test_a_missing_listed_image_is_named(realiad_root, tmp_path):
    base = tmp_path / "copy"
    train = write_samples(base / "realiad_256" / "audiojack", TRAIN[:1], "audiojack")
    test = write_samples(base / "realiad_256" / "audiojack", TEST[1:2], "audiojack")
    split_file(base / "realiad_jsons", "audiojack", train, test)
    missing = base / "realiad_256" / "audiojack" / test[2]["image_path"]
    missing.unlink()
    with pytest.raises(DataError, match=rf"{missing}: listed in .*audiojack.json but missing"):
        registry.build_dataset(realiad_config(base, tmp_path).dataset).load("audiojack", Recipe(size=32))


def test_unknown_category_and_misplaced_root(realiad_root, tmp_path):
    with pytest.raises(DataError, match="no split file for 'fryum'; found: audiojack, toy"):
        registry.build_dataset(realiad_config(realiad_root, tmp_path, "fryum").dataset).load("fryum", Recipe(size=32))
    config = realiad_config(realiad_root, tmp_path)
    config.dataset.root = str(realiad_root)  # the Real-IAD folder instead of its realiad_256
    with pytest.raises(DataError, match="no split files beside it"):
        registry.build_dataset(config.dataset)


def test_sample_and_view_of_a_name():
    assert sample_and_view("AK/toy_brick_0010_NG_AK_C1_20230917142453.jpg") == ("toy_brick_0010_NG_AK", "C1")
    assert sample_and_view("good/usb_adaptor_0326_OK_C5_20230925185139.jpg") == ("usb_adaptor_0326_OK", "C5")
    with pytest.raises(DataError, match="not a Real-IAD image name"):
        sample_and_view("good/000.png")


@pytest.mark.slow
def test_one_model_trains_and_evaluates_on_every_category(realiad_root, tmp_path):
    """The unified setting over the split files: one workdir, each category evaluated on
    its own test rows (the counts the split files give) with its own thresholds."""
    from rdjax import train

    config = realiad_config(realiad_root, tmp_path, category="all")
    config.setting, config.batch_size = "unified", 8
    results = train.run(config, tmp_path / "w")
    assert sorted(results) == ["audiojack", "toy"]
    assert results["audiojack"]["num_images"] == 15 and results["audiojack"]["num_defective"] == 8
    for category, result in results.items():
        assert 0 <= result["image_auroc"] <= 1 and 0 <= result["pixel_auroc"] <= 1, category
        assert (tmp_path / "w" / "eval" / "epoch_0001" / category / "results.md").is_file()
    calibration = json.loads((tmp_path / "w" / "calibration.json").read_text())
    assert sorted(calibration["categories"]) == ["audiojack", "toy"]
