"""Configs: found by name or path, shipped with the package, and the registries they name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rdjax import config as config_lib
from rdjax.errors import ConfigError
from rdjax.registry import DATASETS, EVALUATORS, MODELS, Registry

from conftest import ROOT


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_every_config_ships_with_the_package_and_resolves_by_name_and_path(tmp_path, monkeypatch):
    in_repo = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.name.startswith("_"))
    assert config_lib.shipped() == in_repo
    monkeypatch.chdir(tmp_path)  # outside the repository
    for name in in_repo:
        by_name = config_lib.resolve(name)
        assert by_name.read_bytes() == (ROOT / "configs" / f"{name}.py").read_bytes()
        assert config_lib.resolve(f"configs/{name}.py") == by_name
        assert config_lib.resolve(f"{name}.py") == by_name
        _load(by_name)  # loads, with its base configs, from wherever it was installed
    mine = tmp_path / "mine.py"
    mine.write_text("from rdjax.configs import default\n\ndef get_config():\n    return default.get_config()\n")
    assert config_lib.resolve(str(mine)) == mine
    with pytest.raises(ConfigError, match="nope: no such config file"):
        config_lib.resolve("nope")


def test_every_shipped_config_passes_the_checks():
    for name in config_lib.shipped():
        config = _load(config_lib.resolve(name))
        config_lib.check(config, device_count=1)
        assert config.model.name in MODELS.names() and config.dataset.name in DATASETS.names()
        assert set(config.evaluators) <= set(EVALUATORS.names())


def test_mvtec_config_holds_the_papers_settings():
    """The official main.py's values (shared design notes)."""
    c = _load(config_lib.resolve("mvtec"))
    assert (c.model.arch, c.image_size, c.batch_size, c.num_epochs, c.learning_rate, c.adam_b1, c.adam_b2, c.seed) == (
        "wide_resnet50_2",
        256,
        16,
        200,
        0.005,
        0.5,
        0.999,
        111,
    )
    assert (c.map_mode, c.blur_sigma, c.eval_every) == ("add", 4.0, 10)


def test_saved_configs_take_defaults_for_new_keys():
    config = config_lib.from_dict({"model": {"arch": "resnet18"}, "num_epochs": 3})
    assert config.model.arch == "resnet18" and config.num_epochs == 3
    assert config.model.name == "rd4ad" and config.model.teacher_weights == "imagenet"
    assert tuple(config.evaluators) == ("anomaly", "calibration", "report")


def test_checks_name_the_key():
    config = config_lib.defaults()
    for key, value, message in (
        ("dtype", "float16", "config.dtype='float16'"),
        ("num_epochs", 0, "config.num_epochs=0"),
        ("map_mode", "max", "config.map_mode='max'"),
    ):
        bad = config.copy_and_resolve_references()
        bad[key] = value
        with pytest.raises(ConfigError, match=message):
            config_lib.check(bad, 1)
    bad = config.copy_and_resolve_references()
    bad.threshold.method = "quantile"
    with pytest.raises(ConfigError, match="validation_size >= 1"):
        config_lib.check(bad, 1)
    bad = config.copy_and_resolve_references()
    bad.resize.mode = "crop"
    with pytest.raises(ConfigError, match="config.resize.mode='crop'"):
        config_lib.check(bad, 1)


def test_registry_rejects_twice_and_lists_names():
    reg: Registry = Registry("widget")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a")(2)
    with pytest.raises(ConfigError, match="unknown widget 'b'; choose one of a"):
        reg.get("b")
