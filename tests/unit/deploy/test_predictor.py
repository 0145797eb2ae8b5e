"""Using a trained workdir: rdjax.load, predict on every input kind, thresholds and
normalized scores, and `rdjax predict`. (Export: test_export.py.)"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rdjax
from rdjax import config as config_lib
from rdjax import data, registry, train
from rdjax.data.preprocess import Recipe
from rdjax.deploy import predict, predictor
from rdjax.deploy.names import output_names
from rdjax.scoring import thresholds as calibration

from conftest import RECOMPUTED, assert_auroc_within, rdjax_cli, small_config


@pytest.fixture(scope="module")
def workdir(trained):
    config, work, result = trained
    return work, Path(config.dataset.root), result


@pytest.fixture(scope="module")
def model(workdir):
    return rdjax.load(workdir[0])


def test_the_predictor_keeps_its_old_name():
    assert rdjax.Predictor is predictor.Predictor
    assert rdjax.Model is rdjax.Predictor  # the name up to 0.7.0, for old code
    assert set(rdjax.__all__) == {"Model", "Prediction", "Predictor", "load"}


def test_load_restores_the_trained_model(workdir, model):
    work, data, result = workdir
    assert isinstance(model, rdjax.Predictor)
    assert model.step == 3 * 3
    cal = json.loads((work / "calibration.json").read_text())
    assert cal == model.calibration.to_json() and model.calibration.method == "f1" and model.calibration.step == 9
    # Scores from predict on the original test files equal the evaluation's scores.
    files = sorted((data / "disk" / "test").rglob("*.png"))
    pred = model.predict([str(f) for f in files])
    eval_scores = json.loads((work / "metrics.json").read_text())
    assert len(pred.scores) == eval_scores["num_images"] == len(files)
    labels = np.array([0 if f.parent.name == "good" else 1 for f in files])
    assert_auroc_within(result["image_auroc"], labels, pred.scores)  # predict is another program


@pytest.mark.slow  # the fast tier's 3-minute budget (docs/testing.md)
def test_load_in_bfloat16_keeps_the_maps(workdir, model):
    """A float32-trained workdir evaluated in bfloat16: maps within 5% of the largest
    value (bf16 keeps 8 bits: each rounding is 2^-9 relative, and a ResNet-18 forward
    stacks a few dozen of them, partly cancelling), and the image ranking is kept."""
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


@pytest.mark.slow  # the fast tier's 3-minute budget (docs/testing.md)
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
    cal = model.calibration
    assert mixed.decisions.dtype == bool
    np.testing.assert_array_equal(mixed.decisions, mixed.scores >= cal.image_threshold)
    np.testing.assert_allclose(
        mixed.normalized_scores,
        calibration.normalize_scores(mixed.scores, cal.image_threshold, cal.score_min, cal.score_max),
    )
    normalized = model.normalized_map(mixed.maps[1])
    above = normalized >= 0.5  # 0.5 is the pixel threshold
    if mixed.decisions[1]:  # an anomalous image also shows where its map reaches the image threshold
        above |= mixed.maps[1] >= min(cal.image_threshold, mixed.maps[1].max())
    np.testing.assert_array_equal(above, mixed.masks[1])
    # Batching is automatic and does not change results (beyond float32 rounding: another
    # batch size is another compiled program, ~1e-7 relative).
    many = model.predict([arr] * 5, batch_size=2)
    np.testing.assert_allclose(many.scores, by_array.scores[0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"expected a uint8 array of shape \(H, W, 3\)"):
        model.predict(np.zeros((8, 8), np.float32))


def top_ratio_scores(amaps: list[np.ndarray], max_ratio: float) -> np.ndarray:
    """Dinomaly's max_ratio by hand (float64): each map's int(H * W * r) largest pixels'
    mean, by np.sort."""
    return np.array([np.sort(m.ravel().astype(np.float64))[::-1][: int(m.size * max_ratio)].mean() for m in amaps])


def _copy(work: Path, to: Path) -> Path:
    """The workdir without its evaluation folders, to change its files."""
    shutil.copytree(work, to, ignore=shutil.ignore_patterns("eval"))
    return to


def test_load_takes_the_recorded_max_ratio(workdir, model, tmp_path):
    """Training recorded the default image score (max_ratio 0, the map's maximum) in
    calibration.json. A calibration.json recording 0.01 (as `rdjax eval
    --config.max_ratio=0.01` writes, config.json unchanged) is what rdjax.load scores
    with; one older than the key, or none, leaves the workdir config's."""
    work, _, _ = workdir
    assert model.calibration.max_ratio == 0.0 == model.max_ratio
    copy = _copy(work, tmp_path / "w")
    (copy / "calibration.json").write_text(json.dumps({**model.calibration.to_json(), "max_ratio": 0.01}))
    top = rdjax.load(copy)
    assert top.max_ratio == top.eval_step.max_ratio == 0.01 and top.config.max_ratio == 0.0
    config = config_lib.defaults()
    config.max_ratio = 0.05
    older = dataclasses.replace(model.calibration, max_ratio=None)  # a calibration.json older than the key
    assert "max_ratio" not in older.to_json() and predictor.recorded_max_ratio(older, config) == 0.05
    assert predictor.recorded_max_ratio(None, config) == 0.05


@pytest.mark.slow  # an evaluation of the shared run, and predict compiled for another score
def test_an_evaluation_with_max_ratio_records_it_for_predict(workdir, tmp_path):
    """`rdjax eval` with config.max_ratio=0.01 refits calibration.json, which records it,
    and leaves config.json as trained. Predict then scores each map by the mean of its
    int(64 * 64 * 0.01) = 40 highest pixels, squeezed and tiled alike (one 64 px window
    per 64 px image: the blended map is the window's), and decides on those scores:
    rtol 2.5e-6, since these are the same float32 maps, and a float32 sum of 40 positive
    terms errs by at most 39 roundings of 2^-24 relative whatever the order, 2 more for
    the mean's reciprocal multiply (41 * 2^-24 < 2.5e-6). The squeezed scores reproduce
    the evaluation's (scores.csv) within RECOMPUTED plus 1e-6 for its six decimals: the
    maps of another program differ by at most RECOMPUTED per pixel, and the mean of a
    map's k highest pixels moves by no more than its largest pixel change."""
    import csv

    work, root, _ = workdir
    copy = _copy(work, tmp_path / "w")
    result = train.evaluate(small_config(root, max_ratio=0.01), copy)
    cal = json.loads((copy / "calibration.json").read_text())
    assert cal["max_ratio"] == 0.01 and json.loads((copy / "config.json").read_text())["max_ratio"] == 0.0
    table = copy / "eval" / f"epoch_{result['epoch']:04d}" / "scores.csv"
    evaluated = {row["file"]: float(row["score"]) for row in csv.DictReader(table.open())}
    files = {f"{p.parent.name}/{p.name}": str(p) for p in (root / "disk" / "test").rglob("*.png")}
    model = rdjax.load(copy)
    squeezed = model.predict([files[k] for k in evaluated])
    tiled = model.predict([files[k] for k in evaluated], resize="tile", tile_size=64)
    for pred in (squeezed, tiled):
        assert all(m.shape == (64, 64) for m in pred.maps)
        np.testing.assert_allclose(pred.scores, top_ratio_scores(pred.maps, 0.01), rtol=2.5e-6)
        np.testing.assert_array_equal(pred.decisions, pred.scores >= cal["image_threshold"])
    assert np.all(squeezed.scores < np.array([m.max() for m in squeezed.maps]))  # not the maximum
    np.testing.assert_allclose(squeezed.scores, list(evaluated.values()), rtol=0, atol=RECOMPUTED + 1e-6)


def test_report_is_written(workdir):
    work, _, _ = workdir
    report = work / "eval" / "epoch_0003" / "report.png"
    assert report.is_file()
    img = Image.open(report)
    assert img.size[0] > 800 and img.size[1] > 600


@pytest.mark.slow  # the fast tier's 3-minute budget (docs/testing.md)
def test_predict_accounts_for_every_file(workdir, tmp_path):
    """A mixed folder: images, a truncated PNG, a text file, a file without extension and
    the same image under another extension. scores.csv has one row per file, in the
    folder's order, scored or skipped with the reason; every scored image has its own
    overlay and mask (the two 000 files too) and decides as Predictor.predict does."""
    work, data, _ = workdir
    inputs = tmp_path / "in"
    shutil.copytree(data / "disk" / "test", inputs)
    good = sorted((inputs / "good").glob("*.png"))[0].read_bytes()
    (inputs / "good" / "broken.png").write_bytes(good[: len(good) // 2])  # a truncated PNG
    (inputs / "notes.txt").write_text("line 3, shift 2")
    (inputs / "README").write_text("no extension")
    Image.open(inputs / "hole" / "000.png").convert("RGB").save(inputs / "hole" / "000.jpg", quality=95)
    out = tmp_path / "out"
    result = rdjax_cli("predict", f"--workdir={work}", f"--input={inputs}", f"--output={out}")
    assert result.code == 0, result.stderr[-2000:]
    files = sorted(str(p) for p in inputs.rglob("*") if p.is_file())
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["file"] for r in rows] == files
    skipped = {Path(r["file"]).name: r["reason"] for r in rows if r["status"] == "skipped"}
    assert set(skipped) == {"broken.png", "notes.txt", "README"}
    assert "not an image file (.txt)" in skipped["notes.txt"] and "no extension" in skipped["README"]
    assert "broken.png" in skipped["broken.png"] and all(r["score"] == "" for r in rows if r["status"] == "skipped")
    scored = [r for r in rows if r["status"] == "scored"]
    assert f"{len(scored)} images scored" in result.stdout and "3 files skipped" in result.stdout
    for name in ("hole/000_png", "hole/000_jpg", "hole/001_png"):
        assert (out / "overlays" / f"{name}.png").is_file() and (out / "masks" / f"{name}_mask.png").is_file()
    assert len(list((out / "overlays").rglob("*.png"))) == len(list((out / "masks").rglob("*.png"))) == len(scored)
    model = rdjax.load(work)
    want = model.predict([r["file"] for r in scored]).decisions
    assert [r["decision"] for r in scored] == ["anomalous" if d else "normal" for d in want]
    row = next(r for r in scored if r["file"].endswith("hole/000.png"))
    assert float(row["score"]) == pytest.approx(float(model.predict(row["file"]).scores[0]), rel=1e-5)
    page = (out / "report.html").read_text()
    assert page.count('class="skipcard"') == 3 and "skipped: not an image file (.txt)" in page
    assert "<div>hole/000.png</div>" in page and "<div>hole/000.jpg</div>" in page  # the names, not output names
    assert "000_png<" not in page
    cal = json.loads((work / "calibration.json").read_text())  # a per-category workdir decides by its own
    assert {(r["category"], float(r["threshold"])) for r in scored} == {("disk", round(cal["image_threshold"], 6))}


@pytest.mark.slow  # three predict runs; the fast tier's budget
def test_a_used_output_is_refused_unless_overwrite_which_clears_only_predicts_files(workdir, tmp_path):
    """predict into a folder that holds files is one line and changes nothing there;
    with --overwrite the earlier run's pictures of images no longer in the input are
    gone, the new run's are all there, and a file of the user's stays."""
    work, data, _ = workdir
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, kind in ((first, "hole"), (second, "good")):
        folder.mkdir()
        for src in sorted((data / "disk" / "test" / kind).glob("*.png"))[:2]:
            shutil.copy(src, folder / src.name)
    out = tmp_path / "out"
    assert rdjax_cli("predict", f"--workdir={work}", f"--input={first}", f"--output={out}").code == 0
    (out / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = rdjax_cli("predict", f"--workdir={work}", f"--input={second}", f"--output={out}")
    assert "--overwrite" in refused.error_line()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    again = rdjax_cli("predict", f"--workdir={work}", f"--input={second}", f"--output={out}", "--overwrite")
    assert again.code == 0, again.stderr[-2000:]
    overlays = sorted(p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.png"))
    assert overlays == sorted(f"{p.stem}_png.png" for p in second.glob("*.png"))
    assert (out / "notes.txt").read_text() == "mine"
    assert [r["file"] for r in csv.DictReader(open(out / "scores.csv"))] == sorted(str(p) for p in second.glob("*"))


def test_colliding_names_get_distinct_outputs(workdir, tmp_path):
    """coll/x/y_z.png and coll/x_y/z.png flatten to the same name; kept as paths they
    stay apart, and each overlay is its own image's picture."""
    work, data, _ = workdir
    sources = sorted((data / "disk" / "test" / "hole").glob("*.png"))[:2]
    (tmp_path / "coll" / "x").mkdir(parents=True)
    (tmp_path / "coll" / "x_y").mkdir()
    shutil.copy(sources[0], tmp_path / "coll" / "x" / "y_z.png")
    shutil.copy(sources[1], tmp_path / "coll" / "x_y" / "z.png")
    out = tmp_path / "out"
    predict.predict_folder(str(work), str(tmp_path / "coll"), out)
    first, second = out / "overlays" / "x" / "y_z_png.png", out / "overlays" / "x_y" / "z_png.png"
    assert first.is_file() and second.is_file() and first.read_bytes() != second.read_bytes()
    page = (out / "report.html").read_text()
    assert 'href="overlays/x/y_z_png.png"' in page and 'href="overlays/x_y/z_png.png"' in page
    names = output_names([Path("/r/a/b_c.png"), Path("/r/a_b/c.png"), Path("/r/a/b.png"), Path("/r/a/b.jpg")],
                                 Path("/r"))  # fmt: skip
    assert len(set(names)) == 4


@pytest.mark.slow
def test_the_default_threshold_uses_no_test_image(workdir, tmp_path):
    """The default calibration: the 0.99 quantile of held-out train/good images (0.1 of
    16, so 2, never trained on), recomputed here with Predictor.predict. Evaluated again on a
    test set with half its images removed, the metrics change and calibration.json stays
    the same bit for bit: no test image enters it."""
    _, root, _ = workdir
    defaults = config_lib.defaults().threshold
    config = small_config(root, **{f"threshold.{k}": defaults[k] for k in ("method", "validation_size", "quantile")})
    work = tmp_path / "q"
    first = train.train_and_evaluate(config, work)
    cal = json.loads((work / "calibration.json").read_text())
    assert cal["method"] == "quantile" and cal["source"] == "2 held-out train/good images"
    assert cal["fitted_on_test_set"] is False and "held-out" in first["threshold_note"]
    model = rdjax.load(work)
    train_split, _ = registry.build_dataset(config.dataset).load("disk", Recipe(size=64))
    held = data.hold_out(train_split, defaults.validation_size, config.seed)[1]
    scores = model.predict_resized(held.images())[1]
    # Another batch composition than the calibration pass's: maps within RECOMPUTED, so
    # scores (their maxima) too; the quantile of two scores and the midpoint between them
    # are averages of the scores, which cannot enlarge the bound.
    assert cal["image_threshold"] == pytest.approx(
        calibration.midway(scores, float(np.quantile(scores, defaults.quantile))), abs=RECOMPUTED
    )
    assert json.loads((work / "train_log.json").read_text())[0]["step"] == 2  # 14 images left, batch 8: 8 + 6

    fewer = tmp_path / "fewer"
    shutil.copytree(root, fewer, ignore=shutil.ignore_patterns("_tfds"))
    for folder in (fewer / "disk" / "test").iterdir():
        for image in sorted(folder.glob("*.png"))[::2]:
            image.unlink()
            (fewer / "disk" / "ground_truth" / folder.name / f"{image.stem}_mask.png").unlink(missing_ok=True)
    other = config.copy_and_resolve_references()
    other.dataset.root, other.dataset.data_dir = str(fewer), str(fewer / "_tfds")
    second = train.evaluate(other, work)
    assert second["num_images"] < first["num_images"]
    assert json.loads((work / "calibration.json").read_text()) == cal


def test_predict_on_a_missing_workdir_or_a_bad_dtype_writes_nothing(workdir, tmp_path):
    inputs = f"--input={workdir[1] / 'disk' / 'test'}"
    error = rdjax_cli("predict", f"--workdir={tmp_path / 'nowhere'}", inputs, f"--output={tmp_path / 'o'}").error_line()
    assert "no config.json" in error
    error = rdjax_cli(
        "predict", f"--workdir={workdir[0]}", "--dtype=float16", inputs, f"--output={tmp_path / 'o'}"
    ).error_line()
    assert "float16" in error
    error = rdjax_cli("export", f"--workdir={tmp_path / 'nowhere'}", f"--out={tmp_path / 'm'}").error_line()
    assert "no config.json" in error
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()


@pytest.mark.slow  # a package written and compiled again; the fast tier's budget
def test_a_package_scores_exactly_as_its_workdir(workdir, model, tmp_path):
    """`rdjax package` keeps what inference needs and drops the optimizer state: float32
    scores, maps and decisions equal the workdir's bit for bit (the same variables, the
    same program), through rdjax.load and `rdjax predict`; it is smaller than the
    workdir, and bfloat16 smaller again. A second package to the same place, or a bad
    dtype, is refused and writes nothing."""
    work, root, _ = workdir
    files = [str(f) for f in sorted((root / "disk" / "test").rglob("*.png"))]
    out = rdjax_cli("package", f"--workdir={work}", f"--out={tmp_path / 'p'}")
    assert out.code == 0, out.stderr[-2000:]
    assert "MiB" in out.stdout and "the workdir holds" in out.stdout
    packed = rdjax.load(tmp_path / "p")
    a, b = model.predict(files), packed.predict(files)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.decisions, b.decisions)
    for x, y in zip(a.maps, b.maps):
        np.testing.assert_array_equal(x, y)
    assert packed.step == model.step and packed.calibration == model.calibration
    contract = json.loads((tmp_path / "p" / "contract.json").read_text())
    assert contract["format"] == "package" and contract["calibration"] == model.calibration.to_json()
    assert not (tmp_path / "p" / "checkpoints").exists()

    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    assert size(tmp_path / "p") < size(work) / 2
    for source in (work, tmp_path / "p"):
        out = rdjax_cli("predict", f"--workdir={source}", f"--input={root / 'disk' / 'test'}",
                        f"--output={tmp_path / ('o_' + source.name)}")  # fmt: skip
        assert out.code == 0, out.stderr[-2000:]
    tables = [(tmp_path / f"o_{s.name}" / "scores.csv").read_text() for s in (work, tmp_path / "p")]
    assert tables[0] == tables[1]

    assert rdjax_cli("package", f"--workdir={work}", f"--out={tmp_path / 'h'}", "--weights_dtype=bfloat16").code == 0
    half = rdjax.load(tmp_path / "h")
    assert size(tmp_path / "h" / "student") < 0.6 * size(tmp_path / "p" / "student")
    assert np.all(np.isfinite(half.predict(files).scores))
    assert "already exists" in rdjax_cli("package", f"--workdir={work}", f"--out={tmp_path / 'p'}").error_line()
    error = rdjax_cli("package", f"--workdir={work}", f"--out={tmp_path / 'q'}", "--weights_dtype=float16")
    assert "float16" in error.error_line() and not (tmp_path / "q").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left
