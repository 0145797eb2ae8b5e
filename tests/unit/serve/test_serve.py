"""`rdjax serve` over real HTTP on loopback: every answer equals Predictor.predict called
directly on the same image, bad requests get a 4xx and a one-line reason without
harming the server, concurrent requests are batched, and the page works in chromium.

Exactness: the server pads every model call to its batch size B (rdjax.runtime.sharding.pad),
so every batch runs the one compiled program of shape (B, S, S, 3), and each image's
row is computed by the same arithmetic whatever shares its batch (rows are independent
in inference). The truth is therefore Predictor.predict(image, batch_size=B), and answers
must equal it bit for bit: a score goes through JSON as a double, which holds a float32
exactly. (Another batch size is another program: on CPU, batch 1 differs from batch 8 by
float32 rounding, about 4e-7 in the maps.)
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from http_client import multipart, png, post, request
from PIL import Image

import rdjax
from rdjax.errors import ConfigError
from rdjax.serve import server as serve
from rdjax.serve.limits import Settings

BATCH = 4
REAL = 13  # the test images of the trained run (conftest._shared_run): 4 good, 3 of each of 3 defects
SETTINGS = Settings(batch_size=BATCH, max_wait_ms=5, max_bytes=2_000_000, max_pixels=1_000_000)


# ----------------------------------------------------------------------------- helpers


def levels(model, amap: np.ndarray) -> np.ndarray:
    """The 8-bit map the API documents, from Predictor.predict's map: the calibrated normalized
    pixel scale, 255 = 1."""
    return np.round(np.clip(model.normalized_map(amap), 0, 1) * 255).astype(np.uint8)


def assert_answer(model, answer: dict, image, truth) -> None:
    """``answer`` says what ``truth`` (Predictor.predict on ``image`` alone) says, exactly."""
    assert np.float32(answer["score"]) == truth.scores[0] and answer["score"] == float(truth.scores[0])
    assert answer["normalized_score"] == float(truth.normalized_scores[0])
    assert answer["decision"] == ("anomalous" if truth.decisions[0] else "normal")
    assert (answer["height"], answer["width"]) == truth.maps[0].shape == np.asarray(image).shape[:2]
    assert answer["step"] == model.step
    if "map" in answer:
        assert (answer["map"]["scale"], answer["map"]["min"], answer["map"]["max"]) == ("normalized", 0.0, 1.0)
        decoded = Image.open(io.BytesIO(base64.b64decode(answer["map"]["png"])))
        assert decoded.mode == "L"
        np.testing.assert_array_equal(np.asarray(decoded), levels(model, truth.maps[0]))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(trained):
    model = rdjax.load(trained[1])
    assert model.calibration is not None  # the answers' decisions are checked
    return model


@pytest.fixture(scope="module")
def images(trained) -> list[np.ndarray]:
    """The trained category's test images (normal and defective, 64 px) and random
    images of other, non-square sizes (resized by the model, maps back at their size)."""
    config = trained[0]
    files = sorted((Path(config.dataset.root) / "disk" / "test").rglob("*.png"))
    real = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    assert len(real) == REAL
    rng = np.random.default_rng(0)
    made = [rng.integers(0, 256, (40 + 23 * i, 90 - 11 * i, 3), dtype=np.uint8) for i in range(4)]
    return real + made


@pytest.fixture(scope="module")
def truths(model, images):
    return [model.predict(a, batch_size=BATCH) for a in images]


@pytest.fixture(scope="module")
def server(model):
    with serve.running(model, settings=SETTINGS) as url:
        yield url


def health(url: str) -> dict:
    status, kind, data = request(url, "GET", "/health")
    assert status == 200 and kind == "application/json"
    return json.loads(data)


# ----------------------------------------------------------------------------- answers


def test_health_describes_the_model(server, model):
    h = health(server)
    assert h["status"] == "ok"
    assert (h["step"], h["image_size"], h["image_threshold"]) == (model.step, model.image_size, model.image_threshold)
    assert (h["batch_size"], h["max_bytes"], h["max_pixels"]) == (BATCH, SETTINGS.max_bytes, SETTINGS.max_pixels)


def test_predict_answers_what_model_predict_says(server, model, images, truths):
    real = np.array([t.scores[0] for t in truths[:REAL]])
    decisions = set()
    for i in (int(real.argmin()), int(real.argmax()), len(images) - 1):  # the lowest, the highest, a non-square one
        status, answer = post(server, png(images[i]), "/predict?map=1")
        assert status == 200, answer
        assert_answer(model, answer, images[i], truths[i])
        decisions.add(answer["decision"])
        status, plain = post(server, png(images[i]))
        assert status == 200 and "map" not in plain and plain == {k: v for k, v in answer.items() if k != "map"}
    assert decisions == {"anomalous", "normal"}  # both branches of the decision were seen


def test_a_multipart_upload_answers_as_the_raw_body(server, model, images, truths):
    body, kind = multipart("image", png(images[-2]))
    status, answer = post(server, body, "/predict?map=1", kind)
    assert status == 200, answer
    assert_answer(model, answer, images[-2], truths[-2])


def test_other_formats_and_modes_are_read_as_model_predict_reads_them(server, model, images):
    """The server decodes and converts as Predictor.predict does for a PIL image
    (rdjax.data.preprocess.to_rgb)."""
    for mode, fmt in (("L", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("RGB", "JPEG"), ("RGB", "BMP"), ("RGB", "TIFF")):
        img = Image.fromarray(images[-1]).convert("L" if mode == "I;16" else mode)
        if mode == "I;16":
            img = Image.fromarray(np.asarray(img, np.uint16) * 257)
        assert img.mode == mode
        data = png(img, fmt)
        status, answer = post(server, data)
        assert status == 200, answer
        reopened = Image.open(io.BytesIO(data))
        assert_answer(model, answer, reopened, model.predict(reopened, batch_size=BATCH))


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "case, status, words",
    [
        ("text", 400, "not a readable image"),
        ("gif", 400, "not a PNG, JPEG, BMP, TIFF file"),
        ("empty", 400, "empty body"),
        ("truncated", 400, "not a readable image"),
        ("corrupt_crc", 400, "not a readable image"),
        ("too_many_bytes", 413, "--max_bytes"),
        ("too_many_pixels", 413, "--max_pixels"),
        ("bad_map_flag", 400, "map=1"),
        ("multipart_without_image", 400, "'image'"),
    ],
)
def test_a_bad_request_gets_a_4xx_and_one_line_and_the_server_goes_on(
    server, model, images, truths, case, status, words
):
    good = png(images[0])
    no_image, no_image_kind = multipart("picture", good)
    body, path, kind = {
        "text": (b"this is not an image\n", "/predict", "text/plain"),
        "gif": (png(images[0], "GIF"), "/predict", "image/gif"),
        "empty": (b"", "/predict", "image/png"),
        "truncated": (good[: len(good) // 2], "/predict", "image/png"),
        "corrupt_crc": (good[:-20] + bytes([good[-20] ^ 0xFF]) + good[-19:], "/predict", "image/png"),
        "too_many_bytes": (b"\0" * (SETTINGS.max_bytes + 1), "/predict", "image/png"),
        "too_many_pixels": (png(np.zeros((1001, 1000, 3), np.uint8)), "/predict", "image/png"),
        "bad_map_flag": (good, "/predict?map=maybe", "image/png"),
        "multipart_without_image": (no_image, "/predict", no_image_kind),
    }[case]
    got, answer = post(server, body, path, kind)
    assert got == status, answer
    assert list(answer) == ["error"] and words in answer["error"] and "\n" not in answer["error"]
    got, answer = post(server, good)  # the server still answers, and right
    assert got == 200
    assert_answer(model, answer, images[0], truths[0])


def test_other_routes_and_methods_answer_json(server):
    assert post(server, b"", "/nowhere") == (404, {"error": "Not Found"})
    status, kind, data = request(server, "GET", "/predict")
    assert (status, kind) == (405, "application/json") and json.loads(data) == {"error": "Method Not Allowed"}


class FailsWhenArmed:
    """A model whose next predict (or normalized_map) call raises once armed."""

    def __init__(self, model):
        self.model = model
        self.armed = self.map_armed = False

    def __getattr__(self, name):
        return getattr(self.model, name)

    def predict(self, images, batch_size=None, category=None):
        if self.armed:
            self.armed = False
            raise RuntimeError("simulated device failure")
        return self.model.predict(images, batch_size=batch_size, category=category)

    def normalized_map(self, amap, category=None):
        if self.map_armed:
            self.map_armed = False
            raise ZeroDivisionError("simulated bug")
        return self.model.normalized_map(amap, category)


def test_a_failing_model_call_answers_500_and_the_server_goes_on(model, images, truths):
    flaky = FailsWhenArmed(model)
    with serve.running(flaky, settings=SETTINGS) as url:
        flaky.armed = True
        status, answer = post(url, png(images[1]))
        assert status == 500 and "simulated device failure" in answer["error"] and "\n" not in answer["error"]
        assert not flaky.armed
        flaky.map_armed = True  # an unexpected error outside the model call
        status, answer = post(url, png(images[1]), "/predict?map=1")
        assert (status, answer) == (500, {"error": "internal error (ZeroDivisionError: simulated bug)"})
        status, answer = post(url, png(images[1]), "/predict?map=1")
        assert status == 200
        assert_answer(model, answer, images[1], truths[1])


# ----------------------------------------------------------------------------- batching under load


def load(url: str, bodies: list[bytes], order: list[int], clients: int, with_map_every: int) -> list:
    """``clients`` threads, each on one kept-alive connection, send their share of
    ``order`` one after another; (image index, status, answer) for every request."""
    parts = urllib.parse.urlsplit(url)
    answers: list = []
    lock = threading.Lock()

    def client(share: list[tuple[int, int]]) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        for n, i in share:
            path = "/predict?map=1" if n % with_map_every == 0 else "/predict"
            conn.request("POST", path, bodies[i], {"Content-Type": "image/png"})
            resp = conn.getresponse()
            row = (i, resp.status, json.loads(resp.read()))
            with lock:
                answers.append(row)
        conn.close()

    numbered = list(enumerate(order))
    threads = [threading.Thread(target=client, args=(numbered[c::clients],)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def check_load(url: str, model, images, truths, requests: int, clients: int, limit_s: float) -> None:
    bodies = [png(a) for a in images]
    order = [int(i) for i in np.random.default_rng(1).integers(0, len(images), requests)]
    before = health(url)
    start = time.monotonic()
    answers = load(url, bodies, order, clients, with_map_every=10)
    elapsed = time.monotonic() - start
    after = health(url)
    assert len(answers) == requests and elapsed < limit_s, (len(answers), elapsed)
    for i, status, answer in answers:
        assert status == 200, answer
        assert_answer(model, answer, images[i], truths[i])
    images_scored = after["images"] - before["images"]
    batches = after["batches"] - before["batches"]
    assert images_scored == requests
    assert images_scored / batches >= 2, (images_scored, batches)  # concurrent requests shared model calls


def test_concurrent_requests_are_batched_and_answered_exactly(server, model, images, truths):
    check_load(server, model, images, truths, requests=48, clients=8, limit_s=120)


@pytest.mark.slow
def test_a_thousand_requests_from_eight_clients(server, model, images, truths):
    check_load(server, model, images, truths, requests=1000, clients=8, limit_s=300)


# ----------------------------------------------------------------------------- the command


def parse(*argv: str) -> flags.FlagValues:
    args = ["rdjax serve", *argv]
    fv = flags.FlagValues()
    serve.define_flags(fv, args)
    fv(args)
    return fv


def test_flags_take_exactly_one_model_and_default_to_loopback():
    fv = parse("--workdir=w")
    assert (fv.host, fv.port, fv.batch_size, fv.max_wait_ms) == ("127.0.0.1", 8000, None, 5.0)
    assert (fv.max_bytes, fv.max_pixels, fv.dtype) == (Settings().max_bytes, 50_000_000, None)
    assert parse("--package=p").package == "p"
    for argv in ((), ("--workdir=w", "--package=p")):
        with pytest.raises(flags.IllegalFlagValueError, match="Exactly one of"):
            parse(*argv)


def test_without_the_server_stack_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # importlib.util.find_spec then finds nothing
    with pytest.raises(ConfigError, match=r"needs uvicorn: pip install 'rdjax\[serve\]'$"):
        serve.main(parse("--workdir=does/not/exist"), [])


def test_a_taken_port_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port} \(Address already in use\)"):
            serve.listen("127.0.0.1", port)


SERVE_MAIN = """
import sys
from absl import flags
from rdjax.serve import server as serve
argv = ["rdjax serve", *sys.argv[1:]]
fv = flags.FlagValues()
serve.define_flags(fv, argv)
fv(argv)
serve.main(fv, [])
"""


@pytest.mark.slow
def test_the_command_serves_until_ctrl_c(trained, model, images, truths):
    """main() as a user runs it: it prints its address (port 0: a free one), answers, and
    Ctrl-C stops it cleanly with status 0. On CPU the default batch size is 1."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_MAIN, f"--workdir={trained[1]}", "--port=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
        assert url and "batch size 1" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert health(url[1])["batch_size"] == 1
        status, answer = post(url[1], png(images[0]))
        assert status == 200
        assert_answer(model, answer, images[0], model.predict(images[0], batch_size=1))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out == "rdjax serve: stopped\n", (proc.returncode, out, err[-3000:])
    assert "Traceback" not in err, err[-3000:]


