"""Configs: found by name or path, shipped with the package, and the registries they name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rdjax import config as config_lib
from rdjax import evaluators as evaluators_lib
from rdjax import registry
from rdjax.errors import ConfigError
from rdjax.models.rd4ad import RD4AD
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
    model = RD4AD()
    rerun = config_lib.for_workdir(config_lib.defaults(), old, model)
    assert rerun.drop_last is True and config_lib.check_rerun(tmp_path, old, rerun, evaluating=False, model=model) == []
    assert config_lib.for_workdir(config_lib.defaults(), None, model).drop_last is False
    explicit = config_lib.defaults()
    explicit.drop_last = False
    with pytest.raises(ConfigError, match="config.drop_last=False, but .* was trained with True"):
        config_lib.check_rerun(tmp_path, old, config_lib.for_workdir(explicit, old, model), False, model)


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
    same = config_lib.check_rerun("W", saved, saved.copy_and_resolve_references(), evaluating=False, model=RD4AD())
    assert same == []

    def changed(key: str, value, evaluating: bool) -> list[str]:
        config = saved.copy_and_resolve_references()
        node, *path = [config, *key.split(".")]
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        return config_lib.check_rerun("W", saved, config, evaluating, RD4AD())

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
    assert len(config_lib.check_rerun("W", ported, saved, evaluating=True, model=RD4AD())) == 2


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
        config_lib.check_rerun("W", saved, config, evaluating=False, model=RD4AD())
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


def _v070(model: dict, **keys) -> dict:
    """A config.json in 0.7.0's layout: every model's options in a section of its name,
    the map keys explicit (their defaults then RD4AD's recipe)."""
    saved = config_lib.defaults().to_dict()
    saved.update(map_mode="add", blur_sigma=4.0, blur_kernel=0, map_size=0, max_ratio=0.0, drop_last=False)
    saved["model"] = model
    saved["rdpp"] = {"proj_lr": 0.001, "accumulation": 2}
    saved["dinomaly"] = {"final_lr": 2e-4, "warmup_steps": 100, "eps": 1e-10, "weight_decay": 1e-4, "clip": 0.1}
    saved.update(keys)
    return saved


def test_a_070_workdir_reads_its_model_sections_as_the_models_options(tmp_path):
    """0.7.0's config.dinomaly and config.rdpp: the workdir's model's section becomes its
    options in config.model, the other goes; its map keys stay as written, and a rerun of
    its own (migrated) config builds the model with those options."""
    import json

    from rdjax.runtime import workdir as workdir_lib

    dinomaly = {"name": "dinomaly", "arch": "vit_tiny14_reg4", "teacher_weights": "none"}
    saved = _v070(dinomaly, map_mode="mean", blur_kernel=5, max_ratio=0.01, image_size=112)
    saved["dinomaly"]["warmup_steps"] = 20
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = workdir_lib.load_config(tmp_path)
    assert "dinomaly" not in config and "rdpp" not in config
    assert config.model.warmup_steps == 20 and config.model.eps == 1e-10 and "proj_lr" not in config.model
    assert (config.map_mode, config.blur_kernel, config.map_size, config.max_ratio) == ("mean", 5, 0, 0.01)
    model = registry.build_model(config)
    assert (model.warmup_steps, model.clip) == (20, 0.1)
    assert config_lib.check_rerun(tmp_path, config, config_lib.for_workdir(config, config, model), False, model) == []
    rdpp = config_lib.from_dict(_v070({"name": "rdpp", "arch": "resnet18"}, rdpp={"proj_lr": 0.002, "accumulation": 3}))
    assert (rdpp.model.proj_lr, rdpp.model.accumulation) == (0.002, 3) and "final_lr" not in rdpp.model
    rd4ad = config_lib.from_dict(_v070({"name": "rd4ad", "arch": "resnet18"}))
    assert set(rd4ad.model) == {"name", "arch", "teacher_weights"} and rd4ad.map_size == 0
    before_maps = config_lib.defaults().to_dict()
    for key in config_lib.MAP_KEYS:
        del before_maps[key]
    assert config_lib.from_dict(before_maps).map_mode == "add"  # written before a map key existed


def test_the_map_keys_left_unset_are_the_models_recipe():
    """`--config=mvtec --config.model.name=dinomaly` scores with Dinomaly's recipe, not
    RD4AD's; a key the config sets is kept; a trained workdir's recipe is its own; the
    resolved recipe is checked."""
    from rdjax.models import MapRecipe
    from rdjax.models.dinomaly import Dinomaly

    config = config_lib.shipped_config("mvtec")
    assert MapRecipe.of(config_lib.for_workdir(config, None, registry.build_model(config))) == RD4AD.map_recipe
    config.model.name, config.model.arch, config.image_size = "dinomaly", "vit_tiny14_reg4", 392
    model = registry.build_model(config)
    resolved = config_lib.for_workdir(config, None, model)
    assert MapRecipe.of(resolved) == Dinomaly.map_recipe == MapRecipe("mean", 4.0, 5, 256, 0.01)
    assert config_lib.from_dict(resolved.to_dict()).map_size == 256  # recorded in config.json
    config.map_size = 0
    assert MapRecipe.of(config_lib.for_workdir(config, None, model)).size == 0
    config.map_size = None
    assert config_lib.for_workdir(config, config_lib.from_dict(_v070({})), model).map_mode == "add"
    config.resize.mode = "tile"
    with pytest.raises(ConfigError, match="config.map_size=256 resizes them"):
        config_lib.for_workdir(config, None, model)


def test_a_model_checks_its_own_options():
    """config.model's keys beyond name, arch and teacher_weights are the model's options:
    out of range or unknown, one line names them."""
    config = config_lib.shipped_config("dinomaly_synthetic")
    assert registry.build_model(config).warmup_steps == 20
    config.model.clip = 0.0
    with pytest.raises(ConfigError, match="config.model: .* clip > 0"):
        registry.build_model(config)
    config = config_lib.shipped_config("rdpp_synthetic")
    config.model.accumulation = 0
    with pytest.raises(ConfigError, match="config.model.accumulation=0 must be >= 1"):
        registry.build_model(config)
    config = config_lib.shipped_config("synthetic")
    config.model.warmup_steps = 5
    with pytest.raises(
        ConfigError, match="config.model.warmup_steps: not an option of model 'rd4ad' \\(it has none\\)"
    ):
        registry.build_model(config)


def test_a_models_rerun_options_may_change():
    """Dinomaly's final_lr and warmup_steps are schedule keys a rerun may change; its
    eps may not; RD++'s accumulation only an evaluation may."""
    saved = config_lib.shipped_config("dinomaly_synthetic")
    model = registry.build_model(saved)
    config = saved.copy_and_resolve_references()
    config.model.warmup_steps, config.model.final_lr = 10, 1e-4
    assert len(config_lib.check_rerun("W", saved, config, False, model)) == 2
    config.model.eps = 1e-8
    with pytest.raises(ConfigError, match=r"^config\.model\.eps=1e-08, but W was trained with 1e-10"):
        config_lib.check_rerun("W", saved, config, False, model)
    saved = config_lib.shipped_config("rdpp_synthetic")
    config = saved.copy_and_resolve_references()
    config.model.accumulation = 4
    with pytest.raises(ConfigError, match="config.model.accumulation=4"):
        config_lib.check_rerun("W", saved, config, False, registry.build_model(saved))
    assert len(config_lib.check_rerun("W", saved, config, True, registry.build_model(saved))) == 1


def test_port_teacher_finds_the_model_by_its_archs():
    from rdjax.models.dinomaly import Dinomaly

    assert registry.model_for_arch("dinov2_vits14") is Dinomaly and registry.model_for_arch("resnet18") is RD4AD
    with pytest.raises(ConfigError, match="unknown architecture 'vgg16'; choose one of"):
        registry.model_for_arch("vgg16")
