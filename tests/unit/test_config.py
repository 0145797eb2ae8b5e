"""Configs: found by name or path, shipped with the package, and the registries they name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rdjax import config as config_lib
from rdjax import evaluators as evaluators_lib
from rdjax import registry
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
    with pytest.raises(ConfigError, match="nope: no shipped config of that name"):
        config_lib.resolve("nope")
    with pytest.raises(ConfigError, match="nope.py: no such config file"):
        config_lib.resolve("nope.py")


def test_every_shipped_config_passes_the_checks():
    for name in config_lib.shipped():
        config = _load(config_lib.resolve(name))
        config_lib.check(config, device_count=1)
        registry.check(config)
        assert config.model.name in MODELS.names() and config.dataset.name in DATASETS.names()
        assert {s.get("type", n) for n, s in config.evals.items()} <= set(EVALUATORS.names())


def test_saved_configs_take_defaults_for_new_keys():
    config = config_lib.from_dict({"model": {"arch": "resnet18"}, "num_epochs": 3})
    assert config.model.arch == "resnet18" and config.num_epochs == 3
    assert config.model.name == "rd4ad" and config.model.teacher_weights == "imagenet"
    assert config.evals.to_dict() == config_lib.defaults().evals.to_dict()


def test_workdirs_before_the_official_epoch_resume_with_full_batches(tmp_path):
    """A workdir written before config.drop_last (and config.input) trained full batches
    only: it reads as drop_last=True, and a rerun of the same config file resolves to
    that, so the rerun check lets it resume and its steps per epoch (and where a resume
    lands) stay as they were. A new workdir keeps the last partial batch, as the official
    DataLoader; an explicit setting that contradicts the workdir is refused."""
    saved = config_lib.defaults().to_dict()
    del saved["drop_last"], saved["input"]
    old = config_lib.from_dict(saved)
    assert old.drop_last is True and config_lib.from_dict({"drop_last": False}).drop_last is False
    rerun = config_lib.for_workdir(config_lib.defaults(), old, "pil_bilinear")
    assert rerun.drop_last is True and config_lib.check_rerun(tmp_path, old, rerun, evaluating=False) == []
    assert config_lib.for_workdir(config_lib.defaults(), None, "pil_bilinear").drop_last is False
    explicit = config_lib.defaults()
    explicit.drop_last = False
    with pytest.raises(ConfigError, match="config.drop_last=False, but .* was trained with True"):
        config_lib.check_rerun(tmp_path, old, config_lib.for_workdir(explicit, old, "pil_bilinear"), evaluating=False)


def test_old_evaluator_tuples_become_evals():
    """0.2.0 workdirs name their evaluators in a tuple: the same evaluators, in the same
    order, with report drawing calibration's threshold only where calibration ran."""
    config = config_lib.from_dict({"evaluators": ["anomaly", "report"]})
    assert list(config.evals) == ["anomaly", "report"] and "threshold_from" not in config.evals.report
    config = config_lib.from_dict({"evaluators": ["anomaly", "calibration", "report"]})
    assert list(config.evals) == ["anomaly", "calibration", "report"]
    assert config.evals.report.threshold_from == "calibration" and "evaluators" not in config


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
    bad.threshold.method, bad.threshold.validation_size = "quantile", 0
    with pytest.raises(ConfigError, match="validation_size > 0"):
        config_lib.check(bad, 1)
    bad = config.copy_and_resolve_references()
    bad.resize.mode = "crop"
    with pytest.raises(ConfigError, match="config.resize.mode='crop'"):
        config_lib.check(bad, 1)
    for keys, message in (  # Dinomaly's recipe and schedule keys
        ({"total_steps": -1}, "config.total_steps=-1"),
        ({"map_size": -2}, "config.map_size=-2"),
        ({"blur_kernel": 4}, "config.blur_kernel=4 0 or an odd size"),
        ({"map_size": 128, "resize.mode": "tile"}, "config.map_size=128 resizes them"),
        ({"input.mask_threshold": 1.0}, r"config.input.mask_threshold=1.0 must be in \[0, 1\)"),
        ({"dinomaly.clip": 0.0}, "config.dinomaly: .* clip > 0"),
    ):
        bad = config.copy_and_resolve_references()
        for key, value in keys.items():
            node, *rest = key.split(".")
            if rest:
                bad[node][rest[0]] = value
            else:
                bad[node] = value
        with pytest.raises(ConfigError, match=message):
            config_lib.check(bad, 1)


