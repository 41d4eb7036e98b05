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
from enum import Enum

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import EngineError, EngineNotRunning, EngineOverloaded, EngineTimeout

log = logging.getLogger("ess.errors")
ACCESS_LOG = logging.getLogger("uvicorn.access")

OPENAI_PREFIX = "/v1"

# TGI answers validation errors with 422; we use 400 for every bad field (schema, library
# ParameterError/PromptError) on both protocols so clients see one status. One place to change.
VALIDATION_STATUS = 400
# An input that does not fit (docs/operations.md, "Errors and status codes"): the status the
# reference server of the protocol answers it with, TGI's 422 on our TGI routes (router
# ``InferError::ValidationError``), vLLM's 400 under /v1.
TGI_TOO_LONG_STATUS = 422
CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": nobody reads it, logs do
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's error code for an over-long input



class ErrorKind(str, Enum):
    """Our kind of error: the TGI ``error_type`` (a plain string on the wire)."""

    VALIDATION = "validation"
    AUTHENTICATION = "authentication"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    GENERATION = "generation"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class OpenAIErrorType(str, Enum):
    """OpenAI's error ``type`` (API reference, "Error codes")."""

    INVALID_REQUEST = "invalid_request_error"
    RATE_LIMIT = "rate_limit_exceeded"
    SERVER = "server_error"


# Our kind -> OpenAI's ``type``. OpenAI reports authentication and unknown routes as
# "invalid_request_error" too (API reference, "Error codes").
OPENAI_TYPES = {
    ErrorKind.VALIDATION: OpenAIErrorType.INVALID_REQUEST,
    ErrorKind.AUTHENTICATION: OpenAIErrorType.INVALID_REQUEST,
    ErrorKind.NOT_FOUND: OpenAIErrorType.INVALID_REQUEST,
    ErrorKind.METHOD_NOT_ALLOWED: OpenAIErrorType.INVALID_REQUEST,
    ErrorKind.OVERLOADED: OpenAIErrorType.RATE_LIMIT,
    ErrorKind.UNAVAILABLE: OpenAIErrorType.SERVER,
    ErrorKind.GENERATION: OpenAIErrorType.SERVER,
    ErrorKind.TIMEOUT: OpenAIErrorType.SERVER,
    ErrorKind.INTERNAL: OpenAIErrorType.SERVER,
}


# ---- the bodies, as models (the OpenAPI document shows these) --------------------------------


class TGIError(BaseModel):
    """An error on the TGI routes and every path outside /v1 (TGI's ``ErrorResponse``)."""

    error: str = Field(description="What went wrong; a bad field's path comes first.")
    error_type: ErrorKind


class OpenAIErrorDetail(BaseModel):
    """The ``error`` object of an OpenAI error."""

    message: str = Field(description="What went wrong; a bad field's path comes first.")
    type: OpenAIErrorType
    param: str | None = Field(description="The request field at fault, or null.")
    code: str | None = Field(description="`context_length_exceeded`, `invalid_api_key`, "
                                          "`rate_limit_exceeded`, `timeout`, or null.")


class OpenAIError(BaseModel):
    """An error under /v1 (OpenAI's shape; vLLM's ``ErrorResponse`` has the same fields)."""

    error: OpenAIErrorDetail


class InvalidRequest(Exception):
    """A request field is at fault (HTTP ``status``, 400).

    Args:
        field: dotted path of the field (``parameters.top_p``, ``messages[2].content``).
        message: what is wrong, without the field name.
        code: OpenAI's machine-readable ``code``, or None.
    """

    status = VALIDATION_STATUS

    def __init__(self, field: str, message: str, code: str | None = None):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.code = code


class InputTooLong(InvalidRequest):
    """The input, or input + max_new_tokens, does not fit this server's limits.

    Args:
        field: the field OpenAI's ``param`` names.
        message: the whole message, in the protocol's reference server's words (it names
            the fields itself).
        status: HTTP status (`TGI_TOO_LONG_STATUS` on TGI routes, 400 under /v1).
    """

    def __init__(self, field: str, message: str, status: int):
        Exception.__init__(self, message)
        self.field = field
        self.code = CONTEXT_LENGTH_EXCEEDED
        self.status = status


class ClientDisconnected(Exception):
    """The client left before a whole (non-streamed) response was ready; the engine aborted
    the request. Answered with `CLIENT_CLOSED_STATUS` and no body."""


