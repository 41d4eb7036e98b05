"""The FastAPI app: TGI routes, health, metrics; the OpenAI routes (`server.openai.routes`), the
error shapes (`server.errors`) and API keys / CORS (`server.auth`) are mounted here.

`create_app` takes an injected `Engine`, so routes are testable with any engine; the lifespan
starts (and warms) it and stops it on shutdown. Handlers never touch the model: they build
library parameter objects, ``engine.submit`` them, and shape the events.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.event import JSONServerSentEvent

from safety_decoding.decode import ABORT, EOS, GenerationRequest
from safety_decoding.prompt import PromptError
from safety_decoding.types import ParameterError

from .auth import install_auth_and_cors
from .engine import Engine, EngineError, EngineNotRunning, RequestStream, reported_finish_reason
from .errors import InvalidRequest, engine_error_kind, install_error_handlers, tgi_error_body
from .errors import field_path, validation_message  # noqa: F401  (re-exported for tests)
from .handling import (collect_unless_disconnected, context_length, longest_token_chars,
                       sse_response, too_many_chars)
from .metrics import CONTENT_TYPE_LATEST
from .openai.routes import openai_router
from .tgi.schemas import (GenerateRequest, build_prompt, final_stream_event, generate_response,
                      resolve_seed, sampling_enabled, special_token_json, stream_event,
                      to_safety_params, to_sampling_params, token_json)
from .settings import Settings, server_safety_params

log = logging.getLogger("ess.app")


# ---- the app -------------------------------------------------------------------------------


def create_app(engine: Engine, settings: Settings | None = None) -> FastAPI:
    """Build the app around ``engine`` (started by the lifespan, stopped on shutdown).

    Raises:
        ParameterError: the settings and the checkpoint give an invalid safety policy.
    """
    settings = settings if settings is not None else Settings()
    server_safety = server_safety_params(settings, engine.safety_config)
    token_chars = longest_token_chars(engine.tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="ESS Serve", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.safety = server_safety

    install_error_handlers(app, settings.retry_after_seconds)
    install_auth_and_cors(app, settings)
    app.include_router(openai_router(engine, settings, server_safety, token_chars))

    async def prepare(body: GenerateRequest) -> tuple[GenerationRequest, int | None]:
        """Validate against this server's limits and build the library request.

        Raises:
            InvalidRequest: a field is out of range for this server or the library.
        """
        p = body.parameters
        limit = settings.max_new_tokens_limit
        if p.max_new_tokens is not None and p.max_new_tokens > limit:
            raise InvalidRequest("parameters.max_new_tokens", f"must be <= {limit} on this server")
        if p.raw and p.response_prefix:
            raise InvalidRequest("parameters.response_prefix",
                                 "cannot be combined with raw (a raw prompt is all query)")
        reason = too_many_chars(len(body.inputs) + len(p.response_prefix), settings.max_input_tokens,
                                token_chars)
        if reason:
            raise InvalidRequest("inputs", reason)
        try:
            # Tokenizing a long input takes milliseconds: keep it off the event loop.
            prompt = await anyio.to_thread.run_sync(build_prompt, engine.tokenizer, body)
        except PromptError as exc:
            raise InvalidRequest(exc.field, str(exc)) from exc
        n = len(prompt.ids)
        if n > settings.max_input_tokens:
            raise InvalidRequest("inputs", f"the prompt is {n} tokens after templating, more "
                                           f"than the limit of {settings.max_input_tokens}")
        room = context_length(engine.model_max_length) - n
        max_new = p.max_new_tokens if p.max_new_tokens is not None else min(limit, room)
        if max_new > room or room < 1:
            raise InvalidRequest(
                "parameters.max_new_tokens",
                f"{n} prompt tokens + [CLS] + {max_new} new tokens exceed the model's "
                f"{engine.model_max_length} positions")
        seed = resolve_seed(p, sampling_enabled(p))
        try:
            sampling = to_sampling_params(p, max_new, seed)
        except ParameterError as exc:
            raise InvalidRequest(f"parameters.{exc.field}", exc.message) from exc
        try:
            safety = to_safety_params(server_safety, p.safety)
        except ParameterError as exc:
            raise InvalidRequest(f"parameters.safety.{exc.field}", exc.message) from exc
        return GenerationRequest(prompt, sampling, safety, trace=p.details), seed

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers probe with it
    async def health():
        """200 once the model is loaded and a warm-up step ran, else 503."""
        if engine.ready:
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/info")
    async def info():
        """What this server runs and its limits (a subset of TGI's ``/info``)."""
        s = server_safety
        return {"model_id": settings.model_name, "max_input_tokens": settings.max_input_tokens,
                "max_new_tokens": settings.max_new_tokens_limit,
                "max_total_tokens": context_length(engine.model_max_length),
                "max_waiting": engine.max_waiting, "max_num_seqs": engine.max_num_seqs,
                "max_batched_tokens": engine.max_batched_tokens,
                "safety": {"threshold": s.threshold, "tau": s.tau, "r1": s.r1, "r2": s.r2,
                           "schedule": s.schedule, "action": s.action}}

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request):
        """TGI ``/generate``: the whole response at once."""
        req, seed = await prepare(body)
        stream = engine.submit(req)
        events = await collect_unless_disconnected(stream, request)
        if events is None:  # the client left; the engine aborted the request
            return Response(status_code=499)
        final = events[-1]
        if final.finish_reason == ABORT:
            raise EngineNotRunning("the request was aborted: the server is shutting down")
        tokens = [t for ev in events for t in ev.tokens]
        text = "".join(t.text for t in tokens)
        if body.parameters.return_full_text:
            text = body.inputs + body.parameters.response_prefix + text
        return generate_response(text, tokens, reported_finish_reason(final),
                                 final.generated_tokens, seed, final.safety,
                                 body.parameters.details)

    @app.post("/generate_stream")
    async def generate_stream(body: GenerateRequest):
        """TGI ``/generate_stream``: one SSE event per token; the last carries the text."""
        req, seed = await prepare(body)
        stream = engine.submit(req)  # 429 / 503 before any byte is sent
        prefix = (body.inputs + body.parameters.response_prefix
                  if body.parameters.return_full_text else "")
        frames = _sse_frames(stream, seed, prefix, engine.tokenizer.eos_token_id)
        return sse_response(frames, settings)

    @app.post("/")
    async def compat_generate(body: GenerateRequest, request: Request):
        """TGI's ``POST /`` (``compat_generate``): ``/generate_stream`` when ``stream`` is true,
        else ``/generate``'s body in a one-element list. huggingface_hub's ``InferenceClient``
        posts here when given the server's URL."""
        if body.stream:
            return await generate_stream(body)
        result = await generate(body, request)
        return result if isinstance(result, Response) else [result]

    return app


async def _sse_frames(stream: RequestStream, seed: int | None, prefix: str, eos_id: int | None):
    """TGI stream events for ``stream``; closing this generator aborts the request.

    Every released token is one event, "" texts included (TGI does). The last token carries
    ``generated_text`` and ``details``; an ``eos_token`` finish adds TGI's final special EOS
    event instead (the library does not release the EOS token itself).
    """
    index, texts = 0, []
    try:
        async for ev in stream:
            final = ev.finish_reason is not None
            if final and ev.finish_reason == ABORT:
                yield JSONServerSentEvent(tgi_error_body("the request was aborted: the server "
                                                         "is shutting down", "generation"),
                                          sep="\n")
                return
            attach_to_last = final and ev.finish_reason != EOS and bool(ev.tokens)
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
