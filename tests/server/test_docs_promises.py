"""Every status code and error message README.md and docs/operations.md promise, checked
against real responses of the app on the tiny model.

The list of statuses and the wording of the context-length messages are read from
docs/operations.md ("Errors and status codes"), so a status the docs add without a test here,
or a message the docs and the server word differently, fails.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import anyio
import pytest
from fastapi.testclient import TestClient

from safety_decoding.decode import Decoder
from safety_decoding.prompt import build_chat_prompt, build_raw_prompt
from server.app import create_app
from server.engine import Engine
from server.handling import longest_token
from server.settings import Settings

from _server_helpers import FailingDecoder, SlowDecoder, metric_value, sse_data, sse_payloads

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
README = (ROOT / "README.md").read_text()
KEY = "k-docs"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def _section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section, whitespace folded to single spaces."""
    body = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return " ".join(body.split())


ERRORS_DOC = _section(OPERATIONS, "Errors and status codes")


def _documented_statuses() -> set[int]:
    """The statuses in the first column of the errors table."""
    rows = [line for line in _section_lines(OPERATIONS, "Errors and status codes")
            if line.startswith("| ") and not line.startswith("| status")]
    return {int(s) for row in rows for s in re.findall(r"\b[1-5]\d\d\b", row.split("|")[1])}


def _section_lines(text: str, heading: str) -> list[str]:
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0].splitlines()


def _template(prefix: str) -> re.Pattern:
    """The documented message that starts with ``prefix``, its number placeholders (C, N, M,
    L) as named groups: a quoted span of the errors section."""
    quoted = re.findall(r"``(.+?)``|`([^`]+)`", ERRORS_DOC)
    texts = [a.strip() or b for a, b in quoted if (a.strip() or b).startswith(prefix)]
    assert len(texts) == 1, (prefix, texts)
    pattern, seen = "", set()
    for part in re.split(r"\b([CNML])\b", texts[0]):
        if part in ("C", "N", "M", "L"):
            pattern += f"(?P={part})" if part in seen else f"(?P<{part}>\\d+)"
            seen.add(part)
        else:
            pattern += re.escape(part)
    return re.compile(pattern)


def _numbers(pattern: re.Pattern, message: str) -> dict[str, int]:
    match = pattern.fullmatch(message)
    assert match, (pattern.pattern, message)
    return {k: int(v) for k, v in match.groupdict().items()}


# ---- apps -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_model, tokenizer):
    """"boom" prompts fail at the second step (424 / 500 on demand)."""
    engine = Engine(FailingDecoder(tiny_model, tokenizer, at_step=2, delay=0.01))
    app = create_app(engine, Settings(max_new_tokens_limit=64, sse_ping_seconds=0))

    @app.get("/test-only/raise")
    async def _raise():
        raise ValueError("not for clients")

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def small_input(tiny_model, tokenizer):
    """``ESS_MAX_INPUT_TOKENS=60``: the input limit and the character bound on demand."""
    app = create_app(Engine(Decoder(tiny_model, tokenizer)), Settings(max_input_tokens=60))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def context(tiny_model) -> int:
    return tiny_model.decoder.config.max_position_embeddings - 1


def _running(engine: Engine) -> float:
    return metric_value(engine.metrics.exposition().decode(), "ess_num_requests_running")


def _tgi(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "error_type"}
    return r.json()