def test_settings_refuse_what_cannot_run():
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        Settings(batch_size=0)
    with pytest.raises(ConfigError, match="max_wait_ms"):
        Settings(max_wait_ms=-1)


# ----------------------------------------------------------------------------- the page


def jet_overlay(image: np.ndarray, level: np.ndarray) -> np.ndarray:
    """What the page draws: half the image, half the map in jet (its piecewise-linear
    formula), rounded half up as Math.round."""
    v = level.astype(np.float64)[..., None] / 255
    heat = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)
    return np.floor(0.5 * image + 127.5 * heat + 0.5).astype(np.uint8)


def test_the_page_shows_the_decision_and_the_overlay(server, browser, model, images, truths, tmp_path):
    i = int(np.argmax([t.scores[0] for t in truths[:REAL]]))  # the most anomalous part, 64 px
    path = tmp_path / "part.png"
    path.write_bytes(png(images[i]))
    page = browser.new_page(viewport={"width": 900, "height": 800})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('step')")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    truth = truths[i]
    assert page.locator("#decision").text_content() == ("NG" if truth.decisions[0] else "OK")
    assert abs(float(page.locator("#score").text_content()) - float(truth.scores[0])) <= 5e-7 + 1e-9
    assert abs(float(page.locator("#normalized").text_content()) - float(truth.normalized_scores[0])) <= 5e-4 + 1e-9
    src = page.locator("#overlay").get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    want = jet_overlay(images[i], levels(model, truth.maps[0]))
    assert shown.shape == images[i].shape
    assert np.abs(shown.astype(int) - want).max() <= 1
    assert np.abs(shown.astype(int) - images[i]).mean() > 10  # the heat is visible over the image
    page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)  # kept where the test fails
    assert problems == []
