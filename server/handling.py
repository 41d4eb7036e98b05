"""What the TGI and the OpenAI routes share: the token budget rule, the SSE response, and
collecting a whole response while watching for the client leaving."""

from __future__ import annotations

import anyio
from fastapi import Request
from sse_starlette import EventSourceResponse

from .engine import EngineError, RequestStream


def context_length(model_max_length: int) -> int:
    """Tokens one request may use, prompt + completion: the model's positions
    (`Engine.model_max_length`) minus the one ``[CLS]`` holds (the decoder puts it at slot 0)."""
    return model_max_length - 1


def longest_token_chars(tokenizer) -> int:
    """Characters in the longest vocabulary entry (81 for SmolLM2); about 50 ms, call once."""
    return max(len(tokenizer.convert_tokens_to_string([t])) for t in tokenizer.get_vocab())


def too_many_chars(chars: int, max_input_tokens: int, token_chars: int) -> str | None:
    """Why a prompt of ``chars`` characters cannot fit ``max_input_tokens`` tokens, or None.

    Our choice: a bound checked before tokenizing, so a multi-megabyte body is refused at
    once instead of tokenized for seconds while other streams wait (no token is longer than
    ``token_chars``, so the prompt would be over the token limit anyway).
    """
    limit = max_input_tokens * token_chars
    if chars > limit:
        return (f"the prompt is {chars} characters; more than {limit} cannot fit this server's "
                f"limit of {max_input_tokens} tokens")
    return None


def sse_response(frames, settings) -> EventSourceResponse:
    """An SSE response of ``frames`` (``\n`` separators, keep-alive pings every
    ``ESS_SSE_PING_SECONDS``).

    On SIGTERM sse-starlette would close every stream within half a second. A running stream
    instead gets ``ESS_SHUTDOWN_TIMEOUT_SECONDS`` to finish (the grace period), the same bound
    uvicorn gives every connection, so streams drain like the other responses do.
    """
    return EventSourceResponse(frames, sep="\n", ping=settings.sse_ping_seconds,
                               shutdown_grace_period=settings.shutdown_timeout_seconds)


async def collect_unless_disconnected(stream: RequestStream, request: Request):
    """All events of ``stream``; None if the client disconnected first (request aborted).

    Raises:
        EngineError: the engine failed the request.
    """
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
