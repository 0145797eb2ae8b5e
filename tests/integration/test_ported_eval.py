"""Issue 33: decisions a line can rely on, for models trained elsewhere.

Official-format checkpoints (random weights, written by torch) of RD4AD, RD++ and
Dinomaly, ported with `rdjax port`, evaluate through the commands the README prints
(`rdjax eval --config=mvtec ...`, `python -m rdjax.main --config=configs/mvtec.py
--mode=eval ...`) and through the workdir's own config, and score what a torch re-run of
the official evaluation scores (tests/unit/train/test_train.py's and tests/reference/test_dinomaly_official.py's
references). A key the user gives that the weights depend on is refused in one line that
names every such key and the command that works; a missing dataset root, a category
list and the offline download say what to do.

The README's commands name no TFDS folder, so HOME points into the test's folder (TFDS
prepares under ~/tensorflow_datasets).
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from test_dinomaly_official import ARCH as VIT_ARCH
from test_dinomaly_official import CROP, SPEC
from test_dinomaly_official import _official_metrics as dinomaly_official_metrics

from rdjax import main
from rdjax.data import synthetic

import dinomaly_reference as ref
from conftest import randomize_batchnorm, rdjax_cli
from torch_reference import TorchDecoder, TorchMPL, TorchOCBE, official_evaluation, official_state_dict

SIZE = 64
# float32 rounding of the maps on either side (tests/unit/train/test_train.py, test_dinomaly_official.py)
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(autouse=True)
def _home(home, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(home))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """MVTec's layout, three categories: the synthetic weave and disk, and 'rust', a disk
    drawn from another seed (so a mixed-up category would show in the metrics)."""
    base = tmp_path_factory.mktemp("data")
    sizes = {"size": SIZE, "num_train": 4, "num_test_good": 3, "num_per_defect": 2}
    root = synthetic.generate(base / "root", categories=("weave", "disk"), **sizes)
    other = synthetic.generate(base / "other", categories=("disk",), seed=1, **sizes)
    (other / "disk").rename(root / "rust")
    return root


@pytest.fixture(scope="module")
def ported(tmp_path_factory) -> dict:
    """name -> (the ported workdir, never evaluated; the torch modules to re-run the
    official evaluation with)."""
    folder = tmp_path_factory.mktemp("ported")
    out = {}
    for name in ("rd4ad", "rdpp"):
        torch.manual_seed(11)
        teacher = torchvision.models.resnet18(weights=None)
        ocbe, decoder = TorchOCBE("resnet18"), TorchDecoder("resnet18")
        for seed, module in enumerate((teacher, ocbe, decoder), 1):
            randomize_batchnorm(module, seed)
        proj = TorchMPL(16) if name == "rdpp" else None
        checkpoint = official_state_dict(ocbe, decoder)
        if proj is not None:
            checkpoint["proj"] = proj.state_dict()
        for m in (teacher, ocbe, decoder, proj):
            if m is not None:
                m.eval()
        torch.save(teacher.state_dict(), folder / f"{name}_teacher.pth")
        torch.save(checkpoint, folder / f"{name}.pth")
        result = rdjax_cli(
            "port", name, "--arch=resnet18", f"--teacher={folder / f'{name}_teacher.pth'}",
            f"--src={folder / f'{name}.pth'}", f"--out={folder / name}", f"--image_size={SIZE}",
        )  # fmt: skip
        assert result.code == 0, result.stderr[-2000:]
        out[name] = (folder / name, (teacher, ocbe, decoder, proj))
    source = ref.timm_encoder(SPEC.dim, SPEC.depth, SPEC.heads, SPEC.pos_grid * 14)
    torch.manual_seed(3)
    vitill = ref.ViTill(source, SPEC.dim, SPEC.heads, SPEC.registers)
    torch.save(vitill.state_dict(), folder / "vitill.pth")
    vitill.encoder = ref.encoder_at(source, CROP, SPEC.pos_grid)
    vitill.eval()
    result = rdjax_cli(
        "port", "dinomaly", f"--arch={VIT_ARCH}", f"--src={folder / 'vitill.pth'}", f"--out={folder / 'dinomaly'}",
        f"--image_size={CROP}",
    )  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    out["dinomaly"] = (folder / "dinomaly", vitill)
    return out


def _copy(ported: dict, name: str, to: Path) -> Path:
    shutil.copytree(ported[name][0], to)
    return to


def _official(ported: dict, name: str, root: Path, category: str) -> tuple[float, float]:
    """(pixel AUROC, image AUROC) of the official RD4AD / RD++ evaluation."""
    teacher, ocbe, decoder, proj = ported[name][1]
    return official_evaluation(teacher, ocbe, decoder, root, category, SIZE, proj)


def _assert_official(metrics: dict, official: tuple[float, float]) -> None:
    pixel, image = official
    assert abs(metrics["pixel_auroc"] - pixel) <= TOLERANCE, (metrics["pixel_auroc"], pixel)
    assert abs(metrics["image_auroc"] - image) <= TOLERANCE, (metrics["image_auroc"], image)


# ----------------------------------------------------------------------------- the README's commands


@pytest.mark.slow
def test_the_readme_eval_of_ported_rd4ad_workdirs_over_a_list_of_categories(ported, root, tmp_path):
    """`rdjax eval --config=mvtec` over 'disk,rust' evaluates <workdir>/disk and
    <workdir>/rust (one table, a mean row; weave, which has no workdir, is not asked for)
    with each port's architecture, size and protocol: the file's defaults are named in a
    note, not refused. A flag that changes what the weights depend on is refused in one
    line naming every such key, model first, with a command that works: the workdir's
    own config, which evaluates to the same metrics bit for bit."""
    parent = tmp_path / "runs"
    for category in ("disk", "rust"):
        _copy(ported, "rd4ad", parent / category)
    result = rdjax_cli(
        "eval", "--config=mvtec", f"--workdir={parent}", f"--config.dataset.root={root}",
        "--config.dataset.category=disk,rust",
    )  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    assert (
        f"note: evaluating {parent} with its own settings (config.json); the config file's model.arch, "
        "image_size, threshold.method, threshold.validation_size are not used" in result.stdout
    )
    table = (parent / "results.md").read_text().splitlines()
    rows = [line.split("|")[1].strip() for line in table if line.startswith("| ")][1:]
    assert rows == ["disk", "rust", "**mean**"], table
    evaluated = {c: json.loads((parent / c / "metrics.json").read_text()) for c in ("disk", "rust")}
    for category, metrics in evaluated.items():
        _assert_official(metrics, _official(ported, "rd4ad", root, category))
        assert (metrics["arch"], metrics["epoch"], metrics["calibration"]["method"]) == ("resnet18", 0, "f1")
    mean = np.mean([m["image_auroc"] for m in evaluated.values()])
    assert [line for line in table if line.startswith("| **mean** |")][0].split("|")[
        2
    ].strip() == f"**{100 * mean:.1f}**"
    assert not (parent / "weave").exists()

    workdir = parent / "disk"
    data = [f"--config.dataset.root={root}", "--config.dataset.category=disk"]
    wrong = ["--config.image_size=128", "--config.model.arch=wide_resnet50_2"]
    error = rdjax_cli("eval", "--config=mvtec", f"--workdir={workdir}", *data, *wrong).error_line()
    command = f"rdjax eval --workdir={workdir} --config.dataset.root={root} --config.dataset.category=disk"
    assert error == (
        f"error: config.model.arch='wide_resnet50_2', but {workdir} was trained with 'resnet18' (and "
        f"config.image_size=128, not 64): an evaluation may not change them; leave out the flags: {command}"
    )
    (workdir / "metrics.json").unlink()
    result = rdjax_cli(*shlex.split(command)[1:])
    assert result.code == 0, result.stderr[-2000:]
    again = json.loads((workdir / "metrics.json").read_text())
    keys = ("image_auroc", "pixel_auroc", "aupro")
    assert {k: again[k] for k in keys} == {k: evaluated["disk"][k] for k in keys}


@pytest.mark.slow
def test_python_m_rdjax_main_mode_eval_evaluates_a_ported_rdpp(ported, root, tmp_path, monkeypatch):
    """The README's `python -m rdjax.main --config=configs/mvtec.py --mode=eval` (its
    main(), in this process, outside the repository), whose config names RD4AD at 256 px
    with held-out thresholds, evaluates the RD++ port as RD++ at its 64 px."""
    workdir = _copy(ported, "rdpp", tmp_path / "w")
    monkeypatch.chdir(tmp_path)
    argv = ["--config=configs/mvtec.py", "--mode=eval", f"--workdir={workdir}", f"--config.dataset.root={root}",
            "--config.dataset.category=rust"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        assert main.main(argv) == 0, err.getvalue()[-2000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert (metrics["model"], metrics["category"]) == ("rdpp", "rust")
    _assert_official(metrics, _official(ported, "rdpp", root, "rust"))


@pytest.mark.slow
def test_a_ported_dinomaly_evaluates_unified_on_a_list_of_categories(ported, root, tmp_path):
    """`rdjax eval --config=mvtec` (a per-category config) on the Dinomaly port evaluates
    it as its workdir says, one model over the categories named, each as the official
    evaluation scores it; a later evaluation over other categories is refused, since the
    global thresholds belong to these."""
    workdir = _copy(ported, "dinomaly", tmp_path / "w")
    flags = ["--config=mvtec", f"--workdir={workdir}", f"--config.dataset.root={root}"]
    result = rdjax_cli("eval", *flags, "--config.dataset.category=weave,rust")
    assert result.code == 0, result.stderr[-2000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert sorted(metrics["categories"]) == ["rust", "weave"]
    for category, ours in metrics["categories"].items():
        official, _ = dinomaly_official_metrics(root / category, ported["dinomaly"][1])
        for key, value in official.items():
            assert abs(ours[key] - value) <= TOLERANCE, (category, key, ours[key], value)
    assert sorted(json.loads((workdir / "calibration.json").read_text())["categories"]) == ["rust", "weave"]
    error = rdjax_cli("eval", *flags, "--config.dataset.category=all").error_line()
    assert error == (
        f"error: {workdir} was trained on the categories rust, weave, but this run has disk, rust, weave: "
        "use a new --workdir, or pass --config.dataset.category=rust,weave with the dataset's folders as they were"
    )


# ----------------------------------------------------------------------------- refusals


@pytest.mark.slow  # the ported workdir's fixture; the refusals themselves take a second
def test_a_rerun_names_every_key_it_refuses_the_model_first(ported, root, tmp_path):
    """Training the RD4AD port on with `--config=mvtec --config.model.name=rdpp` changes
    the model, and with it the file's architecture, size, teacher and protocol: one line
    names them all, the model's keys first, and nothing is written."""
    workdir = _copy(ported, "rd4ad", tmp_path / "w")
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    teacher = json.loads((workdir / "config.json").read_text())["model"]["teacher_weights"]
    result = rdjax_cli(
        "train", "--config=mvtec", f"--workdir={workdir}", f"--config.dataset.root={root}",
        "--config.dataset.category=disk", "--config.model.name=rdpp",
    )  # fmt: skip
    assert result.error_line() == (
        f"error: config.model.name='rdpp', but {workdir} was trained with 'rd4ad' (and "
        "config.model.arch='wide_resnet50_2', not 'resnet18'; config.image_size=256, not 64; "
        f"config.model.teacher_weights='imagenet', not '{teacher}'; config.threshold.method='quantile', not 'f1'; "
        "config.threshold.validation_size=0.1, not 0.0): a rerun may not change them (use a new --workdir or "
        "evaluate it with `rdjax eval`, or leave the keys as they were)"
    )
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


