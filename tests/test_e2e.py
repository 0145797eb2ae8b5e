"""End to end on generated synthetic data: training, outputs, CLI eval, and the
evaluation of a ported official-format model against a torch re-run of the official
evaluation procedure. (Resume exactness is tested with a real kill in test_interrupt.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score
from torchvision import transforms

from configs import synthetic as synthetic_config
from conftest import ROOT, randomize_batchnorm
from rdjax import checkpoint, train
from rdjax.data import synthetic
from torch_reference import TorchDecoder, TorchOCBE, official_state_dict, teacher_features


def demo_config(root: Path, **overrides):
    config = synthetic_config.get_config()
    config.dataset.root = str(root)
    config.dataset.data_dir = str(root / "_tfds")
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = demo_config(synth_root, **{"dataset.category": "weave", "num_epochs": 10, "eval_every": 5})
    return config, workdir, train.train_and_evaluate(config, workdir)


def test_training_reaches_the_demo_targets(trained):
    _, _, result = trained
    assert result["epoch"] == 10
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] >= 0.9
    assert 0 < result["aupro"] <= 1


def test_workdir_outputs(trained):
    config, workdir, result = trained
    saved = json.loads((workdir / "metrics.json").read_text())
    assert saved["image_auroc"] == pytest.approx(result["image_auroc"])
    assert saved["seed"] == config.seed and saved["epoch"] == 10
    assert any("RANDOM" in w for w in saved["warnings"])  # teacher_weights='none' is loud
    assert set(saved["per_type"]) == set(synthetic.DEFECT_TYPES)
    assert (workdir / "eval" / "epoch_0005" / "metrics.json").is_file()
    assert "| image AUROC |" in (workdir / "results.md").read_text()
    pictures = sorted((workdir / "eval" / "epoch_0010" / "images").glob("*.png"))
    assert len(pictures) == 8
    assert Image.open(pictures[0]).size == (3 * config.image_size, config.image_size)
    assert checkpoint.load_config(workdir).dataset.category == "weave"
    # TensorBoard scalars: parse the event file with tensorboardX's own protobufs.
    from tensorboardX.proto import event_pb2

    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    tags = set()
    data = events[0].read_bytes()
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 8], "little")
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        tags |= {v.tag for v in event.summary.value}
        pos += 12 + length + 4
    assert {"train/loss", "eval/image_auroc", "eval/pixel_auroc"} <= tags


def test_cli_eval_on_trained_workdir(trained, synth_root):
    config, workdir, result = trained
    proc = subprocess.run(
        [sys.executable, "-m", "rdjax.main", "--config=configs/synthetic.py", f"--workdir={workdir}", "--mode=eval",
         f"--config.dataset.root={synth_root}", "--config.dataset.category=weave", f"--config.dataset.data_dir={synth_root / '_tfds'}"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "weave: image AUROC" in proc.stdout
    again = json.loads((workdir / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert again[key] == pytest.approx(result[key], abs=1e-6)


def official_evaluation(teacher, ocbe, decoder, root: Path, category: str, size: int):
    """The official test.py evaluation, re-run with torch + scipy + sklearn: batch 1,
    torchvision transforms, map in numpy, scipy blur, pixel lists."""
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    gt_tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    px_gt, px_pr, sp_gt, sp_pr = [], [], [], []
    for type_dir in sorted((root / category / "test").iterdir()):
        for path in sorted(type_dir.glob("*.png")):
            img = tf(Image.open(path).convert("RGB"))[None]
            if type_dir.name == "good":
                gt = torch.zeros(1, size, size)
            else:
                gt = gt_tf(Image.open(root / category / "ground_truth" / type_dir.name / f"{path.stem}_mask.png"))
            with torch.no_grad():
                t = teacher_features(teacher, img)
                s = decoder(ocbe(t))
            amap = np.zeros((size, size))
            for fs, ft in zip(s, t):
                a = 1 - torch.nn.functional.cosine_similarity(fs, ft)
                a = torch.nn.functional.interpolate(a[:, None], size=size, mode="bilinear", align_corners=True)
                amap += a[0, 0].numpy()
            amap = gaussian_filter(amap, sigma=4)
            gt = (gt > 0.5).int().numpy()
            px_gt.extend(gt.ravel())
            px_pr.extend(amap.ravel())
            sp_gt.append(gt.max())
            sp_pr.append(amap.max())
    return roc_auc_score(px_gt, px_pr), roc_auc_score(sp_gt, sp_pr)


def test_ported_official_model_evaluates_like_the_official_code(synth_root, tmp_path):
    torch.manual_seed(11)
    teacher = torchvision.models.resnet18(weights=None)
    randomize_batchnorm(teacher, 1)
    ocbe, decoder = TorchOCBE("resnet18"), TorchDecoder("resnet18")
    randomize_batchnorm(ocbe, 2)
    randomize_batchnorm(decoder, 3)
    for m in (teacher, ocbe, decoder):
        m.eval()
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    torch.save(official_state_dict(ocbe, decoder), tmp_path / "rd4ad.pth")
    workdir = tmp_path / "ported"
    proc = subprocess.run(
        [sys.executable, "-m", "rdjax.port", "rd4ad", "--arch", "resnet18", "--teacher", str(tmp_path / "teacher.pth"),
         "--src", str(tmp_path / "rd4ad.pth"), "--out", str(workdir), "--image-size", "64"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    config = demo_config(synth_root, **{"dataset.category": "disk", "image_size": 64})
    ours = train.evaluate_workdir(config, workdir)
    pixel, image = official_evaluation(teacher, ocbe, decoder, synth_root, "disk", 64)
    assert ours["pixel_auroc"] == pytest.approx(pixel, abs=1e-3)
    assert ours["image_auroc"] == pytest.approx(image, abs=1e-3)
    assert ours["epoch"] == 0


def test_cli_all_categories_writes_one_table(synth_root, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rdjax.main", "--config=configs/synthetic.py", f"--workdir={tmp_path}",
         f"--config.dataset.root={synth_root}", f"--config.dataset.data_dir={synth_root / '_tfds'}",
         "--config.dataset.category=all", "--config.image_size=64", "--config.num_epochs=1"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["category", "disk", "weave", "**mean**"]
    per = [json.loads((tmp_path / c / "metrics.json").read_text())["image_auroc"] for c in ("disk", "weave")]
    assert f"**{100 * np.mean(per):.1f}**" in rows[-1]


def test_cli_bad_input_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rdjax.main", "--config=configs/mvtec.py", f"--workdir={tmp_path / 'w'}",
         f"--config.dataset.root={tmp_path}", "--config.dataset.category=bottle"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "no such category" in proc.stderr and "found: none" in proc.stderr
