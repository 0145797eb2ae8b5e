"""Hostile and careless clients against a real `rdjax serve` on a loopback port (issue 34).

One test per defect the probe found: each sends what an attacker (or a broken camera)
would, asserts the status the server must give, and then that the server still scores a
good image. Every wait is bounded. The model is the shared trained run; where a test needs
a request held inside the model, `Gated` holds it (a closed gate), so what is in memory
at that moment is known rather than raced. Timeouts are set to fractions of a second here
(rdjax.serve.limits.Settings), so the slow-client cases take about a second each.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
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
from PIL import Image

import rdjax
from rdjax import cli
from rdjax.errors import ConfigError
from rdjax.serve import app
from rdjax.serve import server as serve
from rdjax.serve.limits import Settings

LARGE = 1000  # side of the large images: 1 Mpx, 20 MB of budget each (rdjax.serve.limits.BYTES_PER_PIXEL)
# Room for one large image and a few small ones, not for two large ones.
BUDGET = 30 * 2**20
LIMITS = Settings(
    batch_size=1,
    max_wait_ms=0,
    max_bytes=2_000_000,
    max_pixels=5_000_000,
    max_queue=1,
    max_memory=BUDGET,
    max_connections=4,
    header_timeout_s=0.5,
    body_timeout_s=0.5,
    keep_alive_s=1,
)


# ----------------------------------------------------------------------------- helpers


def png(side: int, value: int = 0) -> bytes:
    """A flat RGB PNG: a few KB however large, as a bomb-like upload would be."""
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


GOOD = png(64, 128)


def call(
    url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request on a fresh connection."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, body, {"Content-Type": "image/png", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def refused(url: str, status: int, words: str, body: bytes = GOOD, path: str = "/predict", **headers: str) -> dict:
    """Assert a request gets ``status`` and a one-line JSON reason holding ``words``."""
    got, head, data = call(url, "POST", path, body, headers)
    answer = json.loads(data)
    assert got == status and list(answer) == ["error"], (got, answer)
    assert words in answer["error"] and "\n" not in answer["error"], answer
    return head


def still_answers(url: str, **headers: str) -> None:
    """The server scores a good image (a few tries: a connection closed just before may
    still count against the cap until the server has seen it go)."""
    for _ in range(50):
        try:
            status, _, data = call(url, "POST", "/predict", GOOD, headers)
        except ConnectionError:
            status, data = 0, b""
        if status == 200:
            assert "score" in json.loads(data)
            return
        time.sleep(0.05)
    raise AssertionError(f"the server no longer answers: {status} {data[:200]!r}")


def health(url: str, **headers: str) -> dict:
    status, _, data = call(url, "GET", "/health", headers=headers)
    assert status == 200, data
    return json.loads(data)


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def raw(url: str) -> socket.socket:
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` within its 5 s timeout (False: still open)."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class Gated:
    """The model, whose predict waits while `holding`: a request held there keeps its
    memory lease, and ``entered`` says it has arrived."""

    def __init__(self, model) -> None:
        self.model = model
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    @contextlib.contextmanager
    def holding(self):
        self.entered.clear()
        self.gate.clear()
        try:
            yield
        finally:
            self.gate.set()

    def predict(self, images, batch_size=None, category=None):
        self.entered.set()
        assert self.gate.wait(30)
        return self.model.predict(images, batch_size=batch_size, category=category)


def in_background(fn, *args) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    return thread, out


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gated(trained) -> Gated:
    return Gated(rdjax.load(trained[1]))


@pytest.fixture(scope="module")
def server(gated):
    with serve.running(gated, settings=LIMITS) as url:
        yield url


@pytest.fixture
def decodes(monkeypatch) -> list[tuple[int, ...]]:
    """The shape of every image the server decodes, in order."""
    seen: list[tuple[int, ...]] = []
    decode = app.decode

    def counted(data: bytes) -> np.ndarray:
        image = decode(data)
        seen.append(image.shape)
        return image

    monkeypatch.setattr(app, "decode", counted)
    return seen


# ----------------------------------------------------------------------------- 1. memory


@pytest.mark.slow  # timeouts and a burst take a second or so; the fast tier's budget
def test_a_burst_of_large_images_gets_503_with_retry_after_and_a_small_image_still_passes(server, gated, decodes):
    """Finding 1: decoded images queued without bound (16 large PNGs: 4.9 GB). Now one
    large image holds the budget and the rest of the burst is refused before decoding."""
    with gated.holding():
        first, first_answer = in_background(call, server, "POST", "/predict", png(LARGE))
        assert gated.entered.wait(30)
        for _ in range(8):  # the burst, while the first is in the model
            head = refused(server, 503, "--max_memory", png(LARGE))
            assert head["retry-after"] == "1"
        assert decodes == [(LARGE, LARGE, 3)]  # the refused ones were never decoded
        small, small_answer = in_background(call, server, "POST", "/predict", GOOD)
        wait_for(lambda: health(server)["waiting"] == 1)  # admitted: it waits for the model, not for memory
    first.join(30)
    small.join(30)
    assert first_answer[0][0] == 200 and small_answer[0][0] == 200
    assert health(server)["memory_in_use"] == 0  # every lease returned
    still_answers(server)


def test_an_image_the_budget_can_never_hold_is_413(server, decodes):
    side = 1300  # 1.69 Mpx x 20 B: 32 MiB, more than the 30 MiB budget, less than max_pixels
    refused(server, 413, f"{side}x{side} RGB image needs", png(side))
    assert decodes == []
    still_answers(server)


def test_a_full_queue_answers_503_with_retry_after(server, gated):
    """Finding 9: a 503 carried no Retry-After."""
    with gated.holding():
        held, held_answer = in_background(call, server, "POST", "/predict", GOOD)
        assert gated.entered.wait(30)
        queued, queued_answer = in_background(call, server, "POST", "/predict", GOOD)
        wait_for(lambda: health(server)["waiting"] == 1)
        head = refused(server, 503, "--max_queue")
        assert head["retry-after"] == "1"
    held.join(30)
    queued.join(30)
    assert held_answer[0][0] == queued_answer[0][0] == 200
    still_answers(server)


# ----------------------------------------------------------------------------- 7. timeouts and connections


@pytest.mark.slow  # timeouts and a burst take a second or so; the fast tier's budget
def test_incomplete_headers_are_cut_off_after_the_header_timeout(server):
    """Finding 7: a connection with incomplete headers stayed open indefinitely."""
    sock = raw(server)
    start = time.monotonic()
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
    assert closed_by_server(sock) and time.monotonic() - start < 3
    sock.close()
    still_answers(server)


@pytest.mark.slow  # timeouts and a burst take a second or so; the fast tier's budget
def test_a_stalled_body_gets_408(server):
    """Finding 7: a stalled body held its connection (and its part of the body) forever."""
    sock = raw(server)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                 b"Content-Length: 100000\r\n\r\n" + GOOD[:100])  # fmt: skip
    reply = b""
    while chunk := sock.recv(65536):  # the answer, then the close (the next request's headers never come)
        reply += chunk
    sock.close()
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408"), reply
    assert "--body_timeout_s=0.5" in reply.split("\r\n\r\n", 1)[1]
    still_answers(server)


def test_connections_beyond_the_cap_are_closed(gated):
    """Finding 7: 300 idle connections held 300 file descriptors."""
    settings = Settings(max_connections=4, header_timeout_s=30, batch_size=1)
    with serve.running(gated, settings=settings) as url:
        idle = [raw(url) for _ in range(4)]
        health_sock = raw(url)  # the fifth
        assert closed_by_server(health_sock)
        health_sock.close()
        for sock in idle:
            sock.close()
        still_answers(url)


# ----------------------------------------------------------------------------- access from elsewhere


def test_a_token_is_required_when_set(gated):
    settings = Settings(token="s3cret", batch_size=1)
    with serve.running(gated, settings=settings) as url:
        assert refused(url, 401, "token")["www-authenticate"] == "Bearer"
        refused(url, 401, "token", Authorization="Bearer s3cre")
        refused(url, 401, "token", Authorization="s3cret")
        assert call(url, "GET", "/health")[0] == 401
        assert call(url, "GET", "/")[0] == 200  # the page, which sends the token itself
        health(url, Authorization="Bearer s3cret")
        still_answers(url, Authorization="Bearer s3cret")


def test_a_foreign_host_header_is_refused(server):
    """DNS rebinding: a page of attacker.example re-pointed to this machine sends its name."""
    port = urllib.parse.urlsplit(server).port
    refused(server, 421, "--allow_host", Host=f"attacker.example:{port}")
    refused(server, 421, "--allow_host", Host="")
    assert call(server, "POST", "/predict", GOOD, {"Host": f"localhost:{port}"})[0] == 200
    still_answers(server)


def test_a_cross_origin_text_plain_post_is_not_scored(server):
    """Finding 9: any web page could post an image as text/plain (no preflight) and have it scored."""
    refused(server, 403, "attacker.example", **{"Content-Type": "text/plain", "Origin": "http://attacker.example"})
    refused(server, 403, "another site", **{"Content-Type": "text/plain", "Sec-Fetch-Site": "cross-site"})
    own = call(server, "POST", "/predict", GOOD, {"Origin": server, "Sec-Fetch-Site": "same-origin"})
    assert own[0] == 200 and "access-control-allow-origin" not in own[1]
    still_answers(server)


@pytest.mark.slow  # timeouts and a burst take a second or so; the fast tier's budget
def test_an_allowed_origin_gets_cors(gated):
    settings = Settings(allow_origins=("http://allowed.example",), batch_size=1)
    with serve.running(gated, settings=settings) as url:
        origin = {"Origin": "http://allowed.example"}
        status, head, _ = call(url, "OPTIONS", "/predict", headers={**origin, "Access-Control-Request-Method": "POST"})
        assert status == 204 and "POST" in head["access-control-allow-methods"]
        status, head, _ = call(url, "POST", "/predict", GOOD, origin)
        assert status == 200 and head["access-control-allow-origin"] == "http://allowed.example"
        refused(url, 403, "other.example", Origin="http://other.example")
        still_answers(url)


def test_health_names_no_local_path(server, trained):
    """Finding 9: /health showed the model's absolute path."""
    text = json.dumps(health(server))
    workdir = Path(trained[1]).resolve()
    assert str(workdir.parent) not in text and str(workdir.parent.parent) not in text
    assert health(server)["model"] == workdir.name