@pytest.mark.slow  # the ported workdir's fixture
def test_a_port_records_its_dataset_and_an_empty_one_says_which_flag(ported, root, tmp_path):
    """`rdjax port` records mvtec (or --dataset); a workdir that records none (0.7.0's
    ports) or an unknown one says to pass --config.dataset.name, before any work."""
    assert json.loads((ported["rd4ad"][0] / "config.json").read_text())["dataset"]["name"] == "mvtec"
    workdir = _copy(ported, "rd4ad", tmp_path / "w")
    saved = json.loads((workdir / "config.json").read_text())
    saved["dataset"]["name"] = ""
    (workdir / "config.json").write_text(json.dumps(saved))
    data = [f"--workdir={workdir}", f"--config.dataset.root={root}", "--config.dataset.category=disk"]
    assert rdjax_cli("eval", *data).error_line() == (
        "error: config.dataset.name is empty: pass --config.dataset.name=NAME (mvtec for any folder in "
        "MVTec AD's layout; docs/config.md lists the datasets)"
    )
    error = rdjax_cli("eval", *data, "--config.dataset.name=mvtech").error_line()
    assert error.startswith("error: unknown dataset 'mvtech'; choose one of ")
    assert error.endswith(": pass it as --config.dataset.name=NAME") and "mvtec, " in error
    assert not (workdir / "metrics.json").exists() and not (workdir / "eval").exists()
    teacher = ported["rd4ad"][0].parent / "rd4ad_teacher.pth"
    flags = ["--arch=resnet18", f"--teacher={teacher}", f"--src={ported['rd4ad'][0].parent / 'rd4ad.pth'}"]
    assert (
        "unknown dataset 'nope'"
        in rdjax_cli("port", "rd4ad", *flags, "--dataset=nope", f"--out={tmp_path / 'x'}").error_line()
    )
    assert not (tmp_path / "x").exists()
    assert rdjax_cli("port", "rd4ad", *flags, "--dataset=visa", f"--out={tmp_path / 'v'}").code == 0
    assert json.loads((tmp_path / "v" / "config.json").read_text())["dataset"]["name"] == "visa"


