"""The unified setting: one model over every category (config.setting='unified')."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image
from sklearn import metrics as skm

from rdjax import config as config_lib
from rdjax import train
from rdjax.data.preprocess import Recipe, Split
from rdjax.scoring import maps, metrics, passes


def _split(seed: int, n: int, size: int = 8, records: np.ndarray | None = None) -> Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    masks = rng.random((n, size, size)) > 0.7
    labels = rng.integers(0, 2, n)
    split = Split.from_arrays(images, masks, labels, ["good" if x == 0 else "cut" for x in labels],
                              [f"{i:03d}.png" for i in range(n)])  # fmt: skip
    split = dataclasses.replace(split, read_native=lambda r: images[r][::2])
    return split if records is None else split.subset(records)


def test_concat_reads_every_row_from_its_own_split():
    """Rows of the joined split decode as the same rows of their parts, even where a
    part's records are sparse (after the hold-out took some out)."""
    a, b = _split(0, 7, records=np.array([0, 2, 5, 6])), _split(1, 5)
    joined = Split.concat({"a": a, "b": b})
    assert len(joined) == 9 and len(set(joined.records.tolist())) == 9
    for row in range(9):
        part, own = (a, row) if row < 4 else (b, row - 4)
        np.testing.assert_array_equal(joined.example(row)[0], part.example(own)[0])
        np.testing.assert_array_equal(joined.example(row)[1], part.example(own)[1])
        np.testing.assert_array_equal(joined.native_image(row), part.native_image(own))
    assert joined.filenames[0] == "a/000.png" and joined.filenames[4] == "b/000.png"
    np.testing.assert_array_equal(joined.labels, np.concatenate([a.labels, b.labels]))


def _pass(rng: np.random.Generator, n: int, exact: bool) -> passes.PassResult:
    """A pass over n random 16x16 maps, its statistics accumulated as the jitted step does."""
    amaps = rng.random((n, 16, 16)).astype(np.float32)
    masks = rng.random((n, 16, 16)) > 0.8
    weights, regions = zip(*(metrics.region_weights(m) for m in masks))
    stats = maps.stats_step(jnp.asarray(amaps), jnp.asarray(amaps.max((1, 2))), jnp.asarray(masks),
                            jnp.asarray(np.stack(weights), jnp.float32), jnp.asarray(regions, jnp.int32),
                            jnp.ones(n, bool))[3]  # fmt: skip
    acc = passes._Accumulator()
    acc.add_stats(jax.device_get(stats))
    acc.scores, acc.sums, acc.pro_images = [amaps.max((1, 2))], [amaps.sum((1, 2))], [np.zeros(n)]
    acc.maps, acc.masks = [amaps], [masks]
    return acc.result(exact)


@pytest.mark.parametrize("exact", [True, False])
def test_merged_passes_equal_one_pass_over_both(exact):
    """The global calibration's statistics, merged category by category, are those of
    one pass over the union: per-image numbers concatenated, histograms summed (integer
    counts: exact), the exact maps kept only while within the pixel limit."""
    rng = np.random.default_rng(0)
    a, b = _pass(rng, 5, exact), _pass(rng, 3, exact)
    merged = passes.merge(passes.merge(None, a, 10**6), b, 10**6)
    np.testing.assert_array_equal(merged.scores, np.concatenate([a.scores, b.scores]))
    np.testing.assert_array_equal(merged.pixels.neg, a.pixels.neg + b.pixels.neg)
    assert merged.pixels.num_regions == a.pixels.num_regions + b.pixels.num_regions
    assert merged.pixels.exact is exact
    if exact:  # and then its AUROC is that of every pixel of both, as sklearn computes it
        labels = np.concatenate([a.pixels.masks, b.pixels.masks]).ravel()
        values = np.concatenate([a.pixels.maps, b.pixels.maps]).ravel()
        assert merged.pixels.auroc() == pytest.approx(skm.roc_auc_score(labels, values), abs=1e-12)
        assert not passes.merge(a, b, a.pixels.maps.size).pixels.exact  # beyond the limit: binned


