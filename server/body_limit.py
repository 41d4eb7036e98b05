"""Request body limits: HTTP 413 past ``ESS_MAX_BODY_BYTES`` (TGI's ``--payload-limit``), 408
past ``ESS_BODY_TIMEOUT_SECONDS`` (nginx's ``client_body_timeout``).

Without it a client could send a body of any size: the routes read and parse the whole of it
before any field is checked, and unknown fields of the OpenAI routes are ignored, so a 200 MB
body was read, parsed and answered 200, and the server kept the memory (session 22's attack
review). A body announced by ``Content-Length`` over the limit is refused before it is read; a
chunked one as soon as what has arrived passes it. A body that arrives a byte at a time is cut
off at the deadline: 100 connections holding nearly 8 MiB each kept 557 MiB of the server's
memory for as long as they dripped (the second review). Both answers close the connection.
Plain ASGI, as `server.auth`.
"""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

PAYLOAD_TOO_LARGE = 413
REQUEST_TIMEOUT = 408
CLOSE = {"Connection": "close"}


def too_large_message(size: int | None, limit: int) -> str:
    """The 413 message: names the body, its size when known, and the setting."""
    seen = f" {size} bytes," if size is not None else ""
    return f"body:{seen} over the limit of {limit} bytes (ESS_MAX_BODY_BYTES)"


def content_length(scope: Scope) -> int | None:
    """The request's ``Content-Length``, or None when absent or not a number."""
    for key, value in scope["headers"]:
        if key == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def too_slow_message(seconds: float) -> str:
    """The 408 message: names the body and the setting."""
    return f"body: not received within {seconds:g} s (ESS_BODY_TIMEOUT_SECONDS)"


class BodyLimitMiddleware:
    """Answers 413 (the route's error shape, ``param`` ``body``) to a body over ``max_bytes``,
    and 408 to one not received within ``timeout`` seconds."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = content_length(scope)
        if size is not None and size > self.max_bytes:
            response = error_response(scope["path"], PAYLOAD_TOO_LARGE,
                                      too_large_message(size, self.max_bytes), "validation",
                                      param="body", headers=CLOSE)
            await response(scope, receive, send)
            return
        received, complete = 0, False
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # after the body: the route listens for the client's disconnect
                return await receive()
            # Raised inside the route's body read: FastAPI re-raises HTTPException, and the
            # app's handler answers it in the route's error shape.
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                raise HTTPException(REQUEST_TIMEOUT, too_slow_message(self.timeout), CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(PAYLOAD_TOO_LARGE, too_large_message(None, self.max_bytes), CLOSE)
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited, send)
