"""Real clients over real HTTP (uvicorn on localhost, the tiny random model): the `openai`
package against /v1, huggingface_hub's InferenceClient against the TGI routes.

The server runs the `monitor` safety action so the random head never replaces the model's
text with the refusal: these tests are about the protocol, not the policy.
"""

from __future__ import annotations

import httpx
import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI

from safety_decoding.decode import Decoder
from safety_decoding.prompt import build_chat_prompt, build_raw_prompt
from server.app import create_app
from server.engine import Engine
from server.settings import Settings

from _server_helpers import serve, sse_data, sse_payloads

MODEL = "tiny-ess-test"
SETTINGS = Settings(model_name=MODEL, max_new_tokens_limit=64, safety_action="monitor",
                    sse_ping_seconds=0)
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def url(tiny_model, tokenizer):
    with serve(create_app(Engine(Decoder(tiny_model, tokenizer)), SETTINGS)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, **kw)


def _stream_chunks(client, **kw) -> list:
    return list(_chat(client, stream=True, **kw))


def test_models_lists_the_served_checkpoint(client, tiny_model):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    max_positions = tiny_model.decoder.config.max_position_embeddings
    assert models[0].model_extra["max_model_len"] == max_positions - 1  # [CLS] takes one


def test_chat_completion_has_openai_shape_and_exact_usage(client, tokenizer):
    r = _chat(client, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    prompt = build_chat_prompt(tokenizer, MESSAGES)
    assert r.usage.prompt_tokens == len(prompt.ids)
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == len(prompt.ids) + 6
    assert r.model_extra["safety"]["action"] == "monitor"


def test_chat_stream_equals_non_stream_for_the_same_seed(client):
    kw = dict(max_tokens=24, temperature=0.9, seed=1234)
    full = _chat(client, **kw)
    chunks = _stream_chunks(client, **kw)
    first, final = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert final.choices[0].finish_reason == full.choices[0].finish_reason == "length"
    assert final.choices[0].delta.content is None and final.choices[0].delta.role is None
    assert final.model_extra["safety"]["checks"] == full.model_extra["safety"]["checks"]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == full.choices[0].message.content
    assert len(streamed) > 10
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != full.id
    other = _chat(client, max_tokens=24, temperature=0.9, seed=4321)
    assert other.choices[0].message.content != streamed  # the seed matters


def test_completions_stream_equals_non_stream_for_the_same_seed(client, tokenizer):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0.8, seed=7)
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.id.startswith("cmpl-")
    assert full.usage.prompt_tokens == len(build_raw_prompt(tokenizer, "Once upon a time").ids)
    chunks = list(client.completions.create(stream=True, **kw))
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].choices[0].text == ""
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert len(full.choices[0].text) > 10


def test_a_prompt_list_of_one_is_one_prompt(client):
    kw = dict(model=MODEL, max_tokens=5, temperature=0)
    one = client.completions.create(prompt=["Hello"], **kw)
    assert one.choices[0].text == client.completions.create(prompt="Hello", **kw).choices[0].text


def test_stop_string_picked_from_the_models_own_text_ends_the_stream_before_it(client):
    kw = dict(max_tokens=40, temperature=0.9, seed=99)
    text = _chat(client, **kw).choices[0].message.content
    # Four letters from the middle of the text: they split or span this text's tokens.
    start = next(i for i in range(12, len(text) - 4) if text[i:i + 4].isascii()
                 and text[i:i + 4].isalpha())
    stop = text[start:start + 4]
    expected = text[:text.find(stop)]
    assert len(expected) >= 12
    chunks = _stream_chunks(client, stop=stop, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    whole = _chat(client, stop=[stop], **kw)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("options, usage_chunks", [
    ({"include_usage": True}, 1), ({"include_usage": False}, 0), ({}, 0), (None, 0)])
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_include_usage_adds_exactly_one_usage_chunk_before_done(url, options, usage_chunks,
                                                                route):
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "stream": True}
    if route == "chat":
        body["messages"] = MESSAGES
    else:
        body["prompt"] = "Hello"
    if options is not None:
        body["stream_options"] = options
    with httpx.stream("POST", f"{url}/v1/{'chat/' if route == 'chat' else ''}completions",
                      json=body, timeout=60) as r:
        assert r.status_code == 200
        text = r.read().decode()
    payloads = sse_payloads(text)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    chunks = sse_data(text.replace("data: [DONE]", ""))
    with_usage = [c for c in chunks if c.get("usage")]
    assert len(with_usage) == usage_chunks
    if usage_chunks:
        assert chunks[-1] is with_usage[0] and chunks[-1]["choices"] == []
        u = chunks[-1]["usage"]
        assert u["completion_tokens"] == 4
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1])  # OpenAI's shape
    else:
        assert all("usage" not in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_openai_client_reads_the_usage_chunk(client):
    chunks = _stream_chunks(client, max_tokens=3, temperature=0,
                            stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_max_completion_tokens_bounds_the_chat(client):
    r = _chat(client, max_completion_tokens=2, max_tokens=9, temperature=0)
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"


# ---- huggingface_hub against the TGI routes -------------------------------------------------


def test_huggingface_hub_text_generation_matches_generate(url):
    # Given a server URL, InferenceClient posts {"inputs", "parameters", "stream"} to the URL
    # itself: TGI's compat route `POST /`, which serves both the stream and the whole text.
    hf = InferenceClient(base_url=url, timeout=60)
    kw = dict(max_new_tokens=12, temperature=0.7, seed=5)
    text = hf.text_generation("Tell me a story.", **kw)
    direct = httpx.post(f"{url}/generate", timeout=60, json={
        "inputs": "Tell me a story.", "parameters": kw}).json()["generated_text"]
    assert text == direct and len(text) > 5
    details = hf.text_generation("Tell me a story.", details=True, **kw)
    assert details.generated_text == text
    assert details.details.finish_reason == "length" and details.details.generated_tokens == 12
    assert details.details.seed == 5
    streamed = list(hf.text_generation("Tell me a story.", stream=True, **kw))
    assert "".join(streamed) == text
    events = list(hf.text_generation("Tell me a story.", stream=True, details=True, **kw))
    assert events[-1].generated_text == text
    assert events[-1].details.finish_reason == "length"


def test_tgi_compat_route_switches_on_stream(url):
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 3}}
    whole = httpx.post(f"{url}/", json=body, timeout=60)
    assert whole.status_code == 200
    (one,) = whole.json()  # TGI wraps the /generate body in a list here
    assert one["generated_text"] == httpx.post(f"{url}/generate", json=body,
                                               timeout=60).json()["generated_text"]
    with httpx.stream("POST", f"{url}/", json={**body, "stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_data(r.read().decode())
    assert events[-1]["generated_text"] == one["generated_text"]
