"""Streamed text over real HTTP, with a model that writes a known text: multi-byte characters
whose bytes are split across tokens are never split across chunks, and a stop string never
leaks a fragment, whichever token boundaries it crosses."""

from __future__ import annotations

import httpx
import pytest

from safety_decoding.decode import Decoder
from safety_decoding.prompt import build_chat_prompt
from server.app import create_app
from server.engine import Engine
from server.settings import Settings

from _server_helpers import scripted_text_model, serve, sse_data

TEXT = "Hello! 你好，世界 🌍🎉 The answer is 42; café ✓ done."
MESSAGES = [{"role": "user", "content": "Say the line."}]


@pytest.fixture(scope="module")
def templated(tokenizer) -> str:
    """The chat prompt as raw text: /v1/completions gets the same tokens as the chat route,
    so one scripted model serves both."""
    return tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def script(tokenizer) -> list[int]:
    return tokenizer(TEXT, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def url(tokenizer, script):
    n = len(build_chat_prompt(tokenizer, MESSAGES).ids)
    model = scripted_text_model(tokenizer, n, script)
    app = create_app(Engine(Decoder(model, tokenizer)),
                     Settings(safety_action="monitor", sse_ping_seconds=0))
    with serve(app) as base:
        yield base


def _body(route: str, templated: str, **kw) -> dict:
    body = {"model": "m", "max_tokens": 60, **kw}
    if route == "chat":
        body["messages"] = MESSAGES
    else:
        body["prompt"] = templated
    return body


def _path(route: str) -> str:
    return "/v1/chat/completions" if route == "chat" else "/v1/completions"


def _piece(chunk: dict) -> str:
    choice = chunk["choices"][0]
    return (choice["delta"].get("content") or "") if "delta" in choice else choice["text"]


def _stream(url, route, templated, **kw) -> list[dict]:
    with httpx.stream("POST", url + _path(route), timeout=60,
                      json=_body(route, templated, stream=True, **kw)) as r:
        assert r.status_code == 200, r.read()
        return sse_data(r.read().decode().replace("data: [DONE]", ""))


def _whole(url, route, templated, **kw) -> dict:
    r = httpx.post(url + _path(route), timeout=60, json=_body(route, templated, **kw))
    assert r.status_code == 200, r.text
    return r.json()


def _whole_text(body: dict) -> str:
    choice = body["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_the_script_splits_characters_across_tokens(tokenizer, script):
    # Without this the UTF-8 test below would prove nothing.
    assert tokenizer.decode(script) == TEXT
    assert sum("\ufffd" in tokenizer.decode([t]) for t in script) >= 6


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_multibyte_characters_are_never_broken_in_a_stream(url, templated, script, route):
    chunks = _stream(url, route, templated)
    pieces = [_piece(c) for c in chunks]
    assert not any("\ufffd" in p for p in pieces), pieces
    assert "".join(pieces) == TEXT
    assert len([p for p in pieces if p]) < len(script)  # held bytes left with the next token
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"  # EOS
    whole = _whole(url, route, templated)
    assert _whole_text(whole) == TEXT
    assert whole["usage"]["completion_tokens"] == len(script)


@pytest.mark.parametrize("stop", [
    "answer is",   # two whole tokens
    "swer i",      # starts and ends inside tokens
    "世界",         # characters whose bytes are split across tokens
    "🎉",
    ["nowhere", "42;"],  # the first match of several
])
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_stop_string_never_leaks_a_fragment(url, templated, route, stop):
    first = min(TEXT.find(s) for s in ([stop] if isinstance(stop, str) else stop)
                if s in TEXT)
    expected = TEXT[:first]
    chunks = _stream(url, route, templated, stop=stop)
    streamed = "".join(_piece(c) for c in chunks)
    assert streamed == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    whole = _whole(url, route, templated, stop=stop)
    assert _whole_text(whole) == expected
    assert whole["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_held_back_stop_prefix_is_released_when_the_stop_does_not_follow(url, templated,
                                                                            route):
    # " answer" and "done" look like the start of these stop strings until the next token.
    chunks = _stream(url, route, templated, stop=["answer was", "done!"])
    assert "".join(_piece(c) for c in chunks) == TEXT
    assert _whole_text(_whole(url, route, templated, stop=["answer was", "done!"])) == TEXT


def test_max_tokens_defaults_to_16_on_completions_only(url, templated, script):
    """OpenAI's defaults: 16 tokens on /v1/completions when max_tokens is unset or null, and as
    many as fit on chat."""
    assert len(script) > 16
    for body in ({"model": "m", "prompt": templated}, {"model": "m", "prompt": templated, "max_tokens": None}):
        short = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert short["usage"]["completion_tokens"] == 16 and short["choices"][0]["finish_reason"] == "length"
    chat = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, timeout=60).json()
    assert chat["choices"][0]["message"]["content"] == TEXT
