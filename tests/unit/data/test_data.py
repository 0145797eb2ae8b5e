"""Synthetic data, the TFDS builder, preprocessing against torchvision, batching."""

import functools
import io

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from rdjax import data, registry
from rdjax.data import index, mvtec, normalize, pipeline, preprocess, synthetic
from rdjax.data.preprocess import Recipe
from rdjax.errors import ConfigError
from rdjax.runtime import sharding
from rdjax.scoring import maps, passes


@pytest.fixture(scope="module")
def synth_root(synthetic_data):
    return synthetic_data(num_train=6, num_test_good=3, num_per_defect=2)


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_synthetic_is_deterministic(tmp_path):
    a = synthetic.generate(
        tmp_path / "a", categories=("weave",), size=32, num_train=2, num_test_good=1, num_per_defect=1
    )
    b = synthetic.generate(
        tmp_path / "b", categories=("weave",), size=32, num_train=2, num_test_good=1, num_per_defect=1
    )
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert len(files_a) == 2 + 1 + 3 * 2
    for f in files_a:
        assert (a / f).read_bytes() == (b / f).read_bytes()


@pytest.mark.parametrize("category", synthetic.CATEGORIES)
@pytest.mark.parametrize("kind", synthetic.DEFECT_TYPES)
def test_synthetic_masks_are_exactly_the_changed_pixels(category, kind):
    rng = np.random.default_rng(0)
    img, center, spread = synthetic._sample(rng, category, 128)
    mask = synthetic._defect_mask(rng, kind, 128, center, spread)
    changed = np.any(
        synthetic._to_uint8(synthetic._apply_defect(rng, img, mask, kind)) != synthetic._to_uint8(img), axis=-1
    )
    assert mask.sum() > 20
    assert not np.any(changed & ~mask)  # nothing outside the mask changed
    assert changed[mask].mean() > 0.97  # (a pixel may by chance round to its old value)


def test_builder_reads_the_layout(synth_root, tmp_path):
    builder = index.prepare(synth_root, "disk", tmp_path / "tfds", mvtec.scan_category(synth_root, "disk"))
    train = index.load_split(builder, "train", Recipe(size=32), synth_root)
    test = index.load_split(builder, "test", Recipe(size=32), synth_root)
    assert train.images().shape == (6, 32, 32, 3) and train.images().dtype == np.uint8
    assert len(test) == 3 + 3 * 2
    assert test.defect_types.count("good") == 3
    assert list(test.labels) == [0 if t == "good" else 1 for t in test.defect_types]
    assert not test.masks()[test.labels == 0].any()
    assert all(test.masks()[i].any() for i in np.flatnonzero(test.labels))
    i = test.filenames.index("hole/001.png")
    want = Recipe(size=32).mask(
        preprocess.decode_mask((synth_root / "disk/ground_truth/hole/001_mask.png").read_bytes())
    )
    np.testing.assert_array_equal(test.masks()[i], want)


def test_builder_sees_an_edited_folder(synth_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    first = index.prepare(root, "disk", tmp_path / "tfds", mvtec.scan_category(root, "disk"))
    (root / "disk/train/good/000.png").unlink()
    second = index.prepare(root, "disk", tmp_path / "tfds", mvtec.scan_category(root, "disk"))
    assert first.builder_config.name != second.builder_config.name
    assert len(index.load_split(second, "train", Recipe(size=32), root)) == 5
    # Each edit prepares a copy; only the KEEP_PREPARED most recently used stay, the one in use among them.
    (root / "disk" / "train" / "good" / "001.png").unlink()
    third = index.prepare(root, "disk", tmp_path / "tfds", mvtec.scan_category(root, "disk"))
    (root / "disk" / "train" / "good" / "002.png").unlink()
    fourth = index.prepare(root, "disk", tmp_path / "tfds", mvtec.scan_category(root, "disk"))
    kept = sorted(p.name for p in (tmp_path / "tfds" / "mvtec_ad").iterdir() if p.name.startswith("disk-"))
    assert index.KEEP_PREPARED == 3
    assert kept == sorted(b.builder_config.name for b in (second, third, fourth))
    assert len(index.load_split(fourth, "train", Recipe(size=32), root)) == 3


def test_prepared_index_holds_paths_and_survives_a_moved_root(synth_root, tmp_path):
    """The prepared records are paths relative to the root (a few bytes each, whatever
    the image size), so a moved root reads the same pixels from its new place."""
    import shutil

    root = tmp_path / "before"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns("_tfds"))
    builder = index.prepare(root, "disk", tmp_path / "tfds", mvtec.scan_category(root, "disk"))
    record = builder.as_data_source()["train"][0]
    assert record["image"].decode().startswith("disk/train/good/") and record["mask"] == b""
    before = index.load_split(builder, "train", Recipe(size=32), root).images()
    moved = tmp_path / "after"
    root.rename(moved)
    again = index.prepare(moved, "disk", tmp_path / "tfds", mvtec.scan_category(moved, "disk"))
    assert again.builder_config.name == builder.builder_config.name  # the same index, reused
    np.testing.assert_array_equal(index.load_split(again, "train", Recipe(size=32), moved).images(), before)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_image_preprocessing_equals_torchvision(mode):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    pil = Image.fromarray(rgb).convert(mode)
    data = io.BytesIO()
    pil.save(data, format="PNG")
    ours = preprocess.Recipe(size=64).image(preprocess.decode_image(data.getvalue()))
    reference = Image.open(io.BytesIO(data.getvalue())).convert("RGB")  # the official dataset.py
    official = transforms.Compose([transforms.Resize((64, 64)), transforms.ToTensor()])(reference)
    np.testing.assert_array_equal(ours.astype(np.float32) / 255.0, official.permute(1, 2, 0).numpy())
    norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(official)
    np.testing.assert_allclose(np.asarray(normalize.normalize(ours[None]))[0], norm.permute(1, 2, 0).numpy(), atol=1e-6)


