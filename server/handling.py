"""Small pieces the TGI and the OpenAI routes share: the context length, the longest token,
the SSE response. The request path itself is `server.requests`."""

from __future__ import annotations

from sse_starlette import EventSourceResponse


def context_length(model_max_length: int) -> int:
    """Tokens one request may use, prompt + completion: the model's positions
    (`Engine.model_max_length`) minus the one ``[CLS]`` holds (the decoder puts it at slot 0)."""
    return model_max_length - 1


def longest_token(tokenizer) -> tuple[int, int]:
    """Characters and UTF-8 bytes of the longest vocabulary entries (81 and 81 for SmolLM2);
    about 50 ms, call once. A byte-level entry that is part of a character reads as U+FFFD, 3
    bytes, at least its own length, so the byte count is an upper bound."""
    texts = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.get_vocab()]
    return max(map(len, texts)), max(len(t.encode()) for t in texts)


def tokens_per_turn(tokenizer) -> int:
    """Template tokens one more message adds to a chat with empty content (5 for SmolLM2's
    ``<|im_start|>user\n<|im_end|>\n``; 0 for a template that drops empty messages)."""
    def length(n: int) -> int:
        text = tokenizer.apply_chat_template([{"role": "user", "content": ""}] * n, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return max(0, length(2) - length(1))


def sse_response(frames, settings) -> EventSourceResponse:
    """An SSE response of ``frames`` (``\n`` separators, keep-alive pings every
    ``ESS_SSE_PING_SECONDS``).

    Shutdown: under ``ess serve`` the drain (`server.lifecycle`) ends every stream itself, with
    its final event or an error event naming the shutdown, before sse-starlette sees the
    server exiting. The grace period still matters under a plain uvicorn (Ray replicas,
    tests): there sse-starlette cancels a stream still running that long after SIGTERM.
    """
    return EventSourceResponse(frames, sep="\n", ping=settings.sse_ping_seconds,
                               shutdown_grace_period=settings.shutdown_timeout_seconds)
