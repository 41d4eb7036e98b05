"""Error shapes and the app's exception handlers.

Two shapes, chosen by path (one rule, `is_openai_path`):
- our TGI routes: ``{"error": message, "error_type": kind}`` (TGI's ``ErrorResponse``);
- ``/v1/*``: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI API reference,
  "Error codes"; vLLM's ``ErrorResponse`` has the same fields).

Every error response the server sends goes through `error_response`, including FastAPI's own 404 /
405 / body-parse errors, which would otherwise answer ``{"detail": ...}``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import EngineError, EngineNotRunning, EngineOverloaded, EngineTimeout

log = logging.getLogger("ess.errors")

OPENAI_PREFIX = "/v1"

# TGI answers validation errors with 422; we use 400 for every bad request (schema, library
# ParameterError/PromptError, prompt length) so clients see one status. One place to change.
VALIDATION_STATUS = 400

# Our kind (the TGI ``error_type``) -> OpenAI's ``type``. OpenAI reports authentication and
# unknown routes as "invalid_request_error" too (API reference, "Error codes").
OPENAI_TYPES = {
    "validation": "invalid_request_error",
    "authentication": "invalid_request_error",
    "not_found": "invalid_request_error",
    "method_not_allowed": "invalid_request_error",
    "overloaded": "rate_limit_exceeded",
    "unavailable": "server_error",
    "generation": "server_error",
    "timeout": "server_error",
    "internal": "server_error",
}


class InvalidRequest(Exception):
    """A request field is at fault (HTTP 400).

    Args:
        field: dotted path of the field (``parameters.top_p``, ``messages[2].content``).
        message: what is wrong, without the field name.
        code: OpenAI's machine-readable ``code`` (``context_length_exceeded``), or None.
    """

    def __init__(self, field: str, message: str, code: str | None = None):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.code = code


# ---- pure shapes -----------------------------------------------------------------------------


def is_openai_path(path: str) -> bool:
    """True for ``/v1`` and everything under it: those routes answer in OpenAI's shape."""
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def tgi_error_body(message: str, kind: str) -> dict:
    """TGI's error shape (``router/src/lib.rs`` ``ErrorResponse``)."""
    return {"error": message, "error_type": kind}


def openai_error_body(message: str, kind: str, param: str | None = None,
                      code: str | None = None) -> dict:
    """OpenAI's error shape; ``kind`` is one of `OPENAI_TYPES`' keys."""
    return {"error": {"message": message, "type": OPENAI_TYPES.get(kind, "server_error"),
                      "param": param, "code": code}}


def error_body_for(path: str, message: str, kind: str, param: str | None = None,
                   code: str | None = None) -> dict:
    """The error body for a request to ``path`` (OpenAI's shape under /v1, else TGI's)."""
    if is_openai_path(path):
        return openai_error_body(message, kind, param, code)
    return tgi_error_body(message, kind)


def error_response(path: str, status: int, message: str, kind: str, *, param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    """`error_body_for` as a JSON response with ``status``."""
    return JSONResponse(error_body_for(path, message, kind, param, code), status_code=status,
                        headers=headers)


def field_path(loc) -> str:
    """Pydantic ``loc`` -> ``parameters.stop[2]`` (the leading ``body`` dropped)."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    path = ""
    for p in parts:
        path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else str(p))
    return path or "body"


def _error_field(e: dict) -> str:
    # A JSON syntax error's loc is (body, character offset): the body is at fault.
    return "body" if e.get("type") == "json_invalid" else field_path(e.get("loc", ()))


def validation_message(errors) -> str:
    """One line naming every offending field: ``parameters.top_p: Input should be ...``."""
    lines = []
    for e in errors:
        if e.get("type") == "json_invalid":
            detail = (e.get("ctx") or {}).get("error")
            lines.append(f"body: invalid JSON{f' ({detail})' if detail else ''}")
        else:
            lines.append(f"{_error_field(e)}: {e.get('msg', 'invalid')}")
    return "; ".join(lines) or "body: invalid request"


def first_error_field(errors) -> str | None:
    """The field OpenAI's ``param`` names: the first offending one."""
    return _error_field(errors[0]) if errors else None


def http_error_message(status: int, method: str, path: str, detail) -> tuple[str, str]:
    """``(message, kind)`` for an HTTPException Starlette/FastAPI raised itself.

    FastAPI raises these for unknown routes (404), wrong methods (405) and bodies it cannot
    decode (400: not UTF-8, or not JSON text); anything else keeps its own detail.
    """
    if status == 404:
        return f"no route for {method} {path}", "not_found"
    if status == 405:
        return f"method {method} is not allowed on {path}", "method_not_allowed"
    if status == 400:
        return f"body: {detail} (the body must be UTF-8 encoded JSON)", "validation"
    return str(detail), "internal" if status >= 500 else "validation"


def engine_error_kind(exc: EngineError) -> str:
    """Our kind for an engine failure (the stream error event's ``error_type``)."""
    if isinstance(exc, EngineNotRunning):
        return "unavailable"
    return "timeout" if isinstance(exc, EngineTimeout) else "generation"


# ---- handlers --------------------------------------------------------------------------------


def install_error_handlers(app: FastAPI, retry_after_seconds: int) -> None:
    """Map every exception a route can raise to `error_response` (status per kind).

    Statuses: 400 bad request, 404/405 routing, 429 queue full (with Retry-After), 503 engine
    not running, 504 request timeout, 424 generation failure on TGI routes (TGI's status) and 500 under /v1 (OpenAI
    has no 424), 500 anything unexpected.
    """

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        return error_response(request.url.path, VALIDATION_STATUS, validation_message(errors),
                              "validation", param=first_error_field(errors))

    @app.exception_handler(InvalidRequest)
    async def _on_invalid(request: Request, exc: InvalidRequest):
        return error_response(request.url.path, VALIDATION_STATUS, str(exc), "validation",
                              param=exc.field, code=exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException):
        message, kind = http_error_message(exc.status_code, request.method, request.url.path,
                                           exc.detail)
        return error_response(request.url.path, exc.status_code, message, kind,
                              param="body" if kind == "validation" else None,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(EngineOverloaded)
    async def _on_overloaded(request: Request, exc: EngineOverloaded):
        return error_response(request.url.path, 429, "Model is overloaded", "overloaded",
                              code="rate_limit_exceeded",
                              headers={"Retry-After": str(retry_after_seconds)})

    @app.exception_handler(EngineNotRunning)
    async def _on_not_running(request: Request, exc: EngineNotRunning):
        return error_response(request.url.path, 503, str(exc), "unavailable")

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception):
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}",
                              "internal")

    @app.exception_handler(EngineError)
    async def _on_engine_error(request: Request, exc: EngineError):
        status = 500 if is_openai_path(request.url.path) else 424  # TGI's generation status
        return error_response(request.url.path, status, str(exc), "generation")

    @app.exception_handler(EngineTimeout)
    async def _on_timeout(request: Request, exc: EngineTimeout):
        return error_response(request.url.path, 504, str(exc), "timeout", code="timeout")