def test_mask_preprocessing_equals_official():
    mask = np.zeros((70, 90), np.uint8)
    mask[10:40, 20:61] = 255
    mask[50:52, 5:80] = 255  # thin: bilinear shrinking makes it partly fall below 0.5
    gt = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])(Image.fromarray(mask))
    np.testing.assert_array_equal(
        preprocess.Recipe(size=32).mask(preprocess.decode_mask(_png(mask))), gt[0].numpy() > 0.5
    )


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    arr = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    out = preprocess.Recipe(size=64).image(preprocess.decode_image(_png(arr)))
    assert out.shape == (64, 64, 3)
    assert out.max() == 255 and out.min() == 0
    np.testing.assert_array_equal(out[..., 0], np.round(arr / 65535 * 255).astype(np.uint8))


def test_epoch_batches_cover_every_image_once_and_depend_only_on_seed_and_epoch():
    a, valid = pipeline.epoch_batches(37, 8, seed=5, epoch=3, drop_last=True)
    assert a.shape == (4, 8) and valid.all()  # full batches only: 37 mod 8 = 5 rows wait for another epoch
    assert len(set(a.ravel().tolist())) == 32 and set(a.ravel().tolist()) <= set(range(37))
    np.testing.assert_array_equal(a, pipeline.epoch_batches(37, 8, seed=5, epoch=3, drop_last=True)[0])
    assert not np.array_equal(a, pipeline.epoch_batches(37, 8, seed=5, epoch=4, drop_last=True)[0])
    # Column j always draws from lane j: the process feeding those columns owns those rows.
    lanes = pipeline.lanes(37, 8, seed=5)
    assert sorted(np.concatenate(lanes).tolist()) == list(range(37))
    for epoch in range(1, 6):
        for drop_last in (True, False):
            batches, _ = pipeline.epoch_batches(37, 8, seed=5, epoch=epoch, drop_last=drop_last)
            for j, lane in enumerate(lanes):
                assert set(batches[:, j].tolist()) <= set(lane.tolist())
    # Over epochs every row is used (the left-over rows differ from epoch to epoch).
    used = set(np.concatenate([pipeline.epoch_batches(37, 8, 5, e, True)[0].ravel() for e in range(1, 9)]).tolist())
    assert used == set(range(37))


@pytest.mark.parametrize(("n", "batch", "steps"), [(41, 16, 3), (37, 8, 5), (32, 8, 4)])
def test_the_official_epoch_sees_every_row_exactly_once(n, batch, steps):
    """ceil(N / B) steps, as the official DataLoader (drop_last=False): the valid rows of
    an epoch are every row exactly once; the last batch has N mod B of them (B when it
    divides), the padding rows repeat rows of their own lanes, and the order is a
    function of (seed, epoch)."""
    for epoch in (1, 2):
        rows, valid = pipeline.epoch_batches(n, batch, seed=5, epoch=epoch)
        assert rows.shape == valid.shape == (steps, batch) == (pipeline.steps_per_epoch(n, batch), batch)
        assert sorted(rows[valid == 1].tolist()) == list(range(n))
        assert valid[:-1].all() and valid[-1].sum() == (n % batch or batch)
        np.testing.assert_array_equal(rows, pipeline.epoch_batches(n, batch, seed=5, epoch=epoch)[0])
    assert pipeline.steps_per_epoch(n, batch, drop_last=True) == n // batch


def test_processes_own_disjoint_rows_that_cover_their_columns():
    """Each of P processes feeds columns share(P) of every global batch and owns exactly
    the rows those columns draw from: the shares are disjoint and cover the data."""
    for processes in (1, 2, 4):
        owned = [pipeline.owned_rows(37, 8, 5, p, processes) for p in range(processes)]
        assert sorted(np.concatenate(owned).tolist()) == list(range(37))
        batches, _ = pipeline.epoch_batches(37, 8, seed=5, epoch=2)
        for p in range(processes):
            assert set(batches[:, pipeline.share(8, p, processes)].ravel().tolist()) <= set(owned[p].tolist())
    with pytest.raises(ConfigError, match="batch_size=8 is larger than the 5 training images"):
        pipeline.lanes(5, 8, seed=0)


