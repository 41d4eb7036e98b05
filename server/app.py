"""The FastAPI app: health, metrics, info; the TGI routes (`server.tgi.routes`), the OpenAI
routes (`server.openai.routes`), the error shapes (`server.errors`) and API keys / CORS
(`server.auth`) are mounted here.

`create_app` takes an injected `Engine`, so routes are testable with any engine; the lifespan
starts (and warms) it and stops it on shutdown. Both protocols' routes share one request path
(`server.requests.Serving`); they never touch the model.
"""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from .auth import install_auth_and_cors, open_paths
from .body_limit import BodyLimitMiddleware
from .engine import Engine
from .errors import error_responses, install_error_handlers
from .lifecycle import install_drain
from .metrics import CONTENT_TYPE
from .openai.routes import openai_router
from .openapi import HEALTH_RESPONSES, install_openapi
from .requests import Serving
from .settings import Settings, server_safety_params
from .tgi.routes import tgi_router

log = logging.getLogger("ess.app")

SAFETY_OFF_WARNING = ("Safety is OFF (ESS_SAFETY_ENABLED=false): no [CLS] verdict and no "
                      "re-checks; a measurement baseline, never production")


# ---- the app -------------------------------------------------------------------------------


def create_app(engine: Engine, settings: Settings | None = None) -> FastAPI:
    """Build the app around ``engine`` (started by the lifespan, stopped on shutdown).

    Raises:
        ParameterError: the settings and the checkpoint give an invalid safety policy.
    """
    settings = settings if settings is not None else Settings()
    server_safety = server_safety_params(settings, engine.safety_config)
    serving = Serving.create(engine, settings, server_safety)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not server_safety.enabled:
            log.warning(SAFETY_OFF_WARNING)
        await engine.start()
        # The startup heap (model, modules, app) leaves the collector's view: scanning it in
        # every full collection made a prefill in the server about 8 % slower than in process.
        # vLLM and SGLang freeze theirs after warm-up too. Cycles made later are still collected.
        # Process-wide: two apps in one process (tests) unfreeze it at the first shutdown, which
        # costs only collection time.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            await engine.stop()

    app = FastAPI(title="ESS Serve", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.safety = server_safety

    install_error_handlers(app, settings.retry_after_seconds)
    drain = install_drain(app, settings.retry_after_seconds)  # inside auth and CORS
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,  # inside auth, CORS
                       timeout=settings.body_timeout_seconds)
    install_auth_and_cors(app, settings)
    app.include_router(tgi_router(serving))
    app.include_router(openai_router(serving))
    install_openapi(app, settings, server_safety, open_paths(settings))
    engine.metrics.set_safety_enabled(server_safety.enabled)

    # HEAD: load balancers probe with it. Two routes, so each has its own OpenAPI operation id.
    @app.head("/health", responses=HEALTH_RESPONSES)
    @app.get("/health", responses=HEALTH_RESPONSES)
    async def health():
        """200 once the model is loaded and a warm-up step ran, else 503 (``draining`` from
        the shutdown signal on: `server.lifecycle`)."""
        if drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if engine.ready:
            # Safety off is said wherever an operator looks (our choice: never by accident).
            return {"status": "ok"} if server_safety.enabled else {"status": "ok",
                                                                   "safety": "disabled"}
        return JSONResponse({"status": "unavailable"}, status_code=503)

    # response_class without a media type: the 200 is Prometheus text alone.
    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text format (docs/operations.md, \"Metrics\").",
              "content": {CONTENT_TYPE: {"schema": {"type": "string"}}}},
        **error_responses(401, openai=False)})
    async def metrics():
        return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/info", responses=error_responses(401, 503, openai=False))
    async def info():
        """What this server runs and its limits (a subset of TGI's ``/info``)."""
        s = server_safety
        return {"model_id": settings.model_name, "max_input_tokens": settings.max_input_tokens,
                "max_new_tokens": settings.max_new_tokens_limit,
                "max_total_tokens": serving.limits.context,
                "max_waiting": engine.max_waiting, "max_num_seqs": engine.max_num_seqs,
                "max_batched_tokens": engine.max_batched_tokens,
                "safety": {"enabled": s.enabled, "threshold": s.threshold, "tau": s.tau,
                           "r1": s.r1, "r2": s.r2, "schedule": s.schedule, "action": s.action}}

    return app

