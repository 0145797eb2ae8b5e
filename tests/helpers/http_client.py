"""A client for `rdjax serve` in tests: encode an image, send a request on a fresh
connection, read the JSON answer."""

from __future__ import annotations

import http.client
import io
import json
import urllib.parse

import numpy as np
from PIL import Image


def png(image: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format=fmt)
    return buf.getvalue()


def request(url: str, method: str, path: str, body: bytes | None = None, content_type: str = "image/png"):
    """(status, content type, body bytes) of one request on a fresh connection."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        conn.request(method, path, body, {"Content-Type": content_type} if body is not None else {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type", ""), resp.read()
    finally:
        conn.close()


def post(url: str, body: bytes, path: str = "/predict", content_type: str = "image/png") -> tuple[int, dict]:
    status, kind, data = request(url, "POST", path, body, content_type)
    assert kind == "application/json", (status, kind, data[:200])
    return status, json.loads(data)


def multipart(field: str, data: bytes, boundary: str = "rdjax-test-boundary") -> tuple[bytes, str]:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="part.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    )
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