def test_grain_batches_decode_each_requested_row_once():
    images = np.arange(9, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    split = preprocess.Split.from_arrays(
        images, np.zeros((9, 2, 2), bool), np.zeros(9), ["good"] * 9, [str(i) for i in range(9)]
    )
    before = pipeline.decoded["unit"]
    rows = [np.array([4, 2, 7]), np.array([0, 8, 8])]
    out = list(pipeline.load_batches(split, rows, "unit", with_masks=True))
    assert [b["image"][:, 0, 0, 0].tolist() for b in out] == [[4, 2, 7], [0, 8, 8]]
    assert out[0]["mask"].shape == (3, 2, 2)
    assert pipeline.decoded["unit"] - before == 6


def test_evaluation_sees_every_image_exactly_once():
    """passes.run_pass over 11 images in batches of 4: each image is decoded once (and
    the last batch's one padding row, a repeat of its last image), its score comes back
    once and in order, and the padding adds nothing to the pixel counts (11 images x 16
    pixels, half of image 3's anomalous)."""
    images = np.arange(11, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    masks = np.zeros((11, 4, 4), bool)
    masks[3, :2] = True
    labels = (np.arange(11) == 3).astype(int)
    split = preprocess.Split.from_arrays(images, masks, labels, ["good"] * 11, [str(i) for i in range(11)])
    mesh = sharding.make_mesh()
    put = functools.partial(sharding.put_batch, sharding=sharding.batch_sharding(mesh))

    def pass_step(tv, sv, batch, *rest):
        image_maps = batch[..., 0].astype(jnp.float32) + 1.0
        return maps.stats_step(image_maps, image_maps.max(axis=(1, 2)), *rest)

    before = pipeline.decoded["once"]
    passed = passes.run_pass(passes.PassSetup(pass_step, None, None, 4, put), split, exact=True, kind="once")
    assert pipeline.decoded["once"] - before == 12
    np.testing.assert_array_equal(passed.scores, np.arange(11) + 1.0)
    np.testing.assert_array_equal(passed.sums, (np.arange(11) + 1.0) * 16)
    assert passed.pixels.neg.sum() == 11 * 16 - 8 and passed.pixels.pos.sum() == 8
    assert passed.pixels.maps.shape == (11, 4, 4) and passed.pixels.masks.sum() == 8


def test_official_tar_archive_is_accepted(synth_root, tmp_path):
    import tarfile

    import ml_collections

    archive = tmp_path / "mvtec_anomaly_detection.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(synth_root / "disk", arcname="disk")
    config = ml_collections.ConfigDict(
        {"name": "mvtec", "root": str(archive), "data_dir": str(tmp_path / "cache"), "category": "all"}
    )
    dataset = registry.build_dataset(config)
    assert dataset.categories() == ["disk"]
    root = dataset.root
    assert (root / "disk/ground_truth/hole/001_mask.png").read_bytes() == (
        synth_root / "disk/ground_truth/hole/001_mask.png"
    ).read_bytes()
    mtime = root.stat().st_mtime_ns
    assert registry.build_dataset(config).root == root and root.stat().st_mtime_ns == mtime  # extracted once, reused
    train, test = dataset.load("disk", Recipe(size=32))
    assert len(train) == 6 and len(test) == 3 + 3 * 2


def test_hold_out_is_disjoint_and_a_function_of_the_seed():
    split = preprocess.Split.from_arrays(
        np.arange(10)[:, None, None, None].astype(np.uint8) * np.ones((1, 2, 2, 3), np.uint8),
        np.zeros((10, 2, 2), bool),
        np.zeros(10, np.int32),
        ["good"] * 10,
        [f"{i}.png" for i in range(10)],
    )
    kept, held = data.hold_out(split, 3, seed=111)
    assert len(kept) == 7 and len(held) == 3
    assert sorted(kept.filenames + held.filenames) == sorted(split.filenames)
    assert data.hold_out(split, 3, seed=111)[1].filenames == held.filenames
    assert data.hold_out(split, 3, seed=5)[1].filenames != held.filenames
    np.testing.assert_array_equal(held.images()[:, 0, 0, 0], [int(f.split(".")[0]) for f in held.filenames])
    assert data.hold_out(split, 0, seed=1) == (split, None)
    with pytest.raises(ConfigError, match="validation_size=10 leaves no training images"):
        data.hold_out(split, 10, seed=1)
    assert [data.held_out_count(f, 10) for f in (0.1, 0.25, 0.01, 3.0, 0)] == [1, 2, 1, 3, 0]  # rounded, at least 1
    assert data.hold_out(split, 0.3, seed=111)[1].filenames == held.filenames  # 0.3 of 10 is the same 3
    with pytest.raises(ConfigError, match="a fraction below 1 or a whole number"):
        data.hold_out(split, 2.5, seed=1)
