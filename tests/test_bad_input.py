"""Each bad input: one line on stderr naming the file or key, exit status 1, nothing
half-written. And inputs that are not errors: odd PNG modes, JPEG, BMP, upper-case names."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import ROOT
from rdjax.data import mvtec, synthetic


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("pristine"), categories=("disk",), size=64,
                              num_train=4, num_test_good=2, num_per_defect=2)


@pytest.fixture
def root(pristine, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(pristine, copy)
    return copy


def run_main(root: Path, workdir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rdjax.main", "--config=configs/synthetic.py", f"--workdir={workdir}",
           "--config.dataset.name=mvtec", f"--config.dataset.root={root}", "--config.dataset.category=disk",
           f"--config.dataset.data_dir={root.parent / 'tfds'}", "--config.image_size=64", "--config.num_epochs=1", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_missing_root(tmp_path):
    proc = run_main(tmp_path / "nowhere", tmp_path / "w")
    assert_one_line_error(proc, str(tmp_path / "nowhere"), "does not exist")
    assert not (tmp_path / "w").exists()


def test_missing_category_lists_what_exists(root, tmp_path):
    proc = run_main(root, tmp_path / "w", "--config.dataset.category=bottle")
    assert_one_line_error(proc, "bottle", "no such category", "found: disk")
    assert not (tmp_path / "w").exists()


def test_empty_train_folder(root, tmp_path):
    for p in (root / "disk/train/good").iterdir():
        p.unlink()
    (root / "disk/train/good/notes.txt").write_text("not an image")
    assert_one_line_error(run_main(root, tmp_path / "w"), "train/good", "no training images")


def test_truncated_image(root, tmp_path):
    path = root / "disk/train/good/001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    proc = run_main(root, tmp_path / "w")
    assert_one_line_error(proc, "train/good/001.png", "not a readable image")
    assert not (tmp_path / "w").exists()


def test_file_that_is_not_an_image(root, tmp_path):
    (root / "disk/test/hole/000.png").write_text("this is text")
    assert_one_line_error(run_main(root, tmp_path / "w"), "test/hole/000.png", "not a readable image")


def test_missing_masks(root, tmp_path):
    (root / "disk/ground_truth/scratch/001_mask.png").unlink()
    assert_one_line_error(run_main(root, tmp_path / "w"), "ground_truth/scratch", "no mask for 1 of 2", "001_mask.png")


def test_more_masks_than_images(root, tmp_path):
    shutil.copy(root / "disk/ground_truth/stain/000_mask.png", root / "disk/ground_truth/stain/007_mask.png")
    assert_one_line_error(run_main(root, tmp_path / "w"), "007_mask.png", "mask without an image", "3 masks for 2")


def test_mask_of_the_wrong_size(root, tmp_path):
    Image.new("L", (50, 64)).save(root / "disk/ground_truth/hole/001_mask.png")
    assert_one_line_error(run_main(root, tmp_path / "w"), "test/hole/001.png", "mask is 50x64 but its image is 64x64")


def test_size_not_multiple_of_32(root, tmp_path):
    assert_one_line_error(run_main(root, tmp_path / "w", "--config.image_size=100"), "image size 100x100", "multiple of 32")
    assert not (tmp_path / "w").exists()


def test_unknown_architecture(root, tmp_path):
    assert_one_line_error(run_main(root, tmp_path / "w", "--config.model.arch=resnet19"), "unknown architecture 'resnet19'")


def test_unknown_config_key(root, tmp_path):
    proc = run_main(root, tmp_path / "w", "--config.learnig_rate=0.1")
    assert proc.returncode != 0
    assert "learnig_rate" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_batch_size_not_dividing_devices(root, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = run_main(root, tmp_path / "w", "--config.batch_size=6", env=env)
    assert_one_line_error(proc, "config.batch_size=6", "4 devices")


def test_teacher_weights_of_the_wrong_architecture(root, tmp_path):
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    proc = run_main(root, tmp_path / "w", f"--config.model.teacher_weights={tmp_path / 'r34.pth'}")
    assert_one_line_error(proc, "r34.pth", "is this a resnet18 teacher file")
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_truncated_teacher_weights(root, tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    data = (tmp_path / "r18.pth").read_bytes()
    (tmp_path / "r18.pth").write_bytes(data[: len(data) // 2])
    proc = run_main(root, tmp_path / "w", f"--config.model.teacher_weights={tmp_path / 'r18.pth'}")
    assert_one_line_error(proc, "r18.pth", "cannot read weights")


def test_write_protected_workdir(root, tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits: a regular file where the workdir should be is
        # refused by the OS for every user.
        (tmp_path / "w").write_text("")
        target = tmp_path / "w" / "run"
    else:
        (tmp_path / "w").mkdir()
        (tmp_path / "w").chmod(0o500)
        target = tmp_path / "w"
    assert_one_line_error(run_main(root, target), str(target), "not writable")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_image_kinds_that_are_not_errors(root, tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    good = root / "disk/train/good"
    variants = {
        "gray.png": rgb.convert("L"),
        "rgba.png": rgb.convert("RGBA"),
        "palette.png": rgb.convert("P"),
        "sixteen.png": Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)),
        "photo.jpg": rgb,
        "bitmap.bmp": rgb,
        "UPPER.PNG": rgb,
        "UPPER.JPEG": rgb,
    }
    for name, img in variants.items():
        fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP"}[name.rsplit(".", 1)[1].lower()]
        (good / name).write_bytes(_encode(img, fmt))
    builder = mvtec.prepare(root, "disk", tmp_path / "tfds")
    train = mvtec.load_split(builder, "train", 32)
    assert len(train) == 4 + len(variants)
    assert train.images.shape[1:] == (32, 32, 3)
    gray = train.images[train.filenames.index("good/gray.png")]
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])  # grayscale -> 3 equal channels
    sixteen = train.images[train.filenames.index("good/sixteen.png")]
    np.testing.assert_array_equal(sixteen, gray)  # 16-bit scaled to the same 8-bit image


def test_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    import shutil as shutil_module

    import jax

    from rdjax import train
    from rdjax.models import RD4AD

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage._replace(free=1 << 20))
    student = jax.eval_shape(lambda: RD4AD("resnet18").init(jax.random.key(0), 32))[1]
    with pytest.raises(OSError, match=r"only 1 MiB free, a checkpoint needs about \d+ MiB"):
        train.check_workdir(tmp_path / "w", student)
