"""Errors over real HTTP: OpenAI's error shape under /v1 with the right status, ``param`` and
``code``; TGI's shape elsewhere, for FastAPI's own 404 / 405 / body errors too."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from openai import OpenAI

from safety_decoding.prompt import build_chat_prompt, build_raw_prompt
from server.app import create_app
from server.engine import Engine
from server.settings import Settings

from _server_helpers import (FailingDecoder, SlowDecoder, aborts, metric_value, serve, sse_data,
                             sse_payloads, wait_for_aborts)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": "m", "prompt": "Hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def url(tiny_model, tokenizer):
    engine = Engine(FailingDecoder(tiny_model, tokenizer, at_step=2, delay=0.01), max_num_seqs=1,
                    max_waiting=0)
    settings = Settings(max_new_tokens_limit=64, max_waiting=0, retry_after_seconds=3,
                        safety_action="monitor", sse_ping_seconds=0)
    with serve(create_app(engine, settings)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def _tgi_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"}
    return body


# ---- context length -------------------------------------------------------------------------


def test_a_prompt_longer_than_the_context_is_400_with_vllms_message(client, tokenizer,
                                                                   tiny_model):
    messages = [{"role": "user", "content": "word " * 2100}]
    n = len(build_chat_prompt(tokenizer, messages).ids)
    context = tiny_model.decoder.config.max_position_embeddings - 1
    assert n > context
    for max_tokens in (10, None):  # the prompt alone is at fault either way (vLLM's order)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens)
        err = info.value
        assert err.status_code == 400
        assert (err.type, err.code, err.param) == ("invalid_request_error",
                                                   "context_length_exceeded", "messages")
        assert err.body["message"] == (f"This model's maximum context length is {context} tokens. "
                                       f"However, your request has {n} input tokens. Please "
                                       f"reduce the length of the input messages.")


def test_a_completion_that_would_overflow_the_context_is_400_naming_max_tokens(client, tokenizer,
                                                                               tiny_model):
    context = tiny_model.decoder.config.max_position_embeddings - 1
    prompt = "word " * 2000
    n = len(build_raw_prompt(tokenizer, prompt).ids)
    assert n < context < n + 64
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt=prompt, max_tokens=64)
    assert info.value.param == "max_tokens" and info.value.code == "context_length_exceeded"
    assert info.value.body["message"] == (
        f"'max_tokens' or 'max_completion_tokens' is too large: 64. This model's maximum "
        f"context length is {context} tokens and your request has {n} input tokens "
        f"(64 > {context} - {n}).")
    ok = client.completions.create(model="m", prompt=prompt, max_tokens=context - n,
                                   temperature=0)
    assert ok.usage.total_tokens <= context


# ---- bad fields name themselves ------------------------------------------------------------


def test_n_2_is_400_naming_n_and_n_1_is_fine(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=CHAT["messages"], n=2, max_tokens=2)
    assert info.value.param == "n" and "n=1" in info.value.message
    r = client.chat.completions.create(model="m", messages=CHAT["messages"], n=1, max_tokens=2)
    assert len(r.choices) == 1


@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": "10"}, "max_tokens"),  # a JSON string is not an integer
    ({"max_tokens": 10.0}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 65}, "max_tokens"),  # the server's limit
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"stream": "true"}, "stream"),
    ({"top_p": 0}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"stop": ["a"] * 9}, "stop"),
    ({"stop": ""}, "stop[0]"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"42": 3}}, "logit_bias"),
    ({"n": 3}, "n"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"safety": {"threshold": 0.9}}, "safety.threshold"),  # weaker than the server's
    ({"safety": {"enabled": False}}, "safety.enabled"),
    ({"safety": {"schedule": "never"}}, "safety.schedule"),
])
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_bad_fields_are_400_naming_the_field(url, extra, param, route):
    body = {**(CHAT if route == "chat" else COMPLETION), **extra}
    r = httpx.post(f"{url}/v1/{'chat/' if route == 'chat' else ''}completions", json=body,
                   timeout=30)
    err = _openai_error(r, 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert err["message"].startswith(f"{param}:"), err["message"]


@pytest.mark.parametrize("extra, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "system", "content": "only a system turn"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}, "messages[1].content"),
    ({"max_completion_tokens": "3"}, "max_completion_tokens"),
    ({"max_completion_tokens": 65}, "max_completion_tokens"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_chat_fields_are_400_naming_the_field(url, extra, param):
    err = _openai_error(httpx.post(f"{url}/v1/chat/completions", json={**CHAT, **extra},
                                   timeout=30), 400)
    assert err["param"] == param, err


@pytest.mark.parametrize("extra, param", [
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [[1, 2]]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "<|im_start|>assistant\nSure, here is"}, "prompt"),  # a prefill with no request
    ({"echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 2}, "best_of"),
    ({"logprobs": 1}, "logprobs"),
])
def test_bad_completion_fields_are_400_naming_the_field(url, extra, param):
    err = _openai_error(httpx.post(f"{url}/v1/completions", json={**COMPLETION, **extra},
                                   timeout=30), 400)
    assert err["param"] == param, err


def test_unknown_and_neutral_fields_are_accepted(url):
    extra = {"user": "u1", "metadata": {"k": "v"}, "store": False, "unknown_field": [1],
             "n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False,
             "response_format": {"type": "text"}, "tool_choice": "none", "top_k": -1,
             "stop": None, "messages": [{"role": "developer", "content": "Be kind."},
                                        {"role": "user", "content": [{"type": "text",
                                                                      "text": "Hi"}]}]}
    r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, **extra}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_tgi_integer_fields_are_strict_too(url):
    for params, field in (({"max_new_tokens": "10"}, "parameters.max_new_tokens"),
                          ({"details": "true"}, "parameters.details"),
                          ({"seed": 1.0}, "parameters.seed")):
        err = _tgi_error(httpx.post(f"{url}/generate", json={"inputs": "Hi", "parameters": params},
                                    timeout=30), 400)
        assert err["error"].startswith(f"{field}:") and err["error_type"] == "validation"
    ok = httpx.post(f"{url}/generate", timeout=30,  # a float field still takes an integer
                    json={"inputs": "Hi", "parameters": {"max_new_tokens": 2, "temperature": 1}})
    assert ok.status_code == 200


# ---- FastAPI's own errors in our shapes -----------------------------------------------------


def test_unknown_routes_and_methods_answer_in_our_shapes(url):
    err = _openai_error(httpx.get(f"{url}/v1/nope", timeout=30), 404)
    assert "/v1/nope" in err["message"]
    assert "/nope" in _tgi_error(httpx.get(f"{url}/nope", timeout=30), 404)["error"]
    r = httpx.get(f"{url}/v1/chat/completions", timeout=30)
    assert "GET" in _openai_error(r, 405)["message"] and r.headers["allow"] == "POST"
    r = httpx.get(f"{url}/generate", timeout=30)
    assert _tgi_error(r, 405)["error_type"] == "method_not_allowed"


@pytest.mark.parametrize("body", [b'{"model": "m", "messages": [', b"\xff\xfe{}",
                                  b'{"prompt": "caf\xe9"}'])
def test_bodies_that_are_not_utf8_json_are_400_naming_the_body(url, body):
    headers = {"content-type": "application/json"}
    for path in ("/v1/chat/completions", "/v1/completions"):
        err = _openai_error(httpx.post(url + path, content=body, headers=headers, timeout=30),
                            400)
        assert err["param"] == "body" and err["message"].startswith("body:"), err
    tgi = _tgi_error(httpx.post(f"{url}/generate", content=body, headers=headers, timeout=30),
                     400)
    assert tgi["error"].startswith("body:")


def test_a_lone_surrogate_escape_is_400_naming_the_field(url):
    headers = {"content-type": "application/json"}
    body = b'{"model": "m", "messages": [{"role": "user", "content": "a\\udcffb"}]}'
    err = _openai_error(httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers,
                                   timeout=30), 400)
    assert err["param"] == "messages[0].content"
    tgi = _tgi_error(httpx.post(f"{url}/generate", content=b'{"inputs": "a\\udcff"}',
                                headers=headers, timeout=30), 400)
    assert tgi["error"].startswith("inputs:")


# ---- engine errors ---------------------------------------------------------------------------


def test_a_full_queue_is_429_in_openai_shape_with_retry_after(url, client):
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                      json={**CHAT, "max_tokens": 60, "stream": True}) as busy:
        lines = busy.iter_lines()  # kept: a dropped iterator closes the connection
        assert next(lines).startswith("data: ")  # the role chunk: the request is running
        r = httpx.post(f"{url}/v1/completions", json=COMPLETION, timeout=30)
        err = _openai_error(r, 429)
        assert r.headers["retry-after"] == "3" and err["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            client.completions.create(**COMPLETION)
    for _ in range(200):  # leaving the stream aborted the busy request
        r = httpx.post(f"{url}/v1/completions", json=COMPLETION, timeout=30)
        if r.status_code == 200:
            break
    assert r.status_code == 200


def test_a_generation_error_is_500_or_an_error_chunk_before_done(url):
    body = {**CHAT, "messages": [{"role": "user", "content": "boom"}], "max_tokens": 10}
    err = _openai_error(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30), 500)
    assert err["type"] == "server_error" and "device fell over" in err["message"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                      json={**body, "stream": True}) as r:
        assert r.status_code == 200
        text = r.read().decode()
    payloads = sse_payloads(text)
    assert payloads[-1] == "[DONE]"
    chunks = sse_data(text.replace("data: [DONE]", ""))
    assert chunks[-1]["error"]["type"] == "server_error"
    assert "device fell over" in chunks[-1]["error"]["message"]
    assert all("choices" in c for c in chunks[:-1])
    ok = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
    assert ok.status_code == 200


# ---- clients that leave ------------------------------------------------------------------------




def _wait_until_running(url, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        if metric_value(text, "ess_num_requests_running") == 1:
            return
        time.sleep(0.02)
    raise AssertionError("the request never started")


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT),
                                        ("/v1/completions", COMPLETION)])
def test_leaving_a_stream_or_a_pending_response_aborts_the_request(url, path, body):
    before = aborts(url)
    with httpx.stream("POST", url + path, timeout=30,
                      json={**body, "max_tokens": 64, "stream": True}) as r:
        assert r.status_code == 200
        # Not a first chunk: text the safety policy holds back may not have been sent yet.
        _wait_until_running(url)
    wait_for_aborts(url, before + 1)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + path, json={**body, "max_tokens": 64},
                   timeout=httpx.Timeout(5, read=0.2))
    wait_for_aborts(url, before + 2)


def test_an_engine_that_is_not_running_is_503_in_openai_shape(tiny_model, tokenizer):
    app = create_app(Engine(SlowDecoder(tiny_model, tokenizer)), Settings())
    with serve(app, lifespan="off") as base:  # the engine never starts
        err = _openai_error(httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=30),
                            503)
        assert err["type"] == "server_error"
        tgi = _tgi_error(httpx.post(f"{base}/generate", json={"inputs": "Hi"}, timeout=30), 503)
        assert tgi["error_type"] == "unavailable"
        assert httpx.get(f"{base}/health", timeout=30).status_code == 503
