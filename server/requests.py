"""One request path for both protocols: `Serving.prepare` turns a request body into the
library's `GenerationRequest`, and `Serving.collect` gathers a whole (non-streamed) response.

The TGI routes (`server.tgi.routes`) and the OpenAI routes (`server.openai.routes`) differ only
in what a `RequestAdapter` supplies: field names for errors, how to build the `Prompt` and the
`SamplingParams`, and how to word an input that does not fit. vLLM's OpenAI server is split the
same way: one serving base (``entrypoints/openai/serving_engine.py``) and protocol modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import anyio
from fastapi import Request

from safety_decoding.decode import GenerationRequest, StepEvent
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import ClientTextTooLong, Prompt, PromptError, raw_turns
from safety_decoding.sampling import SamplingParams
from safety_decoding.types import FinishReason, ParameterError

from .engine import Engine, EngineError, EngineNotRunning, RequestStream
from .errors import ClientDisconnected, InvalidRequest
from .handling import context_length, longest_token, tokens_per_turn
from .settings import Settings
from .tgi.schemas import SafetyOverrides, to_safety_params

ABORTED = "the request was aborted: the server is shutting down"
"""The error a request aborted by shutdown gets (503, or an error event on a stream)."""
INLINE_PROMPT_CHARS, INLINE_PROMPT_TURNS = 4096, 8
"""The largest input whose prompt is built on the event loop (`builds_inline`): characters of
client text, and texts (turns)."""


# ---- limits and the over-long rule ---------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one request may use on this server (tokens, unless said)."""

    max_new_tokens: int
    """``ESS_MAX_NEW_TOKENS_LIMIT``: the largest max_new_tokens a request may ask for."""
    max_input_tokens: int
    """``ESS_MAX_INPUT_TOKENS``: the longest prompt after templating."""
    context: int
    """Prompt + completion (`handling.context_length`: the model's positions minus ``[CLS]``)."""
    token_chars: int
    """Characters in the longest vocabulary entry (`handling.longest_token`)."""
    token_bytes: int
    """UTF-8 bytes in the longest vocabulary entry (`handling.longest_token`)."""
    turn_tokens: int
    """Template tokens each chat message costs at least (`handling.tokens_per_turn`)."""

    @property
    def max_client_bytes(self) -> int:
        """The most UTF-8 bytes of normalized client text ``max_input_tokens`` tokens can hold
        (`prompt.encode_segments`)."""
        return self.max_input_tokens * self.token_bytes


class Overflow(Enum):
    """Which bound an over-long request broke, in the order they are checked."""

    CHARS = "chars"
    """More characters than ``max_input_tokens`` tokens can hold (before templating)."""
    TURNS = "turns"
    """More messages than ``max_input_tokens`` tokens can hold (before templating)."""
    BYTES = "bytes"
    """More UTF-8 bytes of normalized client text than ``max_input_tokens`` tokens can hold
    (before tokenizing)."""
    INPUT = "input"
    """More prompt tokens than ``max_input_tokens``."""
    CONTEXT = "context"
    """The prompt alone, or prompt + max_new_tokens, exceeds the context."""


@dataclass(frozen=True)
class TooLong:
    """An input that does not fit: the numbers a protocol's error message quotes."""

    kind: Overflow
    limit: int
    """Tokens: ``max_input_tokens`` (CHARS, TURNS, BYTES, INPUT) or the context (CONTEXT)."""
    given: int
    """Characters (CHARS), messages (TURNS), bytes (BYTES) or prompt tokens (INPUT, CONTEXT)."""
    max_new_tokens: int | None = None
    """The request's max_new_tokens (CONTEXT; None when unset)."""


def utf8_size(texts: Iterable[str]) -> int:
    """UTF-8 bytes of ``texts`` as sent (a lone surrogate from a JSON escape counts 3)."""
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


def chars_overflow(chars: int, nbytes: int, turns: int, limits: Limits) -> TooLong | None:
    """Why a prompt of ``chars`` characters (``nbytes`` UTF-8 bytes as sent) in ``turns``
    messages cannot fit ``max_input_tokens`` tokens, or None.

    Our choice: bounds checked before templating and tokenizing, so a multi-megabyte body, or
    100,000 empty messages (36 s of templating before the token limit refused them, in session
    22's attack review), is refused at once while other streams go on: no token is longer than
    ``token_chars``, and each message costs ``turn_tokens`` template tokens, so the prompt would
    be over the token limit anyway. The bytes as sent are held to `Limits.max_client_bytes`
    too, before normalization (which `prompt.encode_segments` checks again after it): NFC can
    triple a text (``"\U0001D160"``, a musical note, becomes three characters), and astral text
    costs the most to normalize (4.5 s for 331,772 such notes, session 23's third attack review).
    Normalization can also shrink text (a full-width space is 3 bytes, the space it becomes 1),
    so text whose disguise is what makes it long is refused by its size as sent: our choice.
    """
    if chars > limits.max_input_tokens * limits.token_chars:
        return TooLong(Overflow.CHARS, limits.max_input_tokens, chars)
    if nbytes > limits.max_client_bytes:
        return TooLong(Overflow.BYTES, limits.max_input_tokens, nbytes)
    if turns * limits.turn_tokens > limits.max_input_tokens:
        return TooLong(Overflow.TURNS, limits.max_input_tokens, turns)
    return None