def test_registry_finds_modules_by_name_and_takes_registrations(tmp_path, monkeypatch):
    """A package of plug-in modules: each module exporting the attribute is an entry under
    its own name, found without any list; a module without it is not; `register` adds an
    entry from elsewhere, and refuses a name twice."""
    package = tmp_path / "widgets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "round.py").write_text("WIDGET = 'a round widget'\n")
    (package / "helpers.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry = Registry("widget", "widgets", "WIDGET")
    assert reg.get("round") == "a round widget"
    reg.register("square", "a square widget")
    assert reg.names() == ["round", "square"]
    with pytest.raises(ValueError, match="widget 'round' is registered twice"):
        reg.register("round", "another")
    with pytest.raises(ConfigError, match="unknown widget 'helpers'; choose one of round, square"):
        reg.get("helpers")


def test_evals_run_after_what_they_need_and_check_their_settings():
    """An evaluator runs after the ones its settings name, whatever the written (or
    ml_collections' sorted) order; unknown settings, needs that name nothing, cycles and a
    config without the metrics fail before any work; a cadence brings what it needs."""
    evals = config_lib.defaults().evals.to_dict()
    written = {"report": evals["report"], "calibration": evals["calibration"], "anomaly": evals["anomaly"]}
    built = evaluators_lib.build(written, EVALUATORS.get)
    assert list(built).index("report") > max(list(built).index("anomaly"), list(built).index("calibration"))
    renamed = {"z_metrics": {"type": "anomaly"}, "report": {"type": "report", "metrics_from": "z_metrics"}}
    assert list(evaluators_lib.build(renamed, EVALUATORS.get)) == ["z_metrics", "report"]
    with pytest.raises(ConfigError, match="config.evals.report needs 'metrics', which is not another entry"):
        evaluators_lib.build({"report": {"type": "report", "metrics_from": "metrics"}}, EVALUATORS.get)
    with pytest.raises(ConfigError, match="more than one evaluator of type 'report'"):
        evaluators_lib.build({"a": {"type": "report"}, "b": {"type": "report"}}, EVALUATORS.get)

    class Needs:  # a plug-in evaluator that needs another
        def __init__(self, other: str) -> None:
            self.needs = (other,)

    kinds = {"x": Needs, "y": Needs}
    with pytest.raises(ConfigError, match="a cycle of needs among"):
        evaluators_lib.build({"a": {"type": "x", "other": "b"}, "b": {"type": "y", "other": "a"}}, kinds.__getitem__)
    with pytest.raises(ConfigError, match=r"config.evals.anomaly: .*colour"):
        evaluators_lib.build({"anomaly": {"type": "anomaly", "colour": "red"}}, EVALUATORS.get)
    config = config_lib.defaults()
    bad = config.copy_and_resolve_references()
    bad.evals.report.type = "roc"
    with pytest.raises(ConfigError, match="unknown evaluator 'roc'"):
        registry.check(bad)
    bad = config.copy_and_resolve_references()
    with bad.unlocked():
        bad.evals = {"calibration": {"type": "calibration"}}
    with pytest.raises(ConfigError, match="config.evals has no 'anomaly' evaluator"):
        registry.check(bad)
    bad = config.copy_and_resolve_references()
    bad.evals.report.every = -1
    with pytest.raises(ConfigError, match="config.evals.report"):
        config_lib.check(bad, 1)
    cadence = {"anomaly": {"every": 4}, "calibration": {"every": 0}, "report": {"every": 3}}
    order = evaluators_lib.build(config.evals, EVALUATORS.get)
    assert evaluators_lib.due(cadence, order, 4, 2, False) == ["anomaly", "calibration"]
    assert evaluators_lib.due(cadence, order, 3, 2, False) == ["anomaly", "calibration", "report"]  # what report needs
    assert evaluators_lib.due(cadence, order, 5, 2, False) == []
    assert evaluators_lib.due(cadence, order, 5, 2, True) == ["anomaly", "calibration", "report"]


def test_a_config_file_with_the_old_evaluators_key_is_refused():
    config = config_lib.defaults()
    with config.unlocked():
        config.evaluators = ("anomaly",)
    with pytest.raises(ConfigError, match="config.evaluators was replaced by config.evals"):
        config_lib.check(config, 1)


def test_check_rerun_names_the_key_and_what_each_command_may_change():
    """Training on may change the schedule only; an evaluation also what it records in
    calibration.json and what only training reads; a ported workdir's dataset ('') is
    named by its first evaluation."""
    saved = config_lib.defaults()
    same = config_lib.check_rerun("W", saved, saved.copy_and_resolve_references(), evaluating=False)
    assert same == []

    def changed(key: str, value, evaluating: bool) -> list[str]:
        config = saved.copy_and_resolve_references()
        node, *path = [config, *key.split(".")]
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        return config_lib.check_rerun("W", saved, config, evaluating)

    assert changed("num_epochs", 300, evaluating=False) == ["config.num_epochs=300 (the workdir's config.json has 200)"]
    for key, value in [("image_size", 128), ("model.arch", "resnet18"), ("dataset.category", "cable"),
                       ("blur_sigma", 2.0), ("threshold.validation_size", 3), ("dtype", "bfloat16")]:  # fmt: skip
        for evaluating in (False, True):
            with pytest.raises(ConfigError, match=rf"^config\.{key}=.*, but W was trained with"):
                changed(key, value, evaluating)
    for key, value in [("resize.mode", "fit"), ("threshold.method", "f1"), ("batch_size", 4)]:
        with pytest.raises(ConfigError, match=rf"config\.{key}="):
            changed(key, value, evaluating=False)
        assert len(changed(key, value, evaluating=True)) == 1
    ported = saved.copy_and_resolve_references()
    ported.dataset.name = ported.dataset.category = ""
    assert len(config_lib.check_rerun("W", ported, saved, evaluating=True)) == 2


def test_every_package_is_installed_and_configs_resolve_from_a_source_tree(tmp_path):
    """pyproject.toml lists every package folder (a non-editable install once lacked
    rdjax.evaluators), and a source tree without rdjax/configs, as a clone's root is
    for `python -m rdjax.main` after a non-editable install, takes its configs/ as
    rdjax.configs (rdjax/__init__.py)."""
    import shutil
    import subprocess
    import sys

    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "rdjax").rglob("__init__.py")}
    assert listed == found | {"rdjax.configs"}
    shutil.copytree(ROOT / "rdjax", tmp_path / "rdjax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", tmp_path / "configs", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import rdjax.configs.synthetic as s; print(s.__file__); print(s.get_config().dataset.name)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(tmp_path / "configs" / "synthetic.py"), "synthetic"]


