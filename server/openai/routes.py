"""OpenAI-compatible routes: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models`` (an ``APIRouter`` that `server.app.create_app` mounts).

Like the TGI routes, handlers never touch the model: they build a `GenerationRequest`,
``engine.submit`` it and shape the `StepEvent`s. Streams are SSE ``data: {json}`` chunks
ending with ``data: [DONE]`` (OpenAI API reference, "Streaming"); an error after the stream
started is one ``data: {"error": {...}}`` chunk before ``[DONE]`` (vLLM does the same).
"""

from __future__ import annotations

import time

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response
from sse_starlette.event import JSONServerSentEvent, ServerSentEvent

from safety_decoding.decode import ABORT, GenerationRequest
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import PromptError
from safety_decoding.types import ParameterError

from server.engine import Engine, EngineError, EngineNotRunning, RequestStream
from server.errors import InvalidRequest, engine_error_kind, openai_error_body
from server.handling import collect_unless_disconnected, context_length, sse_response, too_many_chars
from .schemas import (CONTEXT_LENGTH_EXCEEDED, ChatCompletionRequest, Completion,
                             CompletionRequest, build_chat, build_completion, completion_budget, model_card,
                             new_completion_id, openai_field, openai_finish_reason,
                             to_sampling_params, usage_json)
from server.tgi.schemas import to_safety_params
from server.settings import Settings

ABORTED = "the request was aborted: the server is shutting down"


def openai_router(engine: Engine, settings: Settings, server_safety: SafetyParams,
                  token_chars: int) -> APIRouter:
    """The ``/v1`` routes for ``engine``, validated against ``settings``' limits and made no
    weaker than ``server_safety``; ``token_chars`` is `handling.longest_token_chars`."""
    router = APIRouter(prefix="/v1")
    created = int(time.time())

    async def prepare(body: ChatCompletionRequest | CompletionRequest) -> GenerationRequest:
        """Validate against this server's limits and build the library request.

        Raises:
            InvalidRequest: a field is out of range for this server or the library, or the
                prompt does not fit the context (code ``context_length_exceeded``).
        """
        chat = isinstance(body, ChatCompletionRequest)
        noun = "messages" if chat else "prompt"
        limit = settings.max_new_tokens_limit
        max_field, max_tokens = body.max_tokens_field()
        if max_tokens is not None and max_tokens > limit:
            raise InvalidRequest(max_field, f"must be <= {limit} on this server")
        if body.stream_options is not None and not body.stream:
            # vLLM's rule: stream_options without stream is a mistake worth reporting.
            raise InvalidRequest("stream_options", "only allowed when stream is true")
        chars = sum(len(m.content) for m in body.messages) if chat else len(body.prompt)
        reason = too_many_chars(chars, settings.max_input_tokens, token_chars)
        if reason:
            raise InvalidRequest(noun, reason, code=CONTEXT_LENGTH_EXCEEDED)
        try:
            # Tokenizing a long input takes milliseconds: keep it off the event loop.
            prompt = await anyio.to_thread.run_sync(build_chat if chat else build_completion,
                                                    engine.tokenizer, body)
        except PromptError as exc:
            raise InvalidRequest(noun, str(exc)) from exc
        n = len(prompt.ids)
        if n > settings.max_input_tokens:
            raise InvalidRequest(noun, f"the prompt is {n} tokens after templating, more than "
                                       f"this server's limit of {settings.max_input_tokens}",
                                 code=CONTEXT_LENGTH_EXCEEDED)  # clients trim and retry on it
        max_new = completion_budget(n, max_tokens, limit, context_length(engine.model_max_length),
                                    noun)
        try:
            sampling = to_sampling_params(body, max_new)
        except ParameterError as exc:
            raise InvalidRequest(openai_field(exc.field, max_field), exc.message) from exc
        try:
            safety = to_safety_params(server_safety, body.safety)
        except ParameterError as exc:
            raise InvalidRequest(f"safety.{exc.field}", exc.message) from exc
        return GenerationRequest(prompt, sampling, safety)

    async def complete(body: ChatCompletionRequest | CompletionRequest, request: Request):
        req = await prepare(body)
        chat = isinstance(body, ChatCompletionRequest)
        shape = Completion(new_completion_id(chat), int(time.time()), settings.model_name, chat,
                           body.include_usage)
        stream = engine.submit(req)  # 429 / 503 before any byte is sent
        if body.stream:
            return sse_response(openai_frames(stream, shape), settings)
        events = await collect_unless_disconnected(stream, request)
        if events is None:  # the client left; the engine aborted the request
            return Response(status_code=499)
        final = events[-1]
        if final.finish_reason == ABORT:
            raise EngineNotRunning(ABORTED)
        text = "".join(ev.text for ev in events)
        return shape.response(text, openai_finish_reason(final),
                              usage_json(final.prompt_tokens, final.generated_tokens),
                              final.safety)

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """OpenAI Chat Completions: the tokenizer's chat template, every user turn as query."""
        return await complete(body, request)

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        """OpenAI (legacy) Completions: one raw prompt."""
        return await complete(body, request)

    @router.get("/models")
    async def models():
        """The one served model (``ESS_MODEL_NAME``), with its context length in tokens."""
        card = model_card(settings.model_name, created, context_length(engine.model_max_length))
        return {"object": "list", "data": [card]}

    return router


def _json(data: dict) -> JSONServerSentEvent:
    return JSONServerSentEvent(data, sep="\n")


DONE = ServerSentEvent("[DONE]", sep="\n")


async def openai_frames(stream: RequestStream, shape: Completion):
    """The SSE chunks of one request; closing this generator aborts it in the engine.

    Order: chat's role chunk; one chunk per step that released text (held UTF-8 bytes and
    stop-string prefixes are released later or never, by the library); the final choice chunk
    (empty delta, finish_reason, ``safety``); the usage chunk when asked; ``[DONE]``.
    """
    try:
        first = shape.first_chunk()
        if first is not None:
            yield _json(first)
        async for ev in stream:
            if ev.finish_reason == ABORT:
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