def _openai(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_every_documented_status_is_checked_here():
    checked = {400, 401, 404, 405, 408, 413, 422, 424, 429, 499, 500, 503, 504}  # 408, 413: test_body_limit.py
    assert _documented_statuses() == checked


# ---- 400: a bad field, named ------------------------------------------------------------------


def test_a_bad_field_is_400_starting_with_its_path_on_tgi_routes(client):
    for route in ("/generate", "/generate_stream", "/"):
        err = _tgi(client.post(route, json={"inputs": "Hi", "parameters": {"top_p": 2}}), 400)
        assert err["error_type"] == "validation"
        assert err["error"].startswith("parameters.top_p: ")
    err = _tgi(client.post("/generate", json={"inputs": "Hi",
                                              "parameters": {"max_new_tokens": 65}}), 400)
    assert err["error"] == "parameters.max_new_tokens: must be <= 64 on this server"
    err = _tgi(client.post("/generate", content=b"\xff",
                           headers={"content-type": "application/json"}), 400)
    assert err["error"].startswith("body: ")


def test_a_bad_field_is_400_naming_it_in_param_under_v1(client):
    for extra, param in (({"logprobs": True}, "logprobs"), ({"max_tokens": 65}, "max_tokens"),
                         ({"n": 2}, "n"), ({"top_p": 2}, "top_p")):
        err = _openai(client.post("/v1/chat/completions", json={**CHAT, **extra}), 400)
        assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, None)
        assert err["message"].startswith(f"{param}: ")


# ---- an input that does not fit ---------------------------------------------------------------


def test_v1_prompt_alone_over_the_context_is_vllms_400(client, tokenizer, context):
    messages = [{"role": "user", "content": "word " * 2100}]
    n = len(build_chat_prompt(tokenizer, messages).ids)
    err = _openai(client.post("/v1/chat/completions",
                              json={"model": "m", "messages": messages, "max_tokens": 10}), 400)
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error",
                                                        "context_length_exceeded", "messages")
    pattern = _template("This model's maximum context length is C tokens. However")
    assert _numbers(pattern, err["message"]) == {"C": context, "N": n}


def test_v1_prompt_plus_max_tokens_over_the_context_is_vllms_400(client, tokenizer, context):
    prompt = "word " * 2000
    n = len(build_raw_prompt(tokenizer, prompt).ids)
    chat = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    for route, body, field in (("/v1/completions", {"prompt": prompt}, "max_tokens"),
                               ("/v1/chat/completions", chat, "max_completion_tokens")):
        err = _openai(client.post(route, json={**body, field: 64}), 400)
        assert (err["code"], err["param"]) == ("context_length_exceeded", field)
        got = _numbers(_template("'max_tokens' or 'max_completion_tokens' is too large"),
                       err["message"])
        assert got["M"] == 64 and got["C"] == context and got["N"] >= n