def tokens_overflow(prompt_tokens: int, max_new_tokens: int | None,
                    limits: Limits) -> TooLong | None:
    """Why a templated prompt of ``prompt_tokens`` (``[CLS]`` not counted) plus
    ``max_new_tokens`` (None: unset, at least one) does not fit, or None.

    The context rule is vLLM's and TGI's: prompt + max_new_tokens <= context.
    """
    if prompt_tokens > limits.max_input_tokens:
        return TooLong(Overflow.INPUT, limits.max_input_tokens, prompt_tokens)
    room = limits.context - prompt_tokens
    if room < 1 or (max_new_tokens is not None and max_new_tokens > room):
        return TooLong(Overflow.CONTEXT, limits.context, prompt_tokens, max_new_tokens)
    return None


def builds_inline(texts: Sequence[str]) -> bool:
    """Whether a chat-templated prompt of client ``texts`` (one per turn, a prefill included) is
    built on the event loop rather than in a worker thread: at most `INLINE_PROMPT_TURNS` texts
    of `INLINE_PROMPT_CHARS` characters in all, every one ASCII.

    Our choice: the hop to the thread cost 0.3-0.9 ms of time to first token at concurrency 1
    (``ess serve``, session 18), more than the template and tokenizer take for such a request
    (0.17 ms for 2,000 characters). Non-ASCII text goes through normalization's scans and their
    Python callbacks (`prompt.normalize_client_text`: 0.1-1 us a character, the worst for text
    built to need them), and a raw prompt is split at every template marker with a tokenizer call
    per piece (`prompt.build_raw_prompt`), so neither is passed here: they stay off the loop,
    where a burst of them cannot stall other streams."""
    return (len(texts) <= INLINE_PROMPT_TURNS and sum(map(len, texts)) <= INLINE_PROMPT_CHARS
            and all(t.isascii() for t in texts))


def completion_budget(prompt_tokens: int, max_new_tokens: int | None, limits: Limits,
                      default: int | None = None) -> int:
    """Tokens the completion may have once `tokens_overflow` passed: ``max_new_tokens``, or
    unset ``default`` (None: as many as fit, vLLM's rest of the context), never more than fit
    or than the server's limit (a default is not the client's ask, so it is not an error)."""
    if max_new_tokens is not None:
        return max_new_tokens
    room = min(limits.max_new_tokens, limits.context - prompt_tokens)
    return room if default is None else min(default, room)


# ---- what a protocol supplies --------------------------------------------------------------


class RequestAdapter(Protocol):
    """One request body seen through its protocol (`server.tgi.routes.TGIRequest`,
    `server.openai.routes.OpenAIRequest`)."""

    max_new_tokens_field: str
    """The field named when max_new_tokens is over the limit (``parameters.max_new_tokens``,
    ``max_tokens``, ``max_completion_tokens``)."""
    safety_field: str
    """Prefix of the safety override fields (``parameters.safety``, ``safety``)."""
    max_new_tokens: int | None
    """What the request asked for; None: unset."""
    default_max_new_tokens: int | None
    """The protocol's default when unset (None: as many as fit, `completion_budget`)."""
    input_chars: int
    """Characters of client text that will be tokenized (for `chars_overflow`)."""
    input_bytes: int
    """Their UTF-8 bytes as sent (`utf8_size`, for `chars_overflow`)."""
    input_turns: int
    """Chat messages the prompt is templated from (1 for a single text; `chars_overflow`)."""
    raw_text: str | None
    """A raw prompt (already templated), whose turns `prompt.raw_turns` counts instead; None
    for a prompt the server templates."""
    prompt_inline: bool
    """Whether `build_prompt` runs on the event loop (`builds_inline`; False for a raw prompt)."""
    safety: SafetyOverrides | None
    trace: bool

    def check(self) -> None:
        """Protocol-specific field rules. Raises: InvalidRequest."""

    def build_prompt(self, tokenizer, max_client_bytes: int | None) -> Prompt:
        """Runs on the event loop or in a worker thread (`prompt_inline`). Raises: PromptError,
        ClientTextTooLong (over ``max_client_bytes``, `prompt.encode_segments`)."""

    def prompt_field(self, exc: PromptError) -> str:
        """The request field behind a `PromptError`."""

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        """Raises: ParameterError."""

    def sampling_field(self, library_field: str) -> str:
        """The request field behind a `SamplingParams` field."""

    def too_long(self, overflow: TooLong) -> InvalidRequest:
        """The error for an input that does not fit (`errors.InputTooLong`)."""