# What each error status means (docs/operations.md, "Errors and status codes"), for the
# OpenAPI document; routes list the statuses they can answer with `error_responses`.
STATUS_DESCRIPTIONS = {
    400: "A bad field (the message starts with its path), or a body that is not UTF-8 JSON; "
         "under /v1 also an input that does not fit (code `context_length_exceeded`).",
    401: "ESS_API_KEYS is set and the `Authorization: Bearer` key is missing or wrong.",
    408: "The body did not arrive within ESS_BODY_TIMEOUT_SECONDS.",
    413: "The body is over ESS_MAX_BODY_BYTES.",
    422: "The input, or input + max_new_tokens, does not fit this server (TGI's status and "
         "message).",
    424: "The decode loop failed for this request (TGI's status).",
    429: "The queue is full (ESS_MAX_WAITING): `Model is overloaded`.",
    CLIENT_CLOSED_STATUS: "The client closed the connection before the response was ready "
                          "(no body; the access log has its line). The request was aborted.",
    500: "Anything unexpected; under /v1 also a failure of the decode loop.",
    503: "The engine is not running, the server is draining, or shutdown aborted the request.",
    504: "ESS_REQUEST_TIMEOUT_SECONDS passed before the request finished.",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer`.", "required": True,
                               "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait (ESS_RETRY_AFTER_SECONDS).",
                          "required": True, "schema": {"type": "integer", "minimum": 0}}},
}


def error_responses(*statuses: int, openai: bool) -> dict[int, dict]:
    """FastAPI ``responses=`` for a route that answers ``statuses``: each with its
    description, the route's error model (`OpenAIError` under /v1, else `TGIError`) and the
    headers it always carries; `CLIENT_CLOSED_STATUS` has no body."""
    out = {}
    for status in statuses:
        entry: dict = {"description": STATUS_DESCRIPTIONS[status]}
        if status != CLIENT_CLOSED_STATUS:
            entry["model"] = OpenAIError if openai else TGIError
        if status in _HEADERS:
            entry["headers"] = _HEADERS[status]
        out[status] = entry
    return out


# ---- pure shapes -----------------------------------------------------------------------------


def is_openai_path(path: str) -> bool:
    """True for ``/v1`` and everything under it: those routes answer in OpenAI's shape."""
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def tgi_error_body(message: str, kind: str) -> dict:
    """TGI's error shape (`TGIError`; ``router/src/lib.rs`` ``ErrorResponse``); ``kind`` is an
    `ErrorKind` value."""
    return TGIError(error=message, error_type=kind).model_dump(mode="json")


def openai_error_body(message: str, kind: str, param: str | None = None,
                      code: str | None = None) -> dict:
    """OpenAI's error shape (`OpenAIError`); ``kind`` is an `ErrorKind` value."""
    detail = OpenAIErrorDetail(message=message, param=param, code=code,
                               type=OPENAI_TYPES.get(kind, OpenAIErrorType.SERVER))
    return OpenAIError(error=detail).model_dump(mode="json")


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


def log_access(request: Request, status: int) -> None:
    """uvicorn's access-log line for a response uvicorn will not log itself: it logs when it
    sends the response start, which it skips once the client has gone (so a 499 would be
    missing). Same logger, format and arguments, so ``--no-access-log`` silences it too."""
    client = request.scope.get("client")
    addr = f"{client[0]}:{client[1]}" if client else "-"
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    ACCESS_LOG.info('%s - "%s %s HTTP/%s" %d', addr, request.method, path,
                    request.scope.get("http_version", "1.1"), status)


def install_error_handlers(app: FastAPI, retry_after_seconds: int) -> None:
    """Map every exception a route can raise to `error_response` (status per kind).

    Statuses: 400 bad request (422 for an over-long input on TGI routes, `InputTooLong`),
    404/405 routing, 429 queue full (with Retry-After), 499 client gone, 503 engine not running,
    504 request timeout, 424 generation failure on TGI routes (TGI's status) and 500 under /v1
    (OpenAI has no 424), 500 anything unexpected.
    """

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        return error_response(request.url.path, VALIDATION_STATUS, validation_message(errors),
                              "validation", param=first_error_field(errors))

    @app.exception_handler(InvalidRequest)
    async def _on_invalid(request: Request, exc: InvalidRequest):
        return error_response(request.url.path, exc.status, str(exc), "validation",
                              param=exc.field, code=exc.code)

    @app.exception_handler(ClientDisconnected)
    async def _on_disconnected(request: Request, exc: ClientDisconnected):
        log_access(request, CLIENT_CLOSED_STATUS)
        return Response(status_code=CLIENT_CLOSED_STATUS)

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