def test_v1_input_limit_and_character_bound_are_400_context_length_exceeded(small_input,
                                                                            tokenizer):
    text = "word " * 100
    n = len(build_raw_prompt(tokenizer, text).ids)
    err = _openai(small_input.post("/v1/completions", json={"prompt": text}), 400)
    assert (err["code"], err["param"]) == ("context_length_exceeded", "prompt")
    pattern = _template("This server's maximum input length is L tokens")
    assert _numbers(pattern, err["message"]) == {"L": 60, "N": n}
    chars = 60 * longest_token(tokenizer)[0] + 1
    err = _openai(small_input.post("/v1/completions", json={"prompt": "y" * chars}), 400)
    assert (err["code"], err["param"]) == ("context_length_exceeded", "prompt")
    assert err["message"] == ("This server's maximum input length is 60 tokens. However, your "
                              f"request has {chars} input characters, more than 60 tokens can "
                              "hold. Please reduce the length of the input messages.")
    assert "N input characters, more than L tokens can hold" in ERRORS_DOC
    # under the character bound, but 2 bytes a character once normalized: refused untokenized
    nbytes = 60 * longest_token(tokenizer)[1] + 2
    err = _openai(small_input.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "\u0436" * (nbytes // 2)}]}), 400)
    assert (err["code"], err["param"]) == ("context_length_exceeded", "messages")
    assert err["message"] == ("This server's maximum input length is 60 tokens. However, your "
                              f"request has {nbytes} bytes of input text, more than 60 tokens can "
                              "hold. Please reduce the length of the input messages.")
    assert "N bytes of input text, more than L tokens can hold" in ERRORS_DOC
    # each message costs 5 template tokens: 13 empty ones cannot fit 60, refused untemplated
    err = _openai(small_input.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": ""}] * 13}), 400)
    assert (err["code"], err["param"]) == ("context_length_exceeded", "messages")
    assert err["message"] == ("This server's maximum input length is 60 tokens. However, your "
                              "request has 13 messages, more than 60 tokens can hold. Please "
                              "reduce the number of messages.")
    assert "N messages, more than L tokens can hold" in ERRORS_DOC
    # so are a raw prompt's turns, counted by their template markers
    err = _openai(small_input.post("/v1/completions", json={
        "prompt": "<|im_start|>user\nx<|im_end|>\n" * 13}), 400)
    assert (err["param"], err["message"]) == ("prompt", (
        "This server's maximum input length is 60 tokens. However, your request has 13 messages, "
        "more than 60 tokens can hold. Please reduce the number of messages."))
    # 12 pass that bound and are templated: over 60 tokens with the template's system turn
    err = _openai(small_input.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": ""}] * 12}), 400)
    assert "input tokens" in err["message"]


def test_tgi_prompt_plus_max_new_tokens_over_the_context_is_tgis_422(client, tokenizer, context):
    inputs = "word " * 2000
    n = len(build_chat_prompt(tokenizer, [{"role": "user", "content": inputs}]).ids)
    assert n < context < n + 64
    for route in ("/generate", "/generate_stream", "/"):
        err = _tgi(client.post(route, json={"inputs": inputs,
                                            "parameters": {"max_new_tokens": 64}}), 422)
        assert err["error_type"] == "validation"
        pattern = _template("Input validation error: `inputs` tokens + `max_new_tokens`")
        assert _numbers(pattern, err["error"]) == {"C": context, "N": n, "M": 64}


def test_tgi_prompt_over_a_limit_is_tgis_422(client, small_input, tokenizer, context):
    pattern = _template("Input validation error: `inputs` must have less than L tokens")
    inputs = "word " * 100  # over ESS_MAX_INPUT_TOKENS
    n = len(build_chat_prompt(tokenizer, [{"role": "user", "content": inputs}]).ids)
    err = _tgi(small_input.post("/generate", json={"inputs": inputs}), 422)
    assert err["error_type"] == "validation"
    assert _numbers(pattern, err["error"]) == {"L": 60, "N": n}
    inputs = "word " * 2100  # the prompt alone fills the context, max_new_tokens unset
    n = len(build_chat_prompt(tokenizer, [{"role": "user", "content": inputs}]).ids)
    err = _tgi(client.post("/generate", json={"inputs": inputs}), 422)
    assert _numbers(pattern, err["error"]) == {"L": context, "N": n}
    chars = 60 * longest_token(tokenizer)[0] + 1
    err = _tgi(small_input.post("/generate", json={"inputs": "y" * chars}), 422)
    assert err["error"] == ("Input validation error: `inputs` must have less than 60 tokens. "
                            f"Given: {chars} characters, more than 60 tokens can hold")
    assert "Given: N characters, more than L tokens can hold" in ERRORS_DOC
    nbytes = 60 * longest_token(tokenizer)[1] + 2
    err = _tgi(small_input.post("/generate", json={"inputs": "\u0436" * (nbytes // 2),
                                                   "parameters": {"raw": True}}), 422)
    assert err["error"] == ("Input validation error: `inputs` must have less than 60 tokens. "
                            f"Given: {nbytes} bytes of text, more than 60 tokens can hold")
    assert "Given: N bytes of text, more than L tokens can hold" in ERRORS_DOC


def test_readme_and_operations_state_the_same_context_length_statuses():
    assert "422" in README and "context_length_exceeded" in README
    assert "400 (`/v1`), 422 (TGI routes)" in ERRORS_DOC
    row = next(line for line in OPERATIONS.splitlines() if line.startswith("| `ESS_MAX_INPUT"))
    assert "422 on the TGI routes, 400 `context_length_exceeded` under `/v1`" in row


# ---- 401: API keys ----------------------------------------------------------------------------


def test_401_without_a_key_on_every_route_but_health(tiny_model, tokenizer):
    app = create_app(Engine(Decoder(tiny_model, tokenizer)), Settings(api_keys=KEY))
    with TestClient(app) as c:
        err = _tgi(c.post("/generate", json={"inputs": "Hi"}), 401)
        assert err["error_type"] == "authentication"
        r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        err = _openai(r, 401)
        assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200  # open to scrapers by default
        ok = c.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
                    headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
    app = create_app(Engine(Decoder(tiny_model, tokenizer)),
                     Settings(api_keys=KEY, metrics_require_auth=True))
    with TestClient(app) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# ---- 404 / 405 / 500 internal ----------------------------------------------------------------


def test_routing_errors_and_unexpected_ones_have_the_routes_shape(client):
    assert _tgi(client.get("/nope"), 404)["error_type"] == "not_found"
    assert _tgi(client.get("/generate"), 405)["error_type"] == "method_not_allowed"
    err = _openai(client.get("/v1/nope"), 404)
    assert (err["type"], err["code"]) == ("invalid_request_error", None)
    err = _tgi(client.get("/test-only/raise"), 500)
    assert err == {"error": "internal error: ValueError", "error_type": "internal"}


# ---- 424 / 500: a failed generation -----------------------------------------------------------


def test_a_failed_generation_is_424_on_tgi_routes_and_500_under_v1(client):
    boom = {"inputs": "boom", "parameters": {"max_new_tokens": 10}}
    err = _tgi(client.post("/generate", json=boom), 424)
    assert err["error_type"] == "generation" and "device fell over" in err["error"]
    err = _openai(client.post("/v1/completions",
                              json={"prompt": "boom", "max_tokens": 10}), 500)
    assert (err["type"], err["code"]) == ("server_error", None)
    # Once a stream started, its status is 200 and the failure is one error event.
    r = client.post("/generate_stream", json=boom)
    assert r.status_code == 200 and sse_data(r.text)[-1]["error_type"] == "generation"
    r = client.post("/v1/completions", json={"prompt": "boom", "max_tokens": 10,
                                             "stream": True})
    payloads = sse_payloads(r.text)
    assert r.status_code == 200 and payloads[-1] == "[DONE]"
    assert '"error"' in payloads[-2] and '"server_error"' in payloads[-2]


# ---- 429: queue full --------------------------------------------------------------------------


def test_a_full_queue_is_429_with_retry_after(tiny_model, tokenizer):
    engine = Engine(SlowDecoder(tiny_model, tokenizer, delay=0.05), max_num_seqs=1,
                    max_waiting=0)
    app = create_app(engine, Settings(max_waiting=0, retry_after_seconds=3, sse_ping_seconds=0))
    with TestClient(app) as c, c.stream("POST", "/generate_stream", json={
            "inputs": "Hi", "parameters": {"max_new_tokens": 500, "ignore_eos": True}}) as busy:
        next(busy.iter_lines())  # the first frame: the request is running (for 25 s)
        r = c.post("/generate", json={"inputs": "Hi"})
        assert r.headers["retry-after"] == "3"
        assert _tgi(r, 429) == {"error": "Model is overloaded", "error_type": "overloaded"}
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.headers["retry-after"] == "3"
        err = _openai(r, 429)
        assert (err["message"], err["type"], err["code"]) == (
            "Model is overloaded", "rate_limit_exceeded", "rate_limit_exceeded")
    assert "| 429 | the queue is full (`ESS_MAX_WAITING`): `Model is overloaded`" in OPERATIONS


# ---- 499: the client left ---------------------------------------------------------------------


def test_a_client_leaving_a_whole_response_is_499_and_counted_as_an_abort(tiny_model, tokenizer,
                                                                          caplog):
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    engine = Engine(SlowDecoder(tiny_model, tokenizer, delay=0.02))
    app = create_app(engine, Settings(sse_ping_seconds=0))
    body = b'{"inputs": "Hi", "parameters": {"max_new_tokens": 500, "ignore_eos": true}}'

    async def leave_after_start():
        sent, received = [], iter([{"type": "http.request", "body": body}])

        async def receive():
            message = next(received, None)
            if message is not None:
                return message
            while _running(engine) < 1:  # the request is decoding
                await anyio.sleep(0.01)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/generate", "raw_path": b"/generate",
                 "query_string": b"", "root_path": "", "server": ("test", 80),
                 "client": ("test", 1), "headers": [(b"content-type", b"application/json")]}
        await app(scope, receive, send)
        return sent

    with TestClient(app) as c:
        sent = c.portal.call(leave_after_start)
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
        assert b"".join(m.get("body", b"") for m in sent[1:]) == b""
        assert 'test:1 - "POST /generate HTTP/1.1" 499' in caplog.text  # uvicorn logs none
        for _ in range(200):
            if metric_value(c.get("/metrics").text, "ess_requests_total",
                            'finish_reason="abort"') == 1:
                break
            time.sleep(0.02)
        assert metric_value(c.get("/metrics").text, "ess_requests_total",
                            'finish_reason="abort"') == 1


# ---- 503: not running, draining, aborted by shutdown -----------------------------------------


def test_503_while_the_engine_is_not_running_and_health_until_warm(tiny_model, tokenizer):
    app = create_app(Engine(Decoder(tiny_model, tokenizer)), Settings())
    plain = TestClient(app)  # no lifespan: the engine never starts
    assert plain.get("/health").status_code == 503
    assert _tgi(plain.post("/generate", json={"inputs": "Hi"}), 503)["error_type"] == "unavailable"
    err = _openai(plain.post("/v1/chat/completions", json=CHAT), 503)
    assert err["type"] == "server_error"
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200


def test_503_with_retry_after_while_draining(tiny_model, tokenizer):
    app = create_app(Engine(Decoder(tiny_model, tokenizer)), Settings(retry_after_seconds=2))
    with TestClient(app) as c:
        app.state.drain.begin()
        r = c.post("/generate", json={"inputs": "Hi"})
        assert _tgi(r, 503)["error_type"] == "unavailable"
        assert (r.headers["retry-after"], r.headers["connection"]) == ("2", "close")
        assert _openai(c.post("/v1/chat/completions", json=CHAT), 503)["type"] == "server_error"
        r = c.get("/health")
        assert (r.status_code, r.json()) == (503, {"status": "draining"})


def test_a_whole_response_aborted_by_shutdown_is_503(tiny_model, tokenizer):
    engine = Engine(SlowDecoder(tiny_model, tokenizer, delay=0.02))
    app = create_app(engine, Settings())
    with TestClient(app) as c:
        result = {}
        worker = threading.Thread(target=lambda: result.update(r=c.post("/generate", json={
            "inputs": "Hi", "parameters": {"max_new_tokens": 500, "ignore_eos": True}})))
        worker.start()
        for _ in range(500):
            if _running(engine) >= 1:
                break
            time.sleep(0.01)
        c.portal.call(engine.stop)
        worker.join(30)
        err = _tgi(result["r"], 503)
        assert err["error_type"] == "unavailable" and "shutting down" in err["error"]


# ---- 504: request timeout ---------------------------------------------------------------------


def test_a_request_timeout_is_504_or_a_timeout_event(tiny_model, tokenizer):
    engine = Engine(SlowDecoder(tiny_model, tokenizer, delay=0.02), request_timeout=0.3)
    long = {"inputs": "Hi", "parameters": {"max_new_tokens": 60, "ignore_eos": True}}
    with TestClient(create_app(engine, Settings(sse_ping_seconds=0))) as c:
        assert _tgi(c.post("/generate", json=long), 504)["error_type"] == "timeout"
        err = _openai(c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 60,
                                                      "ignore_eos": True}), 504)
        assert (err["type"], err["code"]) == ("server_error", "timeout")
        events = sse_data(c.post("/generate_stream", json=long).text)
        assert events[-1]["error_type"] == "timeout"
