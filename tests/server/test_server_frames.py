"""`sse_frames` with scripted library events: TGI's stream shape for every finish path."""

from __future__ import annotations

import asyncio
import json

from safety_decoding.decode import StepEvent, TokenOutput
from safety_decoding.types import FinishReason
from server.errors import field_path, validation_message
from server.tgi.routes import sse_frames
from server.engine import EngineError

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


def _tok(i, text):
    return TokenOutput(i, text, -0.5, False)


def _frames(items, seed=None, prefix=""):
    stream = _Scripted(items)

    async def collect():
        return [json.loads(ev.data) async for ev in sse_frames(stream, seed, prefix, 2)]

    out = asyncio.run(collect())
    assert stream.closed
    return out


def _final(reason, tokens, safety=SAFE, n=None):
    return StepEvent(0, tokens, reason, safety, prompt_tokens=7,
                     generated_tokens=n if n is not None else 0)


def test_empty_texts_still_make_events_and_the_last_token_carries_the_text():
    events = _frames([StepEvent(0, [_tok(10, "He"), _tok(11, "")]),
                      _final(FinishReason.LENGTH, [_tok(12, "llo")], n=3)], seed=5)
    assert [e["token"]["id"] for e in events] == [10, 11, 12]
    assert [e["index"] for e in events] == [1, 2, 3]
    last = events[-1]
    assert last["generated_text"] == "Hello"
    assert last["details"] == {"finish_reason": "length", "generated_tokens": 3, "seed": 5,
                               "input_length": 7, "safety": SAFE}
    assert last["safety"] == SAFE


def test_eos_ends_with_a_special_token_event_like_tgi():
    events = _frames([StepEvent(0, [_tok(10, "Hi")]),
                      _final(FinishReason.EOS, [_tok(11, "!")], n=2)])
    assert [e["token"]["special"] for e in events] == [False, False, True]
    assert events[-1]["token"] == {"id": 2, "text": "", "logprob": None, "special": True}
    assert events[-1]["generated_text"] == "Hi!"
    assert events[1]["generated_text"] is None


def test_eos_with_nothing_released_at_the_end():
    events = _frames([StepEvent(0, [_tok(10, "Hi")]), _final(FinishReason.EOS, [], n=1)])
    assert len(events) == 2 and events[-1]["details"]["finish_reason"] == "eos_token"


def test_stop_sequence_and_content_filter_names():
    stop = _frames([_final(FinishReason.STOP_SEQUENCE, [_tok(10, "a")], n=1)])
    assert stop[-1]["details"]["finish_reason"] == "stop_sequence"
    refused = _frames([_final(FinishReason.LENGTH, [_tok(10, "Sorry")], safety=TRIPPED, n=1)])
    assert refused[-1]["details"]["finish_reason"] == "content_filter"


def test_return_full_text_prefixes_the_final_text():
    events = _frames([_final(FinishReason.LENGTH, [_tok(10, "b")], n=1)], prefix="a")
    assert events[-1]["generated_text"] == "ab"


def test_errors_mid_stream_become_a_tgi_error_event():
    events = _frames([StepEvent(0, [_tok(10, "Hi")]), EngineError("generation failed: boom")])
    assert events[-1] == {"error": "generation failed: boom", "error_type": "generation"}
    aborted = _frames([_final(FinishReason.ABORT, [])])
    assert aborted[-1]["error_type"] == "generation" and "aborted" in aborted[-1]["error"]


def test_field_paths_and_messages():
    assert field_path(("body", "parameters", "stop", 2)) == "parameters.stop[2]"
    assert field_path(("body",)) == "body"
    msg = validation_message([{"type": "json_invalid", "loc": ("body", 5),
                               "ctx": {"error": "Expecting value"}},
                              {"type": "missing", "loc": ("body", "inputs"),
                               "msg": "Field required"}])
    assert msg == "body: invalid JSON (Expecting value); inputs: Field required"