def test_a_refusal_names_every_key_that_blocks_the_model_first():
    """The issue's case: a model change beside a batch-size change was reported as the
    batch size alone. Every blocking key is named, model.name and model.arch first, and
    keys a rerun may change stay notes."""
    saved = config_lib.defaults()
    config = saved.copy_and_resolve_references()
    config.batch_size, config.model.arch, config.model.name, config.num_epochs = 8, "resnet18", "rdpp", 300
    with pytest.raises(ConfigError) as info:
        config_lib.check_rerun("W", saved, config, evaluating=False)
    assert str(info.value) == (
        "config.model.name='rdpp', but W was trained with 'rd4ad' (and config.model.arch='resnet18', not "
        "'wide_resnet50_2'; config.batch_size=8, not 16): a rerun may not change them (use a new --workdir, or "
        "leave the keys as they were)"
    )


def test_an_evaluation_takes_the_workdirs_settings_and_only_the_flags_given():
    """`rdjax eval --config=mvtec` on a workdir trained otherwise: a key the file sets but
    the user did not give takes the workdir's value (named as unused); one the user gave
    keeps its value, for check_rerun to judge; the workdir's empty keys take the file's."""
    saved = config_lib.defaults()
    saved.model.arch, saved.image_size, saved.dataset.root, saved.dataset.category = "resnet18", 64, "", ""
    file = config_lib.defaults()
    file.dataset.root, file.eval_batch_size, file.resize.mode = "/data", 4, "fit"
    config, unused = config_lib.for_evaluation(file, saved, {"dataset.root", "eval_batch_size"})
    assert (config.model.arch, config.image_size, config.resize.mode) == ("resnet18", 64, "squeeze")
    assert (config.dataset.root, config.dataset.category, config.eval_batch_size) == ("/data", "bottle", 4)
    assert unused == ["model.arch", "image_size", "resize.mode"]


def test_the_parent_of_a_list_of_categories_evaluates_those_it_holds(tmp_path):
    from rdjax.runtime import workdir as workdir_lib

    for category in ("disk", "rust"):
        workdir_lib.save_config(tmp_path / category, config_lib.defaults())
    assert workdir_lib.saved_config(tmp_path).dataset.category == "disk,rust"