def _fake_root(folder: Path, *categories: str) -> Path:
    """Folders in MVTec's layout and nothing in them: enough to list the categories."""
    for category in categories:
        for sub in ("train", "test"):
            (folder / category / sub).mkdir(parents=True)
    return folder


@pytest.mark.parametrize(
    ("name", "category"),
    [("mvtec", "all"), ("mvtec", "bottle,cable"), ("visa", "all"), ("mvtec_ad2", "all"), ("realiad", "all")],
)
def test_a_missing_root_is_named_as_missing(name, category, tmp_path):
    missing = tmp_path / "nowhere"
    result = rdjax_cli(
        "train", "--config=mvtec", f"--workdir={tmp_path / 'w'}", f"--config.dataset.name={name}",
        f"--config.dataset.root={missing}", f"--config.dataset.category={category}",
    )  # fmt: skip
    assert result.error_line() == f"error: {missing}: does not exist (config.dataset.root)"
    assert not (tmp_path / "w").exists()


def test_a_list_naming_a_missing_category_is_refused_before_any_work(tmp_path):
    root = _fake_root(tmp_path / "root", "bottle", "cable", "screw")
    for setting in ("per_category", "unified"):
        result = rdjax_cli(
            "train", "--config=mvtec", f"--workdir={tmp_path / 'w'}", f"--config.dataset.root={root}",
            "--config.dataset.category=cable,botle,srew", f"--config.setting={setting}",
        )  # fmt: skip
        assert result.error_line() == (
            "error: config.dataset.category='cable,botle,srew': no category 'botle', 'srew'; "
            "found: bottle, cable, screw"
        )
    assert not (tmp_path / "w").exists()