# ---- the serving base ----------------------------------------------------------------------


@dataclass(frozen=True)
class Serving:
    """What every generation route needs: the engine, the limits, and the server's safety
    policy (the floor a request may only make stricter)."""

    engine: Engine
    settings: Settings
    safety: SafetyParams
    limits: Limits

    @classmethod
    def create(cls, engine: Engine, settings: Settings, safety: SafetyParams) -> "Serving":
        """Reads the tokenizer's vocabulary once (about 50 ms)."""
        token_chars, token_bytes = longest_token(engine.tokenizer)
        limits = Limits(settings.max_new_tokens_limit, settings.max_input_tokens,
                        context_length(engine.model_max_length), token_chars, token_bytes,
                        tokens_per_turn(engine.tokenizer))
        return cls(engine, settings, safety, limits)

    async def prepare(self, adapter: RequestAdapter) -> GenerationRequest:
        """Validate against this server's limits and build the library request.

        Raises:
            InvalidRequest: a field is out of range for this server or the library (400), or
                the input does not fit (`adapter.too_long`).
        """
        limits, max_new = self.limits, adapter.max_new_tokens
        if max_new is not None and max_new > limits.max_new_tokens:
            raise InvalidRequest(adapter.max_new_tokens_field,
                                 f"must be <= {limits.max_new_tokens} on this server")
        adapter.check()
        turns = (adapter.input_turns if adapter.raw_text is None
                 else raw_turns(self.engine.tokenizer, adapter.raw_text))
        overflow = chars_overflow(adapter.input_chars, adapter.input_bytes, turns, limits)
        if overflow is not None:
            raise adapter.too_long(overflow)
        try:
            if adapter.prompt_inline:
                prompt = adapter.build_prompt(self.engine.tokenizer, limits.max_client_bytes)
            else:  # tokenizing a long input takes milliseconds: keep it off the event loop
                prompt = await anyio.to_thread.run_sync(adapter.build_prompt, self.engine.tokenizer,
                                                        limits.max_client_bytes)
        except ClientTextTooLong as exc:
            raise adapter.too_long(TooLong(Overflow.BYTES, limits.max_input_tokens, exc.given)) from exc
        except PromptError as exc:
            raise InvalidRequest(adapter.prompt_field(exc), str(exc)) from exc
        overflow = tokens_overflow(len(prompt.ids), max_new, limits)
        if overflow is not None:
            raise adapter.too_long(overflow)
        try:
            sampling = adapter.sampling_params(completion_budget(len(prompt.ids), max_new, limits,
                                                                 adapter.default_max_new_tokens))
        except ParameterError as exc:
            raise InvalidRequest(adapter.sampling_field(exc.field), exc.message) from exc
        try:
            safety = to_safety_params(self.safety, adapter.safety)
        except ParameterError as exc:
            raise InvalidRequest(f"{adapter.safety_field}.{exc.field}", exc.message) from exc
        return GenerationRequest(prompt, sampling, safety, trace=adapter.trace)

    async def collect(self, stream: RequestStream, request: Request) -> list[StepEvent]:
        """All events of ``stream`` for a non-streamed response, the last one finished.

        Raises:
            ClientDisconnected: the client left first; the request is aborted (499).
            EngineNotRunning: the request was aborted by shutdown (503).
            EngineError: the engine failed the request.
        """
        events = await _collect_unless_disconnected(stream, request)
        if events is None:
            raise ClientDisconnected()
        if events[-1].finish_reason == FinishReason.ABORT:
            raise EngineNotRunning(ABORTED)
        return events


async def _collect_unless_disconnected(stream: RequestStream, request: Request):
    """All events of ``stream``; None if the client disconnected first (request aborted)."""
    events, error = [], None
    async with stream, anyio.create_task_group() as tg:
        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            async for ev in stream:
                events.append(ev)
        except EngineError as exc:  # raised outside the task group: no ExceptionGroup wrapping
            error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    if not events or events[-1].finish_reason is None:
        return None
    return events
