"""TGI-compatible routes: ``POST /generate``, ``POST /generate_stream`` and TGI's ``POST /``
(an ``APIRouter`` that `server.app.create_app` mounts).

Handlers never touch the model: `Serving.prepare` builds the `GenerationRequest` through
`TGIRequest`, ``engine.submit`` queues it, and the `StepEvent`s are shaped as TGI's responses
(``router/src/lib.rs``) or stream events.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sse_starlette.event import JSONServerSentEvent

from safety_decoding.prompt import Prompt, PromptError
from safety_decoding.sampling import SamplingParams
from safety_decoding.types import FinishReason

from server.engine import EngineError, RequestStream, reported_finish_reason
from server.errors import (CLIENT_CLOSED_STATUS, TGI_TOO_LONG_STATUS, InputTooLong,
                           InvalidRequest, engine_error_kind, error_responses, tgi_error_body)
from server.handling import sse_response
from server.openapi import stream_response
from server.requests import ABORTED, Overflow, Serving, TooLong, builds_inline, utf8_size
from .schemas import (GenerateRequest, build_prompt, final_stream_event, generate_response,
                      resolve_seed, sampling_enabled, special_token_json, stream_event,
                      to_sampling_params, token_json)


_BOUND_UNITS = {Overflow.CHARS: "characters", Overflow.TURNS: "messages", Overflow.BYTES: "bytes of text"}
"""What the bounds checked before tokenizing count."""


def too_long_message(overflow: TooLong) -> str:
    """TGI's wording for an input that does not fit (router ``validation.rs``,
    ``ValidationError::InputLength`` / ``MaxTotalTokens``, inside ``InferError``'s
    "Input validation error: "). The character bound is ours, worded like ``InputLength``."""
    limit, given = overflow.limit, overflow.given
    if overflow.kind in _BOUND_UNITS:
        unit = _BOUND_UNITS[overflow.kind]
        detail = (f"`inputs` must have less than {limit} tokens. Given: {given} {unit}, "
                  f"more than {limit} tokens can hold")
    elif overflow.kind is Overflow.INPUT or overflow.max_new_tokens is None:
        detail = f"`inputs` must have less than {limit} tokens. Given: {given}"
    else:
        detail = (f"`inputs` tokens + `max_new_tokens` must be <= {limit}. Given: {given} "
                  f"`inputs` tokens and {overflow.max_new_tokens} `max_new_tokens`")
    return f"Input validation error: {detail}"


class TGIRequest:
    """A `GenerateRequest` as `Serving.prepare` reads it (`server.requests.RequestAdapter`).

    ``seed`` is the one to report: the client's, a fresh one when sampling, None when greedy.
    """

    max_new_tokens_field = "parameters.max_new_tokens"
    default_max_new_tokens = None  # unset: as many as fit
    safety_field = "parameters.safety"

    def __init__(self, body: GenerateRequest):
        p = body.parameters
        self.body = body
        self.max_new_tokens = p.max_new_tokens
        self.input_chars = len(body.inputs) + len(p.response_prefix)
        self.input_bytes = utf8_size((body.inputs, p.response_prefix))
        self.input_turns = 1
        self.raw_text = body.inputs if p.raw else None
        self.prompt_inline = not p.raw and builds_inline((body.inputs, p.response_prefix))
        self.safety = p.safety
        self.trace = p.details
        self.seed = resolve_seed(p, sampling_enabled(p))

    def check(self) -> None:
        p = self.body.parameters
        if p.raw and p.response_prefix:
            raise InvalidRequest("parameters.response_prefix",
                                 "cannot be combined with raw (write the prefill after the "
                                 "raw prompt's last assistant header instead)")

    def build_prompt(self, tokenizer, max_client_bytes: int | None) -> Prompt:
        return build_prompt(tokenizer, self.body, max_client_bytes)

    def prompt_field(self, exc: PromptError) -> str:
        return exc.field

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        return to_sampling_params(self.body.parameters, max_new_tokens, self.seed)

    def sampling_field(self, library_field: str) -> str:
        return f"parameters.{library_field}"

    def too_long(self, overflow: TooLong) -> InvalidRequest:
        field = ("parameters.max_new_tokens" if overflow.max_new_tokens is not None
                 else "inputs")
        return InputTooLong(field, too_long_message(overflow), TGI_TOO_LONG_STATUS)

    def echoed_prefix(self) -> str:
        """What ``return_full_text`` puts before the generated text."""
        p = self.body.parameters
        return self.body.inputs + p.response_prefix if p.return_full_text else ""


# The statuses each route answers (docs/operations.md, "Errors and status codes"). A stream
# has answered 200 before it can fail or time out: those end it with an error event.
_BEFORE_STREAM = (400, 401, TGI_TOO_LONG_STATUS, 429, 500, 503)
_WHOLE = (*_BEFORE_STREAM, 424, CLIENT_CLOSED_STATUS, 504)
STREAM_OK = stream_response("TGI stream events, one per token; the last carries "
                            "`generated_text` and `details`, or an error event.")


def tgi_router(serving: Serving) -> APIRouter:
    """The TGI routes over ``serving``."""
    router = APIRouter()
    engine = serving.engine

    @router.post("/generate", responses=error_responses(*_WHOLE, openai=False))
    async def generate(body: GenerateRequest, request: Request):
        """TGI ``/generate``: the whole response at once."""
        adapter = TGIRequest(body)
        events = await serving.collect(engine.submit(await serving.prepare(adapter)), request)
        final = events[-1]
        tokens = [t for ev in events for t in ev.tokens]
        text = adapter.echoed_prefix() + "".join(t.text for t in tokens)
        return generate_response(text, tokens, reported_finish_reason(final),
                                 final.generated_tokens, adapter.seed, final.safety,
                                 body.parameters.details)

    # response_class without a media type: the 200 is the stream alone (FastAPI would add an
    # application/json 200), while the errors stay application/json.
    @router.post("/generate_stream", response_class=Response,
                 responses={200: STREAM_OK, **error_responses(*_BEFORE_STREAM, openai=False)})
    async def generate_stream(body: GenerateRequest):
        """TGI ``/generate_stream``: one SSE event per token; the last carries the text."""
        adapter = TGIRequest(body)
        stream = engine.submit(await serving.prepare(adapter))  # 429 / 503 before any byte
        frames = sse_frames(stream, adapter.seed, adapter.echoed_prefix(),
                            engine.tokenizer.eos_token_id)
        return sse_response(frames, serving.settings)

    @router.post("/", responses={
        200: stream_response("`/generate`'s body in a one-element list; with `stream: true`, "
                             "`/generate_stream`'s events."),
        **error_responses(*_WHOLE, openai=False)})
    async def compat_generate(body: GenerateRequest, request: Request):
        """TGI's ``POST /`` (``compat_generate``): ``/generate_stream`` when ``stream`` is true,
        else ``/generate``'s body in a one-element list. huggingface_hub's ``InferenceClient``
        posts here when given the server's URL."""
        if body.stream:
            return await generate_stream(body)
        return [await generate(body, request)]

    return router


