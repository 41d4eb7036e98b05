"""The OpenAPI document (``GET /openapi.json``) of one server: what its routes really accept
and answer.

FastAPI builds the document from the request models and the routes' ``responses=``
(`errors.error_responses`); `install_openapi` then makes it this server's:

- FastAPI's default 422 "Validation Error" is removed: no route answers it (a bad field is
  400; TGI routes answer 422 only for an over-long input, with `errors.TGIError`);
- the bounds that depend on the settings are written in: the largest ``max_new_tokens`` /
  ``max_tokens`` / ``max_completion_tokens`` (ESS_MAX_NEW_TOKENS_LIMIT), and the safety
  overrides a request may still ask for (only stricter than this server's policy:
  `SafetyParams.stricter`);
- with ESS_API_KEYS set, a bearer security scheme on every route but the open ones.

A schema-driven client (or a fuzzer) can then trust it: a body the document accepts is
accepted, and one it rejects is a 400.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from safety_decoding.types import Action, Schedule

DESCRIPTION = (
    "LLM inference with an explicit safety signal: TGI's routes, and OpenAI's under /v1. "
    "Request bodies are validated strictly: an integer field takes a JSON integer (`4`, not "
    "`4.0`), a boolean only `true`/`false`, a string only a string. Errors have the route's "
    "shape: `TGIError` outside /v1, `OpenAIError` under it (docs/operations.md, \"Errors and "
    "status codes\").")
"""What JSON Schema cannot say about the bodies (to it, 4.0 is the integer 4)."""
SSE_MEDIA_TYPE = "text/event-stream"
MAX_TOKENS_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens")
"""Request fields bounded by ESS_MAX_NEW_TOKENS_LIMIT (TGI's and OpenAI's names)."""
_FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")


def _health(statuses: list[str], with_safety: bool) -> dict:
    props = {"status": {"type": "string", "enum": statuses}}
    if with_safety:
        props["safety"] = {"type": "string", "enum": ["disabled"],
                           "description": "Only when ESS_SAFETY_ENABLED=false."}
    return {"content": {"application/json": {"schema": {
        "type": "object", "properties": props, "required": ["status"],
        "additionalProperties": False}}}}


HEALTH_RESPONSES = {
    200: {"description": "The model is loaded and warm.", **_health(["ok"], True)},
    503: {"description": "Not ready yet, stopped, or draining after a shutdown signal.",
          **_health(["unavailable", "draining"], False)},
}
"""``GET /health``'s answers (`server.app`)."""


def stream_response(description: str) -> dict:
    """A ``responses=`` entry for a 200 that is a server-sent event stream. Before OpenAPI 3.2
    (FastAPI writes 3.1) the schema of ``text/event-stream`` is that of one event."""
    event = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "description": "JSON text, or `[DONE]` "
                                                                      "ending an OpenAI stream"}}}
    return {"description": description, "content": {SSE_MEDIA_TYPE: {"schema": event}}}


def _non_null(prop: dict) -> list[dict]:
    """The schemas of ``prop`` that are not ``null`` (the branches of an ``anyOf``)."""
    branches = prop.get("anyOf", [prop])
    return [b for b in branches if b.get("type") != "null"]


def _bound_properties(schemas: dict, names: tuple[str, ...], **bounds) -> None:
    """Add ``bounds`` (JSON Schema keywords) to the non-null branch of every property called
    one of ``names`` in the component ``schemas``."""
    for component in schemas.values():
        for name, prop in component.get("properties", {}).items():
            if name in names:
                for branch in _non_null(prop):
                    branch.update(bounds)


def _allowed_stricter(current, order: list) -> list[str]:
    """The values a request may ask for: ``current`` and the stricter ones before it."""
    return [v.value for v in order[: order.index(current) + 1]]


def _ignored_max_tokens(chat: dict | None, limit: int) -> None:
    """Chat's ``max_tokens`` is ignored, so not bounded, when ``max_completion_tokens`` is set
    (vLLM's rule, `ChatCompletionRequest.max_tokens_field`)."""
    if chat is None:
        return
    for branch in _non_null(chat["properties"]["max_tokens"]):
        branch.pop("maximum", None)
    chat.setdefault("allOf", []).append({
        "if": {"properties": {"max_completion_tokens": {"type": "integer"}},
               "required": ["max_completion_tokens"]},
        "else": {"properties": {"max_tokens": {"maximum": limit}}}})


def _drop_fastapi_validation(doc: dict) -> None:
    for path in doc.get("paths", {}).values():
        for operation in path.values():
            response = operation.get("responses", {}).get("422", {})
            ref = (response.get("content", {}).get("application/json", {})
                   .get("schema", {}).get("$ref", ""))
            if ref.endswith("/HTTPValidationError"):
                del operation["responses"]["422"]
    schemas = doc.get("components", {}).get("schemas", {})
    for name in _FASTAPI_VALIDATION:
        schemas.pop(name, None)


def _add_bearer_security(doc: dict, open_paths: frozenset[str]) -> None:
    doc.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "One of ESS_API_KEYS."}}
    doc["security"] = [{"bearer": []}]
    for path in open_paths:
        for operation in doc.get("paths", {}).get(path, {}).values():
            operation["security"] = []


def server_openapi(app: FastAPI, settings, safety, open_paths: frozenset[str]) -> dict:
    """The OpenAPI document of ``app`` for these ``settings`` and ``safety`` (the server's
    `SafetyParams`); ``open_paths`` need no key (`auth.open_paths`). Pure: builds a new dict.
    """
    doc = get_openapi(title=app.title, version=app.version, description=DESCRIPTION,
                      routes=app.routes)
    _drop_fastapi_validation(doc)
    schemas = doc.get("components", {}).get("schemas", {})
    limit = settings.max_new_tokens_limit
    _bound_properties(schemas, MAX_TOKENS_FIELDS, maximum=limit)
    _ignored_max_tokens(schemas.get("ChatCompletionRequest"), limit)
    overrides = schemas.get("SafetyOverrides", {}).get("properties", {})
    for branch in _non_null(overrides.get("threshold", {})):
        branch["maximum"] = safety.threshold
    for name, kind in (("schedule", Schedule), ("action", Action)):
        for branch in _non_null(overrides.get(name, {})):
            branch["enum"] = _allowed_stricter(getattr(safety, name), list(kind))
    if settings.api_keys:
        _add_bearer_security(doc, open_paths)
    return doc


def install_openapi(app: FastAPI, settings, safety, open_paths: frozenset[str]) -> None:
    """Serve `server_openapi` at ``/openapi.json`` (built once, on the first request)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = server_openapi(app, settings, safety, open_paths)
        return app.openapi_schema

    app.openapi = openapi
