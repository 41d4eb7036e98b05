"""The pure pieces of the OpenAI layer with scripted library events (no model, no HTTP): the
finish-reason mapping, the chunk sequence for every finish path."""

from __future__ import annotations

import asyncio
import json

import pytest

from safety_decoding.decode import StepEvent, TokenOutput
from safety_decoding.types import FinishReason
from server.engine import EngineError, EngineNotRunning
from server.errors import is_openai_path
from server.openai.routes import openai_frames
from server.openai.schemas import Completion, openai_finish_reason

SAFE = {"intervened": False, "checks": 2}
TRIPPED = {"intervened": True, "stage": "response", "checks": 5}


class _Scripted:
    """Stands in for `RequestStream`: yields the given items, raising exceptions."""

    def __init__(self, items):
        self.items, self.closed = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self):
        self.closed = True


def _step(text, reason=None, safety=None, n=0):
    return StepEvent(0, [TokenOutput(1, text, -0.1, False)] if text is not None else [], reason,
                     safety, prompt_tokens=7, generated_tokens=n)


def _frames(items, chat=True, include_usage=False) -> list:
    stream = _Scripted(items)
    shape = Completion("chatcmpl-x", 1, "m", chat, include_usage)

    async def collect():
        return [ev.data async for ev in openai_frames(stream, shape)]

    out = asyncio.run(collect())
    assert stream.closed
    assert out[-1] == "[DONE]" and out.count("[DONE]") == 1
    return [json.loads(d) for d in out[:-1]]


@pytest.mark.parametrize("reason, safety, expected", [
    (FinishReason.EOS, SAFE, "stop"), (FinishReason.STOP_SEQUENCE, SAFE, "stop"),
    (FinishReason.LENGTH, SAFE, "length"), (FinishReason.LENGTH, TRIPPED, "content_filter"),
    (FinishReason.EOS, TRIPPED, "content_filter"), (FinishReason.LENGTH, None, "length"),
])
def test_finish_reasons_map_to_openai_words(reason, safety, expected):
    assert openai_finish_reason(_step("", reason, safety)) == expected


def test_an_aborted_or_unfinished_event_has_no_openai_finish_reason():
    with pytest.raises(ValueError):
        openai_finish_reason(_step("", FinishReason.ABORT, SAFE))
    with pytest.raises(ValueError):
        openai_finish_reason(_step("", None))


def test_chat_chunks_role_text_final_then_done():
    chunks = _frames([_step("He"), _step(""), _step("llo", FinishReason.LENGTH, SAFE, n=3)])
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "He"},
                      {"content": "llo"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert chunks[-1]["safety"] == SAFE and all("safety" not in c for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


def test_completion_chunks_have_text_and_no_role():
    chunks = _frames([_step("a"), _step("b", FinishReason.EOS, TRIPPED, n=2)], chat=False)
    assert [c["choices"][0]["text"] for c in chunks] == ["a", "b", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert {c["object"] for c in chunks} == {"text_completion"}


def test_usage_chunk_comes_last_with_empty_choices():
    chunks = _frames([_step("a", FinishReason.LENGTH, SAFE, n=1)], include_usage=True)
    assert chunks[-1] == {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1,
                          "model": "m", "choices": [],
                          "usage": {"prompt_tokens": 7, "completion_tokens": 1,
                                    "total_tokens": 8}}
    assert all(c["usage"] is None for c in chunks[:-1])


@pytest.mark.parametrize("item, kind", [
    (EngineError("generation failed: boom"), "server_error"),
    (EngineNotRunning("the server is shutting down"), "server_error"),
    (_step("", FinishReason.ABORT, SAFE), "server_error"),
])
def test_errors_mid_stream_are_one_error_chunk_before_done(item, kind):
    chunks = _frames([_step("Hi"), item])
    assert chunks[-1]["error"]["type"] == kind and chunks[-1]["error"]["message"]
    assert set(chunks[-1]["error"]) == {"message", "type", "param", "code"}
    assert "choices" in chunks[-2]


def test_openai_paths():
    assert is_openai_path("/v1") and is_openai_path("/v1/chat/completions")
    assert not is_openai_path("/v10/x") and not is_openai_path("/generate")


def test_the_role_chunk_waits_for_the_first_event():
    """Sent with the first event (after the prefill, as vLLM and llama.cpp send it): a request
    that fails before any event gets only its error chunk."""
    stream = _Scripted([_step("Hi", FinishReason.EOS, SAFE, n=1)])
    shape = Completion("chatcmpl-x", 1, "m", True, False)

    async def first_frame_before_the_stream_is_read():
        frames = openai_frames(stream, shape)
        pending = len(stream.items)
        first = json.loads((await frames.__anext__()).data)
        await frames.aclose()
        return pending, first

    pending, first = asyncio.run(first_frame_before_the_stream_is_read())
    assert pending == 1 and first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert not stream.items  # the event was read before the role chunk left
    chunks = _frames([EngineError("generation failed: boom")])
    assert len(chunks) == 1 and "error" in chunks[0]