async def sse_frames(stream: RequestStream, seed: int | None, prefix: str, eos_id: int | None):
    """TGI stream events for ``stream``; closing this generator aborts the request.

    Every released token is one event, "" texts included (TGI does). The last token carries
    ``generated_text`` and ``details``; an ``eos_token`` finish adds TGI's final special EOS
    event instead (the library does not release the EOS token itself).
    """
    index, texts = 0, []
    try:
        async for ev in stream:
            final = ev.finish_reason is not None
            if final and ev.finish_reason == FinishReason.ABORT:
                yield JSONServerSentEvent(tgi_error_body(ABORTED, "generation"), sep="\n")
                return
            attach_to_last = final and ev.finish_reason != FinishReason.EOS and bool(ev.tokens)
            for i, t in enumerate(ev.tokens):
                index += 1
                texts.append(t.text)
                if attach_to_last and i == len(ev.tokens) - 1:
                    break
                yield JSONServerSentEvent(stream_event(index, token_json(t)), sep="\n")
            if not final:
                continue
            if attach_to_last:
                token = token_json(ev.tokens[-1])
            else:
                index += 1
                token = special_token_json(eos_id)
            yield JSONServerSentEvent(final_stream_event(
                index, token, prefix + "".join(texts), reported_finish_reason(ev),
                ev.generated_tokens, ev.prompt_tokens, seed, ev.safety), sep="\n")
    except EngineError as exc:
        yield JSONServerSentEvent(tgi_error_body(str(exc), engine_error_kind(exc)), sep="\n")
    finally:
        await stream.aclose()
