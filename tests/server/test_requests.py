"""The one request path's pure rules (`server.requests`): which bound an over-long input
breaks, where a prompt is built, the completion budget, and how each protocol words the error
(no model, no HTTP)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from types import SimpleNamespace

import pytest

from server.openai.routes import too_long_message as vllm_message
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import Prompt
from safety_decoding.sampling import SamplingParams
from server.requests import (INLINE_PROMPT_CHARS, INLINE_PROMPT_TURNS, Limits, Overflow, Serving,
                             TooLong, builds_inline, chars_overflow, completion_budget,
                             tokens_overflow, utf8_size)
from server.tgi.routes import too_long_message as tgi_message

LIMITS = Limits(max_new_tokens=64, max_input_tokens=80, context=100, token_chars=10, token_bytes=10, turn_tokens=0)


def test_the_character_bound_is_max_input_tokens_times_the_longest_token():
    assert chars_overflow(800, 800, 1, LIMITS) is None
    assert chars_overflow(801, 801, 1, LIMITS) == TooLong(Overflow.CHARS, 80, 801)


def test_the_bytes_as_sent_are_bound_before_normalization():
    notes = "\U0001d160" * 201  # 4 bytes each; NFC makes each three characters
    assert chars_overflow(len(notes), utf8_size([notes]), 1, LIMITS) == TooLong(Overflow.BYTES, 80, 804)
    assert chars_overflow(200, utf8_size(["\U0001d160" * 200]), 1, LIMITS) is None
    assert utf8_size(["\ud800", "\u00e9"]) == 5  # a lone surrogate from a JSON escape counts


def test_the_message_bound_is_max_input_tokens_over_a_messages_template_tokens():
    limits = Limits(max_new_tokens=64, max_input_tokens=80, context=100, token_chars=10, token_bytes=10, turn_tokens=5)
    assert chars_overflow(0, 0, 16, limits) is None
    assert chars_overflow(0, 0, 17, limits) == TooLong(Overflow.TURNS, 80, 17)
    assert chars_overflow(0, 0, 10**6, LIMITS) is None  # a template that drops empty messages: no bound


@pytest.mark.parametrize("prompt, max_new, expected", [
    (80, None, None),                                   # at the input limit: fits
    (81, None, TooLong(Overflow.INPUT, 80, 81)),
    (80, 20, None),                                     # exactly the context
    (80, 21, TooLong(Overflow.CONTEXT, 100, 80, 21)),
])
def test_tokens_overflow(prompt, max_new, expected):
    assert tokens_overflow(prompt, max_new, LIMITS) == expected


def test_the_prompt_alone_can_fill_the_context():
    limits = Limits(max_new_tokens=64, max_input_tokens=4096, context=100, token_chars=10, token_bytes=10, turn_tokens=0)
    assert tokens_overflow(99, None, limits) is None  # one token of room
    assert tokens_overflow(100, None, limits) == TooLong(Overflow.CONTEXT, 100, 100)
    assert tokens_overflow(100, 1, limits) == TooLong(Overflow.CONTEXT, 100, 100, 1)


def test_completion_budget():
    assert completion_budget(10, None, LIMITS) == 64   # the server's limit
    assert completion_budget(50, None, LIMITS) == 50   # the rest of the context
    assert completion_budget(50, 7, LIMITS) == 7       # what was asked for
    assert completion_budget(10, None, LIMITS, default=16) == 16  # a protocol's default
    assert completion_budget(95, None, LIMITS, default=16) == 5   # ... where it fits
    assert completion_budget(10, None, dataclasses.replace(LIMITS, max_new_tokens=4),
                             default=16) == 4                     # ... under the server's limit


def test_tgi_wording_is_tgis_validation_error():
    assert (tgi_message(TooLong(Overflow.CONTEXT, 2047, 2010, 64))
            == "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 2047. "
               "Given: 2010 `inputs` tokens and 64 `max_new_tokens`")
    assert (tgi_message(TooLong(Overflow.INPUT, 200, 401))
            == "Input validation error: `inputs` must have less than 200 tokens. Given: 401")
    assert (tgi_message(TooLong(Overflow.CONTEXT, 2047, 2100))
            == "Input validation error: `inputs` must have less than 2047 tokens. Given: 2100")
    assert tgi_message(TooLong(Overflow.CHARS, 60, 4861)).startswith(
        "Input validation error: `inputs` must have less than 60 tokens. Given: 4861 characters")


def test_openai_wording_is_vllms():
    assert (vllm_message(TooLong(Overflow.CONTEXT, 2047, 2010, 64))
            == "'max_tokens' or 'max_completion_tokens' is too large: 64. This model's maximum "
               "context length is 2047 tokens and your request has 2010 input tokens "
               "(64 > 2047 - 2010).")
    alone = ("This model's maximum context length is 2047 tokens. However, your request has "
             "2100 input tokens. Please reduce the length of the input messages.")
    assert vllm_message(TooLong(Overflow.CONTEXT, 2047, 2100)) == alone
    assert vllm_message(TooLong(Overflow.CONTEXT, 2047, 2100, 10)) == alone
    assert "maximum input length is 80 tokens" in vllm_message(TooLong(Overflow.INPUT, 80, 81))


class _Adapter:
    """A protocol adapter that records the thread its prompt is built on."""

    max_new_tokens_field, safety_field, max_new_tokens, default_max_new_tokens = "max_tokens", "safety", 4, None
    safety, trace, input_chars, input_bytes, input_turns, raw_text = None, False, 10, 10, 1, None

    def __init__(self, prompt_inline: bool):
        self.prompt_inline, self.thread = prompt_inline, None

    def check(self):
        pass

    def build_prompt(self, tokenizer, max_client_bytes):
        self.thread = threading.current_thread()
        return Prompt((1, 2, 3), (True, True, False), 3)

    def sampling_params(self, max_new_tokens):
        return SamplingParams(max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("inline", [True, False])
def test_prepare_builds_the_prompt_where_the_adapter_says(inline):
    limits = Limits(max_new_tokens=64, max_input_tokens=100, context=200, token_chars=10, token_bytes=10, turn_tokens=0)
    serving = Serving(SimpleNamespace(tokenizer=None), None, SafetyParams(), limits)
    adapter = _Adapter(inline)

    async def prepare():
        await serving.prepare(adapter)
        return threading.current_thread()

    loop_thread = asyncio.run(prepare())
    assert (adapter.thread is loop_thread) == inline


@pytest.mark.parametrize("texts, inline", [
    (["x" * INLINE_PROMPT_CHARS], True),                       # a typical chat request: no thread hop
    (["x" * 10] * INLINE_PROMPT_TURNS, True),
    (["x" * (INLINE_PROMPT_CHARS // 2 + 1)] * 2, False),       # long input: off the event loop
    (["x"] * (INLINE_PROMPT_TURNS + 1), False),                # many short turns: template work
    (["Привет, как дела?"], False),                             # non-ASCII: normalization's scans
])
def test_only_small_ascii_chat_prompts_are_built_inline(texts, inline):
    assert builds_inline(texts) == inline


def test_raw_prompts_are_built_off_the_event_loop():
    """A raw prompt splits at every template marker, a tokenizer call per piece: never inline."""
    from server.openai.routes import OpenAIRequest
    from server.openai.schemas import ChatCompletionRequest, CompletionRequest
    from server.tgi.routes import TGIRequest
    from server.tgi.schemas import GenerateRequest

    assert OpenAIRequest(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])).prompt_inline
    assert not OpenAIRequest(CompletionRequest(model="m", prompt="hi")).prompt_inline
    assert TGIRequest(GenerateRequest(inputs="hi")).prompt_inline
    assert not TGIRequest(GenerateRequest(inputs="hi", parameters={"raw": True})).prompt_inline
