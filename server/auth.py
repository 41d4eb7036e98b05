"""API-key authentication and CORS, as ASGI middleware around the whole app.

Keys come from ``ESS_API_KEYS``; a request carries one as ``Authorization: Bearer <key>``
(OpenAI API reference, "Authentication"; the openai and huggingface_hub clients send it so).
The middleware is plain ASGI rather than ``BaseHTTPMiddleware``: that one runs the route in a
separate task, which would hide the client's disconnect from ``/generate``.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response
from .settings import Settings

ALWAYS_OPEN = frozenset({"/health"})
"""Paths that never need a key: load balancers and orchestrators probe them (our choice)."""


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive, as
    RFC 6750 §2.1 via RFC 7235); None when absent or another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def key_matches(token: str, keys: tuple[str, ...]) -> bool:
    """True when ``token`` equals one of ``keys``.

    Compared with `hmac.compare_digest` against every key, without stopping at a match, so the
    time taken does not tell which key (or how much of one) matched.
    """
    given = token.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    return found


def open_paths(settings: Settings) -> frozenset[str]:
    """Paths served without a key: /health always, /metrics unless ESS_METRICS_REQUIRE_AUTH."""
    return ALWAYS_OPEN if settings.metrics_require_auth else ALWAYS_OPEN | {"/metrics"}


class ApiKeyMiddleware:
    """Answers HTTP 401 (with ``WWW-Authenticate: Bearer``) unless the request carries one of
    ``keys`` or asks for a path in ``open``. The body is OpenAI's error shape under /v1 (type
    ``invalid_request_error``, code ``invalid_api_key``, as OpenAI answers) and TGI's elsewhere.
    """

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], open: frozenset[str]):
        self.app = app
        self.keys = keys
        self.open = open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open:
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"]
                       if k == b"authorization"), None)
        token = bearer_token(header)
        if token is not None and key_matches(token, self.keys):
            await self.app(scope, receive, send)
            return
        message = ("missing API key: send the header `Authorization: Bearer <key>`"
                   if token is None else "invalid API key")
        response = error_response(scope["path"], 401, message, "authentication",
                                  code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def install_auth_and_cors(app: FastAPI, settings: Settings) -> None:
    """Add the key check (when ESS_API_KEYS is set) inside CORS (when ESS_CORS_ORIGINS is set).

    CORS is the outer layer so a browser's preflight (``OPTIONS`` without credentials, which
    browsers never send on preflight) is answered without a key, and a 401 still carries the
    CORS headers the browser needs to show it. ``allow_credentials`` stays off: a bearer key is
    not a cookie, and it lets ``*`` mean any origin (our choice).
    """
    if settings.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys, open=open_paths(settings))
    if settings.cors_origins:  # added last: outermost
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                           expose_headers=["Retry-After"], allow_credentials=False,
                           max_age=600)