@pytest.mark.slow
def test_a_non_loopback_bind_warns_and_takes_the_token_from_the_environment(trained):
    """The command on 0.0.0.0: a warning at start, and the token of $RDJAX_SERVE_TOKEN."""
    env = {**os.environ, "RDJAX_SERVE_TOKEN": "from-env"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdjax", "serve", f"--workdir={trained[1]}", "--host=0.0.0.0", "--port=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        port = re.search(r"at http://0\.0\.0\.0:(\d+)/", line)
        assert port, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = f"http://127.0.0.1:{port[1]}"
        refused(url, 401, "token")
        still_answers(url, Authorization="Bearer from-env")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    warnings = [w for w in err.splitlines() if w.startswith("warning: rdjax serve listens on 0.0.0.0:")]
    assert len(warnings) == 1 and "unencrypted" in warnings[0], err[-3000:]


# ----------------------------------------------------------------------------- 9. misleading details


def test_max_pixels_above_pillows_own_cap_is_refused_in_one_line(capsys):
    """Finding 9: beyond Pillow's cap (2 x Image.MAX_IMAGE_PIXELS) Pillow refuses first,
    and the answer named --max_pixels for images under it."""
    cap = 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ConfigError, match=rf"max_pixels must be at most {cap} \(Pillow's own limit\)"):
        Settings(max_pixels=cap + 1)
    assert cli.invoke(["serve", "--workdir=unused", f"--max_pixels={cap + 1}"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: serve: max_pixels must be at most"), errors


def test_a_multipart_body_cut_short_says_it_is_incomplete(server):
    """Finding 9: it said 'without a file field'."""
    boundary = "rdjax-boundary"
    whole = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + GOOD
        + f"\r\n--{boundary}--\r\n".encode()
    )
    kind = f"multipart/form-data; boundary={boundary}"
    refused(server, 400, "incomplete multipart form", whole[: len(whole) // 2], **{"Content-Type": kind})
    assert call(server, "POST", "/predict", whole, {"Content-Type": kind})[0] == 200
    still_answers(server)


def test_the_help_lists_every_limit(capsys):
    assert cli.invoke(["serve", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("max_bytes", "max_pixels", "max_queue", "max_memory", "max_connections", "header_timeout_s",
                 "body_timeout_s", "keep_alive_s", "token", "allow_origin", "allow_host"):  # fmt: skip
        assert f"--{flag}" in text, flag
