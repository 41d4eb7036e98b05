"""OpenAI-compatible routes: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models`` (an ``APIRouter`` that `server.app.create_app` mounts).

Like the TGI routes, handlers never touch the model: `Serving.prepare` builds the
`GenerationRequest` through `OpenAIRequest`, ``engine.submit`` queues it, and the `StepEvent`s
are shaped as OpenAI's responses. Streams are SSE ``data: {json}`` chunks ending with
``data: [DONE]`` (OpenAI API reference, "Streaming"); an error after the stream started is one
``data: {"error": {...}}`` chunk before ``[DONE]`` (vLLM does the same).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from sse_starlette.event import JSONServerSentEvent, ServerSentEvent

from safety_decoding.prompt import Prompt, PromptError
from safety_decoding.sampling import SamplingParams
from safety_decoding.types import FinishReason

from server.engine import EngineError, RequestStream
from server.errors import (CLIENT_CLOSED_STATUS, VALIDATION_STATUS, InputTooLong, InvalidRequest,
                           engine_error_kind, error_responses, openai_error_body)
from server.handling import sse_response
from server.openapi import stream_response
from server.requests import ABORTED, Overflow, Serving, TooLong, builds_inline, utf8_size
from .schemas import (COMPLETIONS_MAX_TOKENS, ChatCompletionRequest, Completion, CompletionRequest,
                      build_chat, build_completion, model_card, new_completion_id,
                      openai_finish_reason, to_sampling_params, usage_json)


def too_long_message(overflow: TooLong) -> str:
    """vLLM's wording for an input that does not fit (``serving_engine.py``,
    ``_validate_input``).

    The prompt-alone and max_tokens messages are vLLM's to the letter (vLLM names both
    max_tokens fields whichever was set). vLLM has no input limit apart from the context:
    ``ESS_MAX_INPUT_TOKENS`` and the character bound are ours, worded like vLLM's.
    """
    limit, given = overflow.limit, overflow.given
    if overflow.kind is Overflow.CHARS:
        return (f"This server's maximum input length is {limit} tokens. However, your request "
                f"has {given} input characters, more than {limit} tokens can hold. Please "
                f"reduce the length of the input messages.")
    if overflow.kind is Overflow.BYTES:
        return (f"This server's maximum input length is {limit} tokens. However, your request "
                f"has {given} bytes of input text, more than {limit} tokens can hold. Please "
                f"reduce the length of the input messages.")
    if overflow.kind is Overflow.TURNS:
        return (f"This server's maximum input length is {limit} tokens. However, your request "
                f"has {given} messages, more than {limit} tokens can hold. Please reduce the "
                f"number of messages.")
    if overflow.kind is Overflow.INPUT:
        return (f"This server's maximum input length is {limit} tokens. However, your request "
                f"has {given} input tokens. Please reduce the length of the input messages.")
    if overflow.max_new_tokens is None or given >= limit:
        return (f"This model's maximum context length is {limit} tokens. However, your request "
                f"has {given} input tokens. Please reduce the length of the input messages.")
    m = overflow.max_new_tokens
    return (f"'max_tokens' or 'max_completion_tokens' is too large: {m}. This model's maximum "
            f"context length is {limit} tokens and your request has {given} input tokens "
            f"({m} > {limit} - {given}).")


class OpenAIRequest:
    """A chat or text completion body as `Serving.prepare` reads it
    (`server.requests.RequestAdapter`)."""

    safety_field = "safety"
    trace = False

    def __init__(self, body: ChatCompletionRequest | CompletionRequest):
        self.body = body
        self.chat = isinstance(body, ChatCompletionRequest)
        self.input_field = "messages" if self.chat else "prompt"
        self.max_new_tokens_field, self.max_new_tokens = body.max_tokens_field()
        self.default_max_new_tokens = None if self.chat else COMPLETIONS_MAX_TOKENS
        self.input_chars = (sum(len(m.content) for m in body.messages) if self.chat
                            else len(body.prompt))
        self.input_bytes = utf8_size([m.content for m in body.messages] if self.chat else [body.prompt])
        self.input_turns = len(body.messages) if self.chat else 1
        self.raw_text = None if self.chat else body.prompt
        self.prompt_inline = self.chat and builds_inline([m.content for m in body.messages])
        self.safety = body.safety

    def check(self) -> None:
        if self.body.stream_options is not None and not self.body.stream:
            # vLLM's rule: stream_options without stream is a mistake worth reporting.
            raise InvalidRequest("stream_options", "only allowed when stream is true")

    def build_prompt(self, tokenizer, max_client_bytes: int | None) -> Prompt:
        return (build_chat if self.chat else build_completion)(tokenizer, self.body, max_client_bytes)

    def prompt_field(self, exc: PromptError) -> str:
        return self.input_field

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        return to_sampling_params(self.body, max_new_tokens)

    def sampling_field(self, library_field: str) -> str:
        return self.max_new_tokens_field if library_field == "max_new_tokens" else library_field

    def too_long(self, overflow: TooLong) -> InvalidRequest:
        # param: the field the message blames (max_tokens when the prompt alone would fit).
        blames_max = (overflow.kind is Overflow.CONTEXT and overflow.max_new_tokens is not None
                      and overflow.given < overflow.limit)
        field = self.max_new_tokens_field if blames_max else self.input_field
        return InputTooLong(field, too_long_message(overflow),
                            VALIDATION_STATUS)


# The statuses each route answers (docs/operations.md, "Errors and status codes"); a stream
# that fails after its 200 ends with an error chunk instead.
COMPLETION_RESPONSES = {
    200: stream_response("With `stream: true`: chunks as `data: {json}`, then `data: [DONE]`."),
    **error_responses(400, 401, 429, CLIENT_CLOSED_STATUS, 500, 503, 504, openai=True)}


def openai_router(serving: Serving) -> APIRouter:
    """The ``/v1`` routes over ``serving``."""
    router = APIRouter(prefix="/v1")
    engine, settings = serving.engine, serving.settings
    created = int(time.time())

    async def complete(body: ChatCompletionRequest | CompletionRequest, request: Request):
        adapter = OpenAIRequest(body)
        req = await serving.prepare(adapter)
        shape = Completion(new_completion_id(adapter.chat), int(time.time()),
                           settings.model_name, adapter.chat, body.include_usage)
        stream = engine.submit(req)  # 429 / 503 before any byte is sent
        if body.stream:
            return sse_response(openai_frames(stream, shape), settings)
        events = await serving.collect(stream, request)
        final = events[-1]
        return shape.response("".join(ev.text for ev in events), openai_finish_reason(final),
                              usage_json(final.prompt_tokens, final.generated_tokens),
                              final.safety)

    @router.post("/chat/completions", responses=COMPLETION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """OpenAI Chat Completions: the tokenizer's chat template, every user turn as query."""
        return await complete(body, request)

    @router.post("/completions", responses=COMPLETION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        """OpenAI (legacy) Completions: one raw prompt."""
        return await complete(body, request)

    @router.get("/models", responses=error_responses(401, 503, openai=True))
    async def models():
        """The one served model (``ESS_MODEL_NAME``), with its context length in tokens."""
        card = model_card(settings.model_name, created, serving.limits.context)
        return {"object": "list", "data": [card]}

    return router


def _json(data: dict) -> JSONServerSentEvent:
    return JSONServerSentEvent(data, sep="\n")


DONE = ServerSentEvent("[DONE]", sep="\n")


async def openai_frames(stream: RequestStream, shape: Completion):
    """The SSE chunks of one request; closing this generator aborts it in the engine.

    Order: chat's role chunk, sent with the first event (after the prefill, as vLLM and
    llama.cpp send it; it did not change time to first token); one chunk per step that released
    text (held UTF-8 bytes and stop-string prefixes are released later or never, by the
    library); the final choice chunk (empty delta, finish_reason, ``safety``); the usage chunk
    when asked; ``[DONE]``.
    """
    try:
        role = shape.first_chunk()
        async for ev in stream:
            if role is not None:
                yield _json(role)
                role = None
            if ev.finish_reason == FinishReason.ABORT:
                yield _json(openai_error_body(ABORTED, "unavailable"))
                break
            if ev.text:
                yield _json(shape.text_chunk(ev.text))
            if ev.finish_reason is not None:
                yield _json(shape.final_chunk(openai_finish_reason(ev), ev.safety))
                if shape.include_usage:
                    yield _json(shape.usage_chunk(usage_json(ev.prompt_tokens,
                                                             ev.generated_tokens)))
    except EngineError as exc:
        yield _json(openai_error_body(str(exc), engine_error_kind(exc)))
    finally:
        await stream.aclose()
    yield DONE
