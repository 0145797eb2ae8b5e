"""Using a trained workdir: rdjax.load, predict on every input kind, thresholds and
normalized scores, the report, the predict CLI, and jax.export round trips."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score

import rdjax
from configs import synthetic as synthetic_config
from conftest import ROOT
from rdjax import inference, train
from rdjax.data import synthetic


def disk_config(data: Path, num_epochs: int):
    config = synthetic_config.get_config()
    config.dataset.root = str(data)
    config.dataset.data_dir = str(data / "_tfds")
    config.dataset.category = "disk"
    config.image_size = 64
    config.num_epochs = num_epochs
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    data = synthetic.generate(tmp_path_factory.mktemp("data"), categories=("disk",), num_train=16,
                              num_test_good=6, num_per_defect=3)
    config = disk_config(data, num_epochs=3)
    work = tmp_path_factory.mktemp("work")
    result = train.train_and_evaluate(config, work)
    return work, data, result


@pytest.fixture(scope="module")
def model(workdir):
    return rdjax.load(workdir[0])


def test_load_restores_the_trained_model(workdir, model):
    work, data, result = workdir
    assert model.step == 3 * 2
    cal = json.loads((work / "calibration.json").read_text())
    assert cal == model.calibration and cal["method"] == "f1" and cal["step"] == 6
    # Scores from predict on the original test files equal the evaluation's scores.
    files = sorted((data / "disk" / "test").rglob("*.png"))
    pred = model.predict([str(f) for f in files])
    eval_scores = json.loads((work / "metrics.json").read_text())
    assert len(pred.scores) == eval_scores["num_images"] == len(files)
    labels = np.array([0 if f.parent.name == "good" else 1 for f in files])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(labels, pred.scores) == pytest.approx(result["image_auroc"], abs=1e-6)


def test_load_in_bfloat16_keeps_the_maps(workdir, model):
    """A float32-trained workdir evaluated in bfloat16: maps stay within the bound that
    tests/test_scale.py sets for bf16, and the image ranking is kept."""
    work, data, _ = workdir
    fast = rdjax.load(work, dtype="bfloat16")
    assert fast.config.dtype == "bfloat16" and model.config.dtype == "float32"
    files = [str(f) for f in sorted((data / "disk" / "test").rglob("*.png"))]
    p32, p16 = model.predict(files), fast.predict(files)
    maps32, maps16 = np.stack(p32.maps), np.stack(p16.maps)
    assert not np.array_equal(maps16, maps32)  # bf16 arithmetic really ran
    assert float(np.max(np.abs(maps16 - maps32)) / np.max(np.abs(maps32))) < 0.05
    assert np.corrcoef(maps16.ravel(), maps32.ravel())[0, 1] > 0.99
    assert np.corrcoef(p16.scores, p32.scores)[0, 1] > 0.99


def test_predict_accepts_every_input_kind(workdir, model):
    _, data, _ = workdir
    path = sorted((data / "disk" / "test" / "hole").glob("*.png"))[0]
    arr = np.asarray(Image.open(path).convert("RGB"))
    odd = np.asarray(Image.fromarray(arr).resize((150, 100)))
    by_path, by_array, by_pil = model.predict(str(path)), model.predict(arr), model.predict(Image.open(path))
    assert by_path.scores[0] == by_array.scores[0] == by_pil.scores[0]
    batch = model.predict(np.stack([arr, arr]))
    assert batch.scores.shape == (2,) and batch.scores[0] == by_array.scores[0]
    mixed = model.predict([odd, str(path)])
    assert mixed.maps[0].shape == (100, 150) and mixed.masks[0].shape == (100, 150)
    assert mixed.maps[1].shape == arr.shape[:2]
    assert mixed.decisions.dtype == bool and np.all((0 <= mixed.normalized_scores) & (mixed.normalized_scores <= 1))
    normalized = model.normalized_map(mixed.maps[1])
    np.testing.assert_array_equal(normalized >= 0.5, mixed.masks[1])  # 0.5 is the pixel threshold
    # Batching is automatic and does not change results.
    many = model.predict([arr] * 5, batch_size=2)
    np.testing.assert_allclose(many.scores, by_array.scores[0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"expected a uint8 array of shape \(H, W, 3\)"):
        model.predict(np.zeros((8, 8), np.float32))


def test_normalized_scores_formula():
    s = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 9.0])
    out = inference.normalize_scores(s, threshold=3.0, lo=1.0, hi=5.0)
    np.testing.assert_allclose(out, [0.0, 0.25, 0.5, 0.75, 1.0, 0.0, 1.0])


def test_f1_threshold_is_the_best_f1():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 80)
    scores = labels + rng.normal(scale=0.8, size=80)
    t = inference.f1_threshold(labels, scores)
    best = max(f1_score(labels, scores >= c) for c in np.unique(scores))
    assert f1_score(labels, scores >= t) == pytest.approx(best)


def test_quantile_calibration_and_hold_out():
    rng = np.random.default_rng(1)
    scores, maps = rng.random(50), rng.random((50, 4, 4))
    cal = inference.calibrate("quantile", scores, np.zeros(50), maps, np.zeros((50, 4, 4), bool), 0.9, "held out")
    assert cal["image_threshold"] == pytest.approx(np.quantile(scores, 0.9))
    assert cal["pixel_threshold"] == pytest.approx(np.quantile(maps, 0.9))
    config = synthetic_config.get_config()
    config.threshold.validation_size = 3
    from rdjax.data.preprocess import Split

    split = Split(np.arange(10)[:, None, None, None].astype(np.uint8) * np.ones((1, 2, 2, 3), np.uint8),
                  np.zeros((10, 2, 2), bool), np.zeros(10, np.int32), ["good"] * 10, [f"{i}.png" for i in range(10)])
    kept, held = train.hold_out(split, config)
    assert len(kept) == 7 and len(held) == 3
    assert not set(kept.filenames) & set(held.filenames)
    assert train.hold_out(split, config)[1].filenames == held.filenames  # a function of the seed


def test_report_is_written(workdir):
    work, _, _ = workdir
    report = work / "eval" / "epoch_0003" / "report.png"
    assert report.is_file()
    img = Image.open(report)
    assert img.size[0] > 800 and img.size[1] > 600


def test_predict_cli(workdir, tmp_path):
    work, data, _ = workdir
    inputs = tmp_path / "in"
    shutil.copytree(data / "disk" / "test", inputs)
    (inputs / "good" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rdjax.predict", f"--workdir={work}", f"--input={inputs}", f"--output={out}"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n = len(list(inputs.rglob("*.png"))) - 1
    assert f"{n} images scored" in proc.stdout and "1 skipped" in proc.stdout
    assert "broken.png" in proc.stderr
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == n
    assert {r["decision"] for r in rows} <= {"normal", "anomalous"}
    assert len(list((out / "overlays").glob("*.png"))) == n
    assert len(list((out / "masks").glob("*_mask.png"))) == n
    model = rdjax.load(work)
    row = next(r for r in rows if r["file"].endswith("hole/000.png"))
    assert float(row["score"]) == pytest.approx(float(model.predict(row["file"]).scores[0]), rel=1e-5)


def test_export_round_trip(workdir, model, tmp_path):
    from jax import export

    from rdjax.export import export_model

    _, data, _ = workdir
    files = sorted((data / "disk" / "test").rglob("*.png"))[:5]
    batch = model.preprocess([np.asarray(Image.open(f).convert("RGB")) for f in files])
    exported = export.deserialize(export_model(model).serialize())
    maps, scores = exported.call(batch)
    want_maps, want_scores = model.predict_resized(batch)
    np.testing.assert_allclose(np.asarray(maps), want_maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5)
    # Any batch size: the batch dimension is symbolic.
    one_maps, _ = exported.call(batch[:1])
    np.testing.assert_allclose(np.asarray(one_maps)[0], want_maps[0], rtol=1e-5, atol=1e-6)


def test_export_cli(workdir, tmp_path):
    work, _, _ = workdir
    out = tmp_path / "model.jaxexport"
    proc = subprocess.run([sys.executable, "-m", "rdjax.export", f"--workdir={work}", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["input"] == ["batch", 64, 64, 3] and meta["step"] == 6
    code = ("import numpy as np; from jax import export; "
            f"e = export.deserialize(open({str(out)!r}, 'rb').read()); "
            "m, s = e.call(np.zeros((3, 64, 64, 3), np.uint8)); print(m.shape, s.shape)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)  # no rdjax on the path
    assert run.returncode == 0, run.stderr[-2000:]
    assert "(3, 64, 64) (3,)" in run.stdout


def test_quantile_threshold_from_held_out_images(workdir, tmp_path):
    _, data, _ = workdir
    config = disk_config(data, num_epochs=1)
    config.threshold.method = "quantile"
    config.threshold.validation_size = 4
    config.threshold.quantile = 0.75
    train.train_and_evaluate(config, tmp_path / "q")
    cal = json.loads((tmp_path / "q" / "calibration.json").read_text())
    assert cal["method"] == "quantile" and cal["source"] == "4 held-out train/good images"
    model = rdjax.load(tmp_path / "q")
    from rdjax.data.datasets import load_dataset

    held = train.hold_out(load_dataset(config)[0], config)[1]
    scores = model.predict_resized(held.images)[1]
    assert cal["image_threshold"] == pytest.approx(float(np.quantile(scores, 0.75)), rel=1e-6)
    assert json.loads((tmp_path / "q" / "train_log.json").read_text())[0]["step"] == 2  # 12 images left, batch 8


def test_cli_on_a_missing_workdir_is_one_line(tmp_path):
    for module, extra in (("rdjax.export", [f"--out={tmp_path / 'm'}"]), ("rdjax.predict", [f"--input={ROOT / 'configs'}/*.py", f"--output={tmp_path / 'o'}"])):
        proc = subprocess.run([sys.executable, "-m", module, f"--workdir={tmp_path / 'nowhere'}", *extra],
                              cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 1, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "no config.json" in errors[0]


def test_predict_cli_rejects_an_unknown_dtype(workdir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rdjax.predict", f"--workdir={workdir[0]}", "--dtype=float16",
                           f"--input={workdir[1] / 'disk' / 'test'}", f"--output={tmp_path / 'o'}"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "float16" in errors[0]
    assert not (tmp_path / "o").exists()
