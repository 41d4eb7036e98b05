"""ESS_MAX_BODY_BYTES and ESS_BODY_TIMEOUT_SECONDS (`server.body_limit`) over a real socket: a
body over the limit gets 413 in the route's error shape, whether its size is announced or it
arrives chunked, one that drips in gets 408, and the server goes on serving."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from server.app import create_app
from server.body_limit import content_length, too_large_message
from server.engine import Engine
from server.settings import Settings

from _server_helpers import SlowDecoder, serve

LIMIT = 2000


@pytest.fixture(scope="module")
def url(tiny_model, tokenizer):
    app = create_app(Engine(SlowDecoder(tiny_model, tokenizer, delay=0)), Settings(max_body_bytes=LIMIT,
                                                                                body_timeout_seconds=1.0))
    with serve(app) as url:
        yield url


def _chunks(data: bytes, size: int = 500):
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("path, body", [
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    ("/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 2}),
])
def test_a_body_over_the_limit_is_413_naming_the_setting(url, path, body, chunked):
    big = json.dumps({**body, "junk": "x" * 3 * LIMIT}).encode()  # /v1 ignores unknown fields
    content = _chunks(big) if chunked else big
    r = httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413, r.text
    message = r.json()["error"]["message"] if path.startswith("/v1") else r.json()["error"]
    assert message.startswith("body: ") and "ESS_MAX_BODY_BYTES" in message
    if path.startswith("/v1"):
        assert r.json()["error"]["param"] == "body"
    if not chunked:
        assert str(len(big)) in message
    # the same request within the limit is served, on a new connection and the same server
    ok = httpx.post(url + path, json=body, timeout=30)
    assert ok.status_code == 200, ok.text


def test_content_length_and_message():
    assert content_length({"headers": [(b"content-length", b"123")]}) == 123
    assert content_length({"headers": [(b"content-length", b"x1")]}) is None
    assert content_length({"headers": []}) is None
    assert too_large_message(None, 10) == "body: over the limit of 10 bytes (ESS_MAX_BODY_BYTES)"
    assert too_large_message(12, 10) == "body: 12 bytes, over the limit of 10 bytes (ESS_MAX_BODY_BYTES)"


def test_a_body_that_drips_in_is_408_at_the_deadline(url):
    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"inputs\": ")
        t0 = time.monotonic()
        answer = sock.recv(4096).decode()
        waited = time.monotonic() - t0
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "connection: close" in answer.lower() and "ESS_BODY_TIMEOUT_SECONDS" in answer
    assert 0.8 < waited < 5
    assert httpx.post(url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
                      timeout=30).status_code == 200
