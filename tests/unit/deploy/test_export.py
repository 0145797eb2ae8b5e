"""Export: the jax.export artifact (cpu, cuda, tpu) and the ONNX model compute predict's
maps and decisions; onnxruntime and OpenVINO run the ONNX model; stored float16 and
bfloat16 weights keep the maps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rdjax

from conftest import rdjax_cli, rel_err, subprocess_run


@pytest.fixture(scope="module")
def setup(trained):
    """(workdir, model, every test image of the shared run resized to its input size,
    predict's maps and scores on them)."""
    config, work, _ = trained
    model = rdjax.load(work)
    files = sorted((Path(config.dataset.root) / "disk" / "test").rglob("*.png"))
    batch = model.preprocess([np.asarray(Image.open(f).convert("RGB")) for f in files])
    maps, scores = model.predict_resized(batch)
    return work, model, batch, maps, scores


def _export(work: Path, out: Path, *flags: str) -> dict:
    result = rdjax_cli("export", f"--workdir={work}", f"--out={out}", *flags)
    assert result.code == 0, result.stderr[-2000:]
    return json.loads(Path(str(out) + ".json").read_text())


def _decisions(scores: np.ndarray, meta: dict) -> np.ndarray:
    """The decision rule the artifact's JSON states."""
    return np.asarray(scores) >= meta["calibration"]["image_threshold"]


@pytest.fixture(scope="module")
def jax_file(setup, tmp_path_factory):
    """The float32 jax.export artifact of the shared run, and its JSON, exported once."""
    out = tmp_path_factory.mktemp("jax") / "model.jaxexport"
    return out, _export(setup[0], out)


@pytest.mark.slow  # exports for three platforms and compiles the artifact twice
def test_jax_export_declares_three_platforms_and_runs_without_rdjax(setup, jax_file, tmp_path):
    from jax import export

    work, model, batch, want_maps, want_scores = setup
    out, meta = jax_file
    assert meta["input"]["shape"] == ["batch", 64, 64, 3] and meta["input"]["dtype"] == "uint8"
    assert meta["step"] == 9 and meta["model"] == "rd4ad" and meta["calibration"] == model.calibration.to_json()
    exported = export.deserialize(out.read_bytes())
    assert exported.platforms == ("cpu", "cuda", "tpu")
    for n in (len(batch), 1):  # the batch size is symbolic
        maps, scores = exported.call(batch[:n])
        # The same computation with the weights as constants: XLA may fold them
        # differently, float32 rounding of order 1e-7 relative.
        np.testing.assert_allclose(np.asarray(maps), want_maps[:n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(scores), want_scores[:n], rtol=1e-5)
    # Identical decisions to predict's on every test image: the threshold lies midway
    # between two calibration scores, far beyond float32 rounding.
    np.testing.assert_array_equal(
        _decisions(exported.call(batch)[1], meta), rdjax.load(work).predict(list(batch)).decisions
    )
    code = (
        "import sys; sys.modules['rdjax'] = None; import numpy as np; from jax import export; "
        f"e = export.deserialize(open({str(out)!r}, 'rb').read()); "
        "m, s = e.call(np.zeros((3, 64, 64, 3), np.uint8)); print(m.shape, s.shape)"
    )
    run = subprocess_run(sys.executable, "-c", code, cwd=tmp_path)  # rdjax cannot be imported there
    assert run.returncode == 0, run.stderr[-2000:]
    assert "(3, 64, 64) (3,)" in run.stdout


@pytest.fixture(scope="module")
def onnx_file(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    meta = _export(setup[0], out, "--format=onnx")
    assert meta["format"] == "onnx" and meta["compute_dtype"] == "float32"
    return out, meta


@pytest.mark.slow
def test_onnxruntime_reproduces_predict(setup, onnx_file):
    """Maps within 1e-4 of the largest value (the same float32 arithmetic in another
    runtime: convolution algorithms and summation orders differ, ~1e-6), and predict's
    decisions on every test image."""
    import onnxruntime

    _, model, batch, want_maps, want_scores = setup
    out, meta = onnx_file
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["maps", "scores"]
    for n in (len(batch), 1):  # dynamic batch axis
        maps, scores = session.run(None, {"images": batch[:n]})
        assert maps.shape == (n, 64, 64) and maps.dtype == np.float32
        assert rel_err(maps, want_maps[:n]) < 1e-4
    maps, scores = session.run(None, {"images": batch})
    np.testing.assert_array_equal(_decisions(scores, meta), want_scores >= model.image_threshold)


@pytest.mark.slow
def test_openvino_runs_the_onnx_model_with_the_same_decisions(setup, onnx_file):
    """OpenVINO's CPU plugin, asked for float32 (by default it computes in bfloat16 on
    CPUs with AVX512-BF16): maps within 1e-4 of the largest value, as onnxruntime."""
    import openvino

    _, model, batch, want_maps, want_scores = setup
    out, meta = onnx_file
    compiled = openvino.Core().compile_model(str(out), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(batch)
    maps, scores = result[compiled.output("maps")], result[compiled.output("scores")]
    assert rel_err(maps, want_maps) < 1e-4
    np.testing.assert_array_equal(_decisions(scores, meta), want_scores >= model.image_threshold)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,bits", [("float16", 11), ("bfloat16", 8)])
def test_half_precision_weights_halve_the_file_and_keep_the_maps(setup, jax_file, tmp_path, dtype, bits):
    """Weights rounded to ``bits`` significant bits (relative error at most 2^-bits each),
    then float32 arithmetic. Relative errors add at most linearly through a layer of gain
    about 1 (BatchNorm keeps the activations' scale), and the ResNet-18 encoder, OCBE and
    decoder stack about 40 layers: so the map error stays below 64 * 2^-bits of the
    largest value (docs/export.md has the measured figures, far below). It is not zero:
    the weights really were rounded."""
    from jax import export

    work, _, batch, want_maps, _ = setup
    full, half = jax_file[0], tmp_path / f"{dtype}.jaxexport"
    assert _export(work, half, f"--weights_dtype={dtype}")["weights_dtype"] == dtype
    assert half.stat().st_size < 0.55 * full.stat().st_size
    maps = np.asarray(export.deserialize(half.read_bytes()).call(batch)[0])
    err = rel_err(maps, want_maps)
    assert 0 < err < 64 * 2.0**-bits, err


def test_the_contract_states_the_image_score(trained):
    """The default score, recorded by training in calibration.json: the map's maximum."""
    from rdjax.deploy import export as export_lib

    score = export_lib.contract(rdjax.load(trained[1]), "jax", "float32")["score"]
    assert score["max_ratio"] == 0.0 and score["rule"].startswith("each map's maximum")


@pytest.mark.slow  # two exports and their compilations
def test_exports_score_by_the_recorded_max_ratio(setup, tmp_path):
    """A workdir whose calibration.json records max_ratio 0.01 (rdjax eval
    --config.max_ratio=0.01): both artifacts compute predict's scores, the mean of each
    map's 40 highest pixels, and their JSON states the rule. Tolerances: the jax artifact
    as in the test above (1e-5 relative); the ONNX model's maps are within 1e-4 of the
    largest value (test_onnxruntime_reproduces_predict), and the mean of a map's k
    highest pixels moves by no more than its largest pixel change, so its scores lie
    within that absolute bound."""
    import shutil

    import onnxruntime
    from jax import export

    work, model, batch, _, _ = setup
    copy = tmp_path / "w"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("eval"))
    (copy / "calibration.json").write_text(json.dumps({**model.calibration.to_json(), "max_ratio": 0.01}))
    top = rdjax.load(copy)
    want_maps, want_scores = top.predict_resized(batch)
    assert np.all(want_scores < want_maps.max(axis=(1, 2)))  # not the maximum
    meta = _export(copy, tmp_path / "m.jaxexport")
    assert meta["score"]["max_ratio"] == meta["calibration"]["max_ratio"] == 0.01
    assert "int(H * W * 0.01) highest pixels" in meta["score"]["rule"]
    scores = export.deserialize((tmp_path / "m.jaxexport").read_bytes()).call(batch)[1]
    np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5)
    onnx_meta = _export(copy, tmp_path / "m.onnx", "--format=onnx")
    assert onnx_meta["score"] == meta["score"]
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    scores = session.run(None, {"images": batch})[1]
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-4 * float(want_maps.max()))


def test_bad_export_flags_are_one_line_errors(trained, tmp_path):
    work = trained[1]
    for flag, message in (
        ("--format=tflite", "--format=tflite: choose one of jax, onnx"),
        ("--weights_dtype=int8", "--weights_dtype=int8: choose one of float32, float16, bfloat16"),
    ):
        result = rdjax_cli("export", f"--workdir={work}", f"--out={tmp_path / 'm'}", flag)
        assert message in result.error_line()
        assert not list(tmp_path.iterdir())  # nothing written
