"""The command line: each bad input is one `error:` line naming the file or key, exit
status 1, and nothing half-written. Runs in-process (rdjax.cli.invoke); the subprocess
runs of the documented commands are in the slow tier (test_train.py)."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from rdjax import config as config_lib
from rdjax.data import index, mvtec
from rdjax.data.preprocess import Recipe
from rdjax.errors import ConfigError, WorkdirError
from rdjax.runtime import disk

from conftest import data_flags, rdjax_cli


@pytest.fixture
def root(synthetic_data, tmp_path):
    """A private copy of a tiny dataset, for tests that break it."""
    copy = tmp_path / "data"
    shutil.copytree(
        synthetic_data(num_train=8, num_test_good=2, num_per_defect=2), copy, ignore=shutil.ignore_patterns("_tfds")
    )
    return copy


def train_error(root, workdir, *extra: str) -> str:
    result = rdjax_cli("train", f"--workdir={workdir}", *data_flags(root), "--config.dataset.name=mvtec", *extra)
    return result.error_line()


def test_missing_root(tmp_path):
    assert "does not exist" in train_error(tmp_path / "nowhere", tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_missing_category_lists_what_exists(root, tmp_path):
    error = train_error(root, tmp_path / "w", "--config.dataset.category=bottle")
    assert "bottle" in error and "no such category" in error and "found: disk" in error
    assert not (tmp_path / "w").exists()


def test_empty_train_folder(root, tmp_path):
    for p in (root / "disk/train/good").iterdir():
        p.unlink()
    (root / "disk/train/good/notes.txt").write_text("not an image")
    error = train_error(root, tmp_path / "w")
    assert "train/good" in error and "no training images" in error


def test_truncated_image(root, tmp_path):
    path = root / "disk/train/good/001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    error = train_error(root, tmp_path / "w")
    assert "train/good/001.png" in error and "not a readable image" in error
    assert not (tmp_path / "w").exists()


def test_file_that_is_not_an_image(root, tmp_path):
    (root / "disk/test/hole/000.png").write_text("this is text")
    error = train_error(root, tmp_path / "w")
    assert "test/hole/000.png" in error and "not a readable image" in error


def test_missing_masks(root, tmp_path):
    (root / "disk/ground_truth/scratch/001_mask.png").unlink()
    error = train_error(root, tmp_path / "w")
    assert "ground_truth/scratch" in error and "no mask for 1 of 2" in error and "001_mask.png" in error


def test_more_masks_than_images(root, tmp_path):
    shutil.copy(root / "disk/ground_truth/stain/000_mask.png", root / "disk/ground_truth/stain/007_mask.png")
    error = train_error(root, tmp_path / "w")
    assert "007_mask.png" in error and "mask without an image" in error and "3 masks for 2" in error


def test_mask_of_the_wrong_size(root, tmp_path):
    Image.new("L", (50, 64)).save(root / "disk/ground_truth/hole/001_mask.png")
    error = train_error(root, tmp_path / "w")
    assert "test/hole/001.png" in error and "mask is 50x64 but its image is 64x64" in error


def test_size_not_multiple_of_32(root, tmp_path):
    error = train_error(root, tmp_path / "w", "--config.image_size=100")
    assert "image size 100x100" in error and "multiple of 32" in error
    assert not (tmp_path / "w").exists()


def test_unknown_architecture_model_dataset_and_evaluator(root, tmp_path):
    assert "unknown architecture 'resnet19'" in train_error(root, tmp_path / "w", "--config.model.arch=resnet19")
    assert "unknown model 'rd5'" in train_error(root, tmp_path / "w", "--config.model.name=rd5")
    assert "unknown dataset 'mvtech'" in train_error(root, tmp_path / "w", "--config.dataset.name=mvtech")
    assert "unknown evaluator 'roc'" in train_error(root, tmp_path / "w", "--config.evals.report.type=roc")
    assert not (tmp_path / "w").exists()


def test_misspelt_config_key_file_and_flag(root, tmp_path):
    error = train_error(root, tmp_path / "w", "--config.num_epoch=2")
    assert "unknown config key 'num_epoch'" in error and 'Did you mean "num_epochs"' in error
    error = train_error(root, tmp_path / "w", "--config.model.proj_lr=0.002")  # RD++'s option on an RD4AD config
    assert "'model.proj_lr' in this config: it is an option of model 'rdpp'" in error and "--config=rdpp_mvtec" in error
    error = rdjax_cli("train", "--config=configs/mvtek.py", f"--workdir={tmp_path / 'w'}").error_line()
    assert "configs/mvtek.py: no such config file" in error and "mvtec" in error
    assert "unknown flag --workdr" in rdjax_cli("train", "--config=mvtec", f"--workdr={tmp_path}").error_line()
    assert "--workdir must have a value" in rdjax_cli("train", "--config=mvtec").error_line()
    assert "invalid literal for int()" in train_error(root, tmp_path / "w", "--config.num_epochs=many")
    assert "unknown command 'trian'" in rdjax_cli("trian").error_line()
    assert not (tmp_path / "w").exists()


def test_eval_of_a_wrong_workdir_creates_nothing(root, tmp_path):
    result = rdjax_cli("eval", f"--workdir={tmp_path / 'w'}", *data_flags(root))
    assert "no checkpoint to evaluate" in result.error_line()
    assert not (tmp_path / "w").exists()


def test_output_paths_that_cannot_be_written(root, tmp_path):
    (tmp_path / "file").write_text("")
    error = rdjax_cli(
        "predict", f"--workdir={tmp_path}", f"--input={root}", f"--output={tmp_path / 'file'}"
    ).error_line()
    assert "exists and is not a folder" in error
    error = rdjax_cli("export", f"--workdir={tmp_path}", f"--out={tmp_path / 'no' / 'm.jaxexport'}").error_line()
    assert "no such folder for --out" in error
    assert not (tmp_path / "no").exists()


def test_teacher_weights_of_the_wrong_architecture(root, tmp_path):
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    error = train_error(root, tmp_path / "w", f"--config.model.teacher_weights={tmp_path / 'r34.pth'}")
    assert "r34.pth" in error and "is this a resnet18 teacher file" in error
    assert not (tmp_path / "w").exists()


def test_truncated_teacher_weights(root, tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    data = (tmp_path / "r18.pth").read_bytes()
    (tmp_path / "r18.pth").write_bytes(data[: len(data) // 2])
    error = train_error(root, tmp_path / "w", f"--config.model.teacher_weights={tmp_path / 'r18.pth'}")
    assert "r18.pth" in error and "cannot read weights" in error


@pytest.mark.slow  # the fast tier's 3-minute budget (docs/testing.md)
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
    error = train_error(root, target)
    assert str(target) in error and "not writable" in error


def test_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1 << 20))
    with pytest.raises(WorkdirError, match=r"only 1 MiB free, a checkpoint needs about 12 MiB"):
        disk.check_writable(tmp_path / "w", 12 << 21)


def test_batch_size_must_divide_over_the_devices():
    config = config_lib.defaults()
    config.batch_size = 6
    with pytest.raises(ConfigError, match="config.batch_size=6 does not divide evenly over 4 devices"):
        config_lib.check(config, device_count=4)
    config_lib.check(config, device_count=3)


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
        "sixteen.png": Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257),
        "photo.jpg": rgb,
        "bitmap.bmp": rgb,
        "UPPER.PNG": rgb,
        "UPPER.JPEG": rgb,
    }
    for name, img in variants.items():
        fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP"}[name.rsplit(".", 1)[1].lower()]
        (good / name).write_bytes(_encode(img, fmt))
    builder = index.prepare(root, "disk", tmp_path / "tfds", mvtec.scan_category(root, "disk"))
    train = index.load_split(builder, "train", Recipe(size=32), root)
    assert len(train) == 8 + len(variants)
    assert train.images().shape[1:] == (32, 32, 3)
    gray = train.images()[train.filenames.index("good/gray.png")]
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])  # grayscale -> 3 equal channels
    sixteen = train.images()[train.filenames.index("good/sixteen.png")]
    np.testing.assert_array_equal(sixteen, gray)  # 16-bit scaled to the same 8-bit image


def test_help_lists_the_commands_and_flags(capsys):
    assert rdjax_cli("--help").code == 0
    result = rdjax_cli("train", "--help")
    assert result.code == 0 and "--config" in result.stdout and "--workdir" in result.stdout


def test_only_user_errors_become_one_line(root, tmp_path, monkeypatch):
    """rdjax's own errors and file-system errors naming a path are one line; any other
    exception (a bug in rdjax or a library) keeps its traceback."""
    from rdjax.train import loop as train

    def boom(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(train, "run", boom)
    with pytest.raises(ValueError, match="an internal bug"):
        rdjax_cli("train", f"--workdir={tmp_path / 'w'}", *data_flags(root))

    def missing(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "gone.png"))

    monkeypatch.setattr(train, "run", missing)
    error = rdjax_cli("train", f"--workdir={tmp_path / 'w'}", *data_flags(root)).error_line()
    assert error == f"error: {tmp_path / 'gone.png'}: No such file or directory"

    def nameless(*args, **kwargs):
        raise OSError("a socket failed")

    monkeypatch.setattr(train, "run", nameless)
    with pytest.raises(OSError, match="a socket failed"):
        rdjax_cli("train", f"--workdir={tmp_path / 'w'}", *data_flags(root))


def test_a_config_files_own_exception_is_reported_as_such(tmp_path):
    """An AttributeError or KeyError raised by the config file's code is the file's, not
    an unknown key: the line names the file, its line and the exception."""
    for kind in ("KeyError", "AttributeError"):
        path = tmp_path / f"bad_{kind}.py"
        path.write_text(f"def get_config():\n    raise {kind}('no such thing')\n")
        for spelling in ([f"--config={path}"], ["--config", str(path)]):
            error = rdjax_cli("train", *spelling, f"--workdir={tmp_path / 'w'}").error_line()
            assert f"{path}:2: the config file raised {kind}" in error and "no such thing" in error
            assert "unknown config key" not in error


def test_offline_refuses_every_download(synthetic_data, tmp_path, monkeypatch):
    """RDJAX_OFFLINE=1 and config.offline: an ImageNet teacher missing from the cache is
    a one-line error naming the file and where to place it, before any connection."""
    monkeypatch.setenv("RDJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RDJAX_WEIGHTS_BASE_URL", "http://192.0.2.1/")  # TEST-NET-1: would hang, not refuse
    flags = [*data_flags(synthetic_data()), "--config.model.teacher_weights=imagenet"]
    error = rdjax_cli("train", f"--workdir={tmp_path / 'a'}", *flags, "--config.offline=True").error_line()
    assert "offline" in error and f"place it at {tmp_path / 'cache' / 'resnet18-f37072fd.pth'}" in error
    monkeypatch.setenv("RDJAX_OFFLINE", "1")
    error = rdjax_cli("port", "teacher", "--arch=resnet18", "--src=imagenet", f"--out={tmp_path / 't'}").error_line()
    assert "offline" in error and "resnet18-f37072fd.pth" in error
    assert not (tmp_path / "t").exists() and not (tmp_path / "cache").exists()
    flags = ["--config=mnist", f"--config.dataset.data_dir={tmp_path / 'tfds'}", "--config.dataset.normal_class=3"]
    error = rdjax_cli("train", f"--workdir={tmp_path / 'm'}", *flags).error_line()
    assert "offline (RDJAX_OFFLINE=1): mnist is not prepared in" in error and str(tmp_path / "tfds") in error


def test_the_xla_cache_has_a_switch_a_place_and_a_bound(monkeypatch, tmp_path):
    import jax

    from rdjax.runtime import xla_cache

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("RDJAX_XLA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert xla_cache.default_compilation_cache() == str(tmp_path / "rdjax" / "xla")
    monkeypatch.setenv("RDJAX_XLA_CACHE", "0")
    assert xla_cache.default_compilation_cache() == ""
    monkeypatch.setenv("RDJAX_XLA_CACHE", str(tmp_path / "x"))
    assert xla_cache.default_compilation_cache() == str(tmp_path / "x")
    cache = tmp_path / "x"
    cache.mkdir()
    for age, name in enumerate(("old", "middle", "new")):  # 4 KiB each, oldest first
        (cache / name).write_bytes(bytes(4096))
        os.utime(cache / name, (1_000_000 + age, 1_000_000 + age))
    xla_cache.prune_cache(cache, 8192)
    assert sorted(p.name for p in cache.iterdir()) == ["middle", "new"]
    keys = ("jax_compilation_cache_dir", "jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")  # fmt: skip
    before = {key: getattr(jax.config, key) for key in keys}
    try:
        xla_cache.use_compilation_cache(str(cache))
        assert jax.config.jax_compilation_cache_dir == str(cache)
        xla_cache.use_compilation_cache("")
        assert jax.config.jax_enable_compilation_cache is False
    finally:
        for key, value in before.items():
            jax.config.update(key, value)


def test_python_dash_m_rdjax_is_the_rdjax_command():
    import subprocess
    import sys

    from rdjax import cli

    out = subprocess.run([sys.executable, "-m", "rdjax", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: rdjax COMMAND [--verbose]")
    assert all(f"\n  {name} " in out.stdout for name in cli.COMMANDS)
    out = subprocess.run([sys.executable, "-m", "rdjax", "nope"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("error: unknown command 'nope'")