@pytest.mark.slow  # the data's preparation comes before the teacher
def test_the_offline_teacher_error_names_both_ways_out(root, tmp_path, monkeypatch):
    """Without the ImageNet file in the cache, offline or without a network, the line names
    the file's place, the random teacher's flag and RDJAX_OFFLINE; nothing is written."""
    monkeypatch.setenv("RDJAX_CACHE_DIR", str(tmp_path / "cache"))
    flags = [
        "train", "--config=mvtec", f"--workdir={tmp_path / 'w'}", f"--config.dataset.root={root}",
        "--config.dataset.category=disk", "--config.model.arch=resnet18", f"--config.image_size={SIZE}",
        "--config.batch_size=2",
    ]  # fmt: skip
    monkeypatch.setenv("RDJAX_OFFLINE", "1")
    offline = rdjax_cli(*flags).error_line()
    monkeypatch.delenv("RDJAX_OFFLINE")
    monkeypatch.setenv("RDJAX_WEIGHTS_BASE_URL", "http://127.0.0.1:9/")  # the discard port: refused
    unreachable = rdjax_cli(*flags).error_line()
    for line in (offline, unreachable):
        assert "--config.model.teacher_weights=none" in line and "RDJAX_OFFLINE" in line, line
        assert f"place it at {tmp_path / 'cache' / 'resnet18-f37072fd.pth'}" in line, line
    assert not (tmp_path / "w").exists() and not list((tmp_path / "cache").glob("*"))