def test_step_schedule_scales_every_rate_from_its_boundary():
    """config.lr_decay_epoch wraps the model's optimizer; its updates equal those of optax's
    own Adam on a piecewise-constant rate (independent: the rate inside Adam). Both compute
    the same moments by the same operations; they differ only in where the factor
    multiplies ((lr * x) * f against (lr * f) * x): three float32 roundings of 2^-24
    relative at most, 1.8e-7 on any CPU, so rtol 1e-6."""
    config = config_lib.defaults()
    config.num_epochs, config.lr_decay_epoch, config.lr_decay_factor = 10, 5, 0.1

    class _Model:
        def optimizer(self, config, total_steps=0):
            return optax.adam(config.learning_rate, b1=config.adam_b1, b2=config.adam_b2)

    run = train.Run.__new__(train.Run)
    run.config, run.model = config, _Model()
    run.train = _split(0, 4)
    config.batch_size = 2  # 2 steps per epoch: the boundary is step 10
    tx = train.optimizer(run)
    reference = optax.adam(optax.piecewise_constant_schedule(config.learning_rate, {10: 0.1}), b1=0.5, b2=0.999)
    params = {"w": jnp.ones(3)}
    state, ref_state = tx.init(params), reference.init(params)
    for i in range(14):
        g = {"w": jnp.asarray(np.random.default_rng(i).normal(size=3), jnp.float32)}
        u, state = tx.update(g, state)
        r, ref_state = reference.update(g, ref_state)
        np.testing.assert_allclose(u["w"], r["w"], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- the whole workflow (slow)


@pytest.fixture(scope="module")
def unified(synthetic_data, tmp_path_factory):
    """`rdjax train --config.setting=unified` over two synthetic categories, read as any
    MVTec-layout folder (the 'synthetic' dataset would generate a missing category), with
    the default calibration (a quarter of each category's 16 train/good images held out)."""
    from conftest import data_flags, rdjax_cli

    root = synthetic_data(categories=("disk", "weave"))
    workdir = tmp_path_factory.mktemp("unified") / "w"
    flags = [f for f in data_flags(root, "all") if not f.startswith("--config.threshold.")]
    result = rdjax_cli("train", *flags, "--config.setting=unified", "--config.threshold.validation_size=0.25",
                       "--config.batch_size=8", "--config.dataset.name=mvtec", f"--workdir={workdir}")  # fmt: skip
    assert result.code == 0, result.stderr[-3000:]
    return root, workdir, result.stdout


def _held_out_scores(root, workdir, category: str) -> np.ndarray:
    """The held-out images' scores recomputed through rdjax.load (another program than
    the evaluation's pass: within conftest.RECOMPUTED of it)."""
    import rdjax
    from rdjax import data, registry
    from rdjax.configs import synthetic

    config = synthetic.get_config()
    config.dataset.root, config.dataset.data_dir = str(root), str(root / "_tfds")
    train_split, _ = registry.build_dataset(config.dataset).load(category, Recipe(size=64))
    held = data.hold_out(train_split, 0.25, config.seed)[1]
    return rdjax.load(workdir).predict_resized(held.images())[1]


@pytest.mark.slow
def test_one_workdir_a_table_per_category_and_a_mean(unified):
    """One workdir (no per-category folders), the seven metrics for each category and
    their mean printed and in results.md, each category's report in its own folder."""
    from rdjax.scoring.metrics import METRIC_NAMES, TABLE_KEYS

    _, workdir, stdout = unified
    assert not (workdir / "disk").exists() and (workdir / "checkpoints").is_dir()
    header = "| category | " + " | ".join(METRIC_NAMES[k] for k in TABLE_KEYS) + " |"
    lines = stdout.splitlines()
    table = lines[lines.index(header) + 2 : lines.index(header) + 5]  # after the header and its rule
    assert [r.split(" | ")[0] for r in table] == ["| disk", "| weave", "| **mean**"]
    result = json.loads((workdir / "metrics.json").read_text())
    for key in TABLE_KEYS:
        parts = [result["categories"][c][key] for c in ("disk", "weave")]
        assert result[key] == pytest.approx(np.nanmean(parts), abs=1e-12), key
    assert result["categories"]["disk"]["num_images"] == 13  # 4 good + 3 defect types x 3
    for category in ("disk", "weave"):
        assert (workdir / "eval" / "epoch_0001" / category / "report.html").is_file()


@pytest.mark.slow
def test_thresholds_per_category_and_global_from_the_union(unified):
    """Each category's image threshold lies midway between the two highest of its own 4
    held-out scores (the 0.99 quantile, moved to the middle of its gap, `midway`), the
    global one between the two highest of all 8, on scores recomputed independently of
    the passes. The recomputed scores are within RECOMPUTED of the evaluation's, so
    their midpoint is within RECOMPUTED of the threshold, however narrow the gap (a gap
    of 1e-3 on a 2-core Xeon put the threshold 5e-4 from both neighbours)."""
    from conftest import RECOMPUTED

    root, workdir, _ = unified
    cal = json.loads((workdir / "calibration.json").read_text())
    assert set(cal["categories"]) == {"disk", "weave"} and not cal["fitted_on_test_set"]
    union = []
    for category in ("disk", "weave"):
        scores = np.sort(_held_out_scores(root, workdir, category))
        threshold = cal["categories"][category]["image_threshold"]
        assert len(scores) == 4 and abs(threshold - (scores[-2] + scores[-1]) / 2) <= RECOMPUTED, category
        union.append(scores)
    scores = np.sort(np.concatenate(union))
    assert abs(cal["image_threshold"] - (scores[-2] + scores[-1]) / 2) <= RECOMPUTED


@pytest.mark.slow
def test_predict_and_export_with_and_without_a_category(unified, tmp_path):
    """predict decides by the global thresholds, or by a category's with --category; a
    category it does not know is one line and writes nothing; the export records every
    threshold, or the category's alone."""
    import csv

    import rdjax

    from conftest import rdjax_cli

    root, workdir, _ = unified
    cal = json.loads((workdir / "calibration.json").read_text())
    images = root / "weave" / "test"
    weave = cal["categories"]["weave"]["image_threshold"]
    for category, threshold in ((None, cal["image_threshold"]), ("weave", weave)):
        out = tmp_path / f"pred_{category}"
        extra = [] if category is None else [f"--category={category}"]
        result = rdjax_cli("predict", f"--workdir={workdir}", f"--input={images}", f"--output={out}", *extra)
        assert result.code == 0, result.stderr[-2000:]
        rows = list(csv.DictReader((out / "scores.csv").open()))
        assert len(rows) == 13
        for row in rows:
            score = float(row["score"])
            if abs(score - threshold) > RECOMPUTED_MARGIN:
                assert row["decision"] == ("anomalous" if score >= threshold else "normal"), (category, row)
    api = rdjax.load(workdir, category="weave")  # the category's thresholds, not the global ones
    assert api.calibration.to_json() == cal["categories"]["weave"] and rdjax.load(workdir).calibration.to_json() == cal
    scores = np.array([float(r["score"]) for r in rows])
    between = (scores - cal["image_threshold"]) * (scores - weave) < 0
    if between.any():  # where the two thresholds disagree, the runs' decisions must too
        decided = [list(csv.DictReader((tmp_path / f"pred_{c}" / "scores.csv").open())) for c in (None, "weave")]
        assert [r["decision"] for r in decided[0]] != [r["decision"] for r in decided[1]]
    bad = rdjax_cli("predict", f"--workdir={workdir}", f"--input={images}", f"--output={tmp_path / 'no'}",
                    "--category=bottle")  # fmt: skip
    assert bad.code == 1 and bad.stderr.startswith("error: ") and "disk, weave" in bad.stderr
    assert not (tmp_path / "no").exists()
    for category in (None, "disk"):
        out = tmp_path / f"model_{category}.onnx"
        extra = [] if category is None else [f"--category={category}"]
        result = rdjax_cli("export", f"--workdir={workdir}", f"--out={out}", "--format=onnx", *extra)
        assert result.code == 0, result.stderr[-2000:]
        recorded = json.loads(out.with_name(out.name + ".json").read_text())["calibration"]
        expected = cal if category is None else cal["categories"][category]
        assert recorded["image_threshold"] == expected["image_threshold"]
        assert ("categories" in recorded) is (category is None)


@pytest.mark.slow
def test_a_changed_set_of_categories_is_refused(unified, tmp_path):
    """Evaluating a unified workdir on a root that lost a category would change its
    union and global thresholds: one line, nothing written."""
    import shutil

    from conftest import data_flags, rdjax_cli

    trained_on, workdir, _ = unified
    before = (workdir / "calibration.json").read_bytes()
    root = tmp_path / "root"  # a root of its own: the shared ones may gain categories (the 'synthetic' dataset)
    shutil.copytree(trained_on / "disk", root / "disk")
    flags = [f for f in data_flags(root, "all") if not f.startswith("--config.threshold.")]
    result = rdjax_cli("eval", *flags, "--config.setting=unified", "--config.threshold.validation_size=0.25",
                       "--config.batch_size=8", "--config.dataset.name=mvtec", f"--workdir={workdir}")  # fmt: skip
    assert result.code == 1 and "trained on the categories disk, weave" in result.stderr, result.stderr[-2000:]
    assert (workdir / "calibration.json").read_bytes() == before


@pytest.mark.slow
def test_one_category_unified_prints_its_table(synthetic_data, tmp_path):
    """A unified run over a single category (dataset.category names it) prints the
    table with its mean row, and its results carry their epoch."""
    from conftest import data_flags, rdjax_cli

    root = synthetic_data()
    result = rdjax_cli("train", *data_flags(root, "disk"), "--config.setting=unified", f"--workdir={tmp_path / 'w'}")
    assert result.code == 0, result.stderr[-2000:]
    assert "| disk |" in result.stdout and "| **mean** |" in result.stdout
    assert (tmp_path / "w" / "eval" / "epoch_0001" / "disk" / "results.md").read_text().startswith("# disk (epoch 1)")


def test_one_class_problems_are_refused_unified(tmp_path):
    """MNIST's classes are each other's anomalies: no model of all of them."""
    from rdjax.configs import mnist
    from rdjax.errors import ConfigError

    config = mnist.get_config()
    config.setting, config.offline = "unified", True
    with pytest.raises(ConfigError, match="one-class problems"):
        train.setup(config, tmp_path / "w", writing=True)
    assert not (tmp_path / "w").exists()


# predict's scores.csv holds six decimals: a score this close to the threshold may print
# on either side of it.
RECOMPUTED_MARGIN = 1e-6


# ----------------------------------------------------------------------------- deciding per category (slow)


# scores.csv prints thresholds with six decimals: within 5e-7 of calibration.json's value,
# whatever the CPU, so rows are compared with abs=1e-6.


def _rows(out):
    import csv

    return list(csv.DictReader((out / "scores.csv").open()))


@pytest.mark.slow
def test_every_row_names_the_thresholds_that_decided_and_the_global_warns(unified, tmp_path):
    """The global threshold set above every weave test score, weave's own midway among
    them: without --category every weave image is 'normal' and the command says once,
    with both numbers, that the categories' thresholds differ; with --category=weave each
    row names weave and its threshold, and decides by it (score >= threshold)."""
    import shutil

    from conftest import rdjax_cli

    root, workdir, _ = unified
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    cal = json.loads((copy / "calibration.json").read_text())
    images = root / "weave" / "test"
    probe = rdjax_cli("predict", f"--workdir={copy}", f"--input={images}", f"--output={tmp_path / 'probe'}",
                      "--category=weave")  # fmt: skip
    assert probe.code == 0, probe.stderr[-2000:]
    scores = np.array([float(r["score"]) for r in _rows(tmp_path / "probe")])
    cal["image_threshold"] = float(scores.max()) + 1.0
    ordered = np.sort(scores)  # midway between two middle scores: 6-decimal rows cannot straddle it
    cal["categories"]["weave"]["image_threshold"] = float(ordered[len(ordered) // 2 - 1 : len(ordered) // 2 + 1].mean())
    assert ordered[len(ordered) // 2] - ordered[len(ordered) // 2 - 1] > 1e-5
    (copy / "calibration.json").write_text(json.dumps(cal))
    plain = rdjax_cli("predict", f"--workdir={copy}", f"--input={images}", f"--output={tmp_path / 'plain'}")
    assert plain.code == 0, plain.stderr[-2000:]
    warnings = [line for line in plain.stderr.splitlines() if "decides with its global image threshold" in line]
    assert len(warnings) == 1 and f"{cal['image_threshold']:.6g}" in warnings[0]
    assert f"weave {cal['categories']['weave']['image_threshold']:.6g}" in warnings[0]
    rows = _rows(tmp_path / "plain")
    assert {r["decision"] for r in rows} == {"normal"} and {r["category"] for r in rows} == {"global"}
    assert [float(r["threshold"]) for r in rows] == [pytest.approx(cal["image_threshold"], abs=1e-6)] * len(rows)
    own = rdjax_cli("predict", f"--workdir={copy}", f"--input={images}", f"--output={tmp_path / 'own'}",
                    "--category=weave")  # fmt: skip
    assert own.code == 0 and "decides with its global" not in own.stderr
    threshold = cal["categories"]["weave"]["image_threshold"]
    rows = _rows(tmp_path / "own")
    assert {r["category"] for r in rows} == {"weave"}
    for row in rows:
        assert float(row["threshold"]) == pytest.approx(threshold, abs=1e-6)
        assert row["decision"] == ("anomalous" if float(row["score"]) >= threshold else "normal")
    assert {r["decision"] for r in rows} == {"normal", "anomalous"}
    assert "decided by the thresholds of weave" in own.stdout


@pytest.mark.slow
def test_the_router_recognises_each_test_images_category(unified, tmp_path):
    """The unified evaluation writes router.npz and measures it on the test images
    (metrics.json); --category=auto gives each image the category of its nearest
    training image, which for these two products (a disk on a plain background, a
    woven texture) is the folder it came from, and decides it by that category's
    thresholds. The export, one artifact for one category, refuses 'auto' in one line."""
    from conftest import rdjax_cli

    root, workdir, _ = unified
    result = json.loads((workdir / "metrics.json").read_text())
    assert (workdir / "router.npz").is_file()
    cal = json.loads((workdir / "calibration.json").read_text())
    for category in ("disk", "weave"):
        out = tmp_path / category
        run = rdjax_cli("predict", f"--workdir={workdir}", f"--input={root / category / 'test'}", f"--output={out}",
                        "--category=auto")  # fmt: skip
        assert run.code == 0, run.stderr[-2000:]
        rows = _rows(out)
        assert [r["category"] for r in rows] == [category] * len(rows)  # the folder it came from
        assert result["router_accuracy"][category] == 1.0
        for row in rows:
            threshold = cal["categories"][row["category"]]["image_threshold"]
            assert float(row["threshold"]) == pytest.approx(threshold, abs=1e-6)
    recognised = f"{100 * result['router_accuracy']['all']:.1f}% of the test images recognised"
    assert recognised in (workdir / "results.md").read_text()
    bad = rdjax_cli("export", f"--workdir={workdir}", f"--out={tmp_path / 'm.onnx'}", "--format=onnx",
                    "--category=auto")  # fmt: skip
    assert "auto" in bad.error_line() and not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_a_package_decides_with_its_category_and_keeps_the_others(unified, tmp_path):
    """`rdjax package --category=weave` makes weave the package's default (contract.json
    names it); the package still holds every category's thresholds and the router, so
    predict --category=disk on it decides by disk's; an unknown category is one line and
    leaves no package."""
    from conftest import rdjax_cli

    root, workdir, _ = unified
    cal = json.loads((workdir / "calibration.json").read_text())
    package = tmp_path / "pkg"
    made = rdjax_cli("package", f"--workdir={workdir}", f"--out={package}", "--category=weave")
    assert made.code == 0, made.stderr[-2000:]
    assert json.loads((package / "contract.json").read_text())["category"] == "weave"
    assert json.loads((package / "calibration.json").read_text()) == cal and (package / "router.npz").is_file()
    images = root / "disk" / "test"
    for category, extra in (("weave", []), ("disk", ["--category=disk"])):
        out = tmp_path / f"pred_{category}"
        run = rdjax_cli("predict", f"--workdir={package}", f"--input={images}", f"--output={out}", *extra)
        assert run.code == 0, run.stderr[-2000:]
        threshold = cal["categories"][category]["image_threshold"]
        for row in _rows(out):
            assert row["category"] == category and float(row["threshold"]) == pytest.approx(threshold, abs=1e-6)
    bad = rdjax_cli("package", f"--workdir={workdir}", f"--out={tmp_path / 'no'}", "--category=bottle")
    assert "no category 'bottle'" in bad.error_line() and not (tmp_path / "no").exists()


@pytest.mark.slow
def test_the_server_decides_per_request_category(unified, tmp_path):
    """`rdjax serve --category=weave --max_queue=5` as a user starts it (a subprocess on a
    loopback port): /health names the default category and the queue; each answer names
    the category and threshold that decided it, ?category=disk and ?category=auto choose
    per request (the router's category for a disk image is disk), and an unknown category
    is a 400 with one line, after which the server still answers."""
    import signal
    import subprocess
    import sys
    import urllib.request

    from http_client import png, post

    from conftest import ROOT

    root, workdir, _ = unified
    cal = json.loads((workdir / "calibration.json").read_text())
    proc = subprocess.Popen([sys.executable, "-m", "rdjax", "serve", f"--workdir={workdir}", "--port=0",
                             "--category=weave", "--max_queue=5"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "thresholds of weave" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ")[1].split("/  ")[0]
        health = json.loads(urllib.request.urlopen(url + "/health", timeout=60).read())
        assert (health["category"], health["max_queue"], health["categories"]) == ("weave", 5, ["disk", "weave"])
        image = np.asarray(Image.open(sorted((root / "disk" / "test" / "good").iterdir())[0]).convert("RGB"))
        expected = {None: "weave", "disk": "disk", "auto": "disk", "global": "global"}
        for query, name in expected.items():
            status, answer = post(url, png(image), "/predict" + (f"?category={query}" if query else ""))
            assert status == 200, answer
            threshold = cal["image_threshold"] if name == "global" else cal["categories"][name]["image_threshold"]
            assert (answer["category"], answer["threshold"]) == (name, threshold)
            assert answer["decision"] == ("anomalous" if answer["score"] >= threshold else "normal")
        status, answer = post(url, png(image), "/predict?category=bottle")
        assert status == 400 and "bottle" in answer["error"] and "\n" not in answer["error"]
        assert post(url, png(image))[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def test_router_is_cosine_nearest_neighbour_and_refuses_a_damaged_file(tmp_path):
    """route() gives each query the label of sklearn's cosine nearest neighbour; embed()
    is the per-scale pooled, normalised, concatenated vector (numpy, by hand); spread()
    keeps every row of a small set and evenly spaced rows of a large one; router.npz
    round-trips, and a damaged or inconsistent file is one WorkdirError."""
    from sklearn.neighbors import NearestNeighbors

    from rdjax.errors import WorkdirError
    from rdjax.scoring import router as router_lib

    rng = np.random.default_rng(0)
    train = rng.normal(size=(30, 8)).astype(np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    router = router_lib.Router(train, rng.integers(0, 3, 30), ("a", "b", "c"))
    queries = rng.normal(size=(50, 8)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    nearest = NearestNeighbors(n_neighbors=1, metric="cosine").fit(train).kneighbors(queries)[1][:, 0]
    assert router.route(queries) == [router.categories[router.labels[j]] for j in nearest]
    feats = (rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 5, 6)))  # NHWC and tokens
    want = [f.mean(axis=tuple(range(1, f.ndim - 1))) for f in feats]
    want = np.concatenate([w / np.linalg.norm(w, axis=1, keepdims=True) for w in want], axis=1) / np.sqrt(2)
    # float32 against float64: a mean of <= 30 values, a norm and a division, each a few
    # float32 roundings (2^-24 relative) on any CPU: well inside 1e-5.
    np.testing.assert_allclose(router_lib.embed([jnp.asarray(f, jnp.float32) for f in feats]), want, rtol=1e-5)
    assert router_lib.spread(5).tolist() == [0, 1, 2, 3, 4]
    assert router_lib.spread(200, 3).tolist() == [0, 100, 199]
    path = tmp_path / "router.npz"
    router.save(path)
    back = router_lib.load_router(path)
    assert back is not None and back.categories == router.categories
    np.testing.assert_array_equal(back.embeddings, train)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WorkdirError, match="not a readable router"):
        router_lib.load_router(path)
    router_lib.Router(train, np.full(30, 3), ("a", "b", "c")).save(path)  # a label beyond the names
    with pytest.raises(WorkdirError, match="inconsistent"):
        router_lib.load_router(path)
    assert router_lib.load_router(tmp_path / "none.npz") is None
