"""Serving and draining: ``ess serve`` runs `serve`, a uvicorn server that drains on SIGTERM.

Drain semantics (our choice; Kubernetes sends SIGTERM, waits ``terminationGracePeriodSeconds``,
then kills):

1. On the first SIGTERM or SIGINT the app starts draining at once: ``/health`` answers 503
   (readiness probes take the replica out of rotation) and every new request except
   ``/health`` and ``/metrics`` gets 503 with ``Retry-After`` and ``Connection: close``. The
   port stays open: a client sees an answer, not a refused connection.
2. Requests already running get up to ``ESS_SHUTDOWN_TIMEOUT_SECONDS`` to finish.
3. Past it, the engine is stopped (`Engine.stop`): each running request ends with an abort,
   which a stream reports as one final error event naming the shutdown (the TGI shape, or
   OpenAI's ``data: {"error": ...}`` then ``data: [DONE]``) before its body closes cleanly; a
   non-streamed request gets 503. Up to `FLUSH_SECONDS` more are given for those last bytes.
4. uvicorn then closes the listeners and the idle connections, the lifespan stops the engine,
   and the process exits with status 0. A second signal skips what is left of step 2.

When the engine thread dies (a bug outside the decode step: its requests have failed and it never
serves again), the server shuts down the same way with nothing left to wait for and exits with
status 1, so that a supervisor (Kubernetes, systemd, a container restart policy) starts a fresh
one: vLLM's behaviour. ``ESS_KEEP_ALIVE_ON_ENGINE_DEATH=true`` keeps it up answering 503 instead.

uvicorn alone cannot do this: on SIGTERM it stops accepting at once (``/health`` is refused),
cancels the responses still running after ``timeout_graceful_shutdown`` (a truncated chunked
body, no final event) and re-raises the signal (exit status -15). sse-starlette also cancels
its streams after a grace period once it sees uvicorn's ``should_exit``; `DrainingServer` sets
that flag only when the drain is over, so sse-starlette has nothing left to cut.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import logging.config
import socket

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

# uvicorn configures this logger: drain messages land in the server's log with its own.
log = logging.getLogger("uvicorn.error")

PROBE_PATHS = frozenset({"/health", "/metrics"})
"""Paths still served normally while draining (probes and scrapes; our choice)."""
FLUSH_SECONDS = 5.0
"""After the timeout aborted the running requests: how long their final events may take to
reach the clients (one decode step, then the socket writes) before uvicorn cancels them."""
POLL_SECONDS = 0.05

SHUTTING_DOWN = "the server is shutting down; retry on another replica"


class Drain:
    """Shared between the app and the server loop (event-loop thread only).

    ``draining`` turns true on the first shutdown signal and stays so; ``in_flight`` counts the
    requests (probe paths excluded) whose response has not finished.
    """

    def __init__(self):
        self.draining = False
        self.in_flight = 0

    def begin(self) -> None:
        self.draining = True


class DrainMiddleware:
    """Counts requests in flight and, while draining, answers new ones 503 (plain ASGI, so
    streams and client disconnects pass through untouched, as in `server.auth`).

    The 503 has the route's error shape (`errors.error_response`), ``Retry-After`` and
    ``Connection: close`` (a pooled connection should go to another replica).
    """

    def __init__(self, app: ASGIApp, drain: Drain, retry_after_seconds: int):
        self.app = app
        self.drain = drain
        self.retry_after = str(retry_after_seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            response = error_response(scope["path"], 503, SHUTTING_DOWN, "unavailable",
                                      headers={"Retry-After": self.retry_after,
                                               "Connection": "close"})
            await response(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


def install_drain(app, retry_after_seconds: int) -> Drain:
    """Add `DrainMiddleware` to ``app``; returns its `Drain` (also ``app.state.drain``)."""
    drain = Drain()
    app.state.drain = drain
    app.add_middleware(DrainMiddleware, drain=drain, retry_after_seconds=retry_after_seconds)
    return drain


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose shutdown signal drains the app (module docstring) instead of
    stopping at once.

    Args:
        config: the uvicorn config; its app must have been built by `server.app.create_app`
            (``app.state.drain`` and ``app.state.engine``).
        shutdown_timeout: seconds running requests may take to finish after the signal.
    """

    def __init__(self, config: uvicorn.Config, shutdown_timeout: float,
                 keep_alive_on_engine_death: bool = False):
        super().__init__(config)
        app = config.app
        self.drain: Drain = app.state.drain
        self.engine = app.state.engine
        self.shutdown_timeout = shutdown_timeout
        self.keep_alive_on_engine_death = keep_alive_on_engine_death
        self.engine_died = False
        """Set when the server shut down because the engine thread died (exit status 1)."""
        self._cut_now = False
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:
        """The signal handler (main thread, between two bytecodes: only set flags).

        The signal is not recorded for re-raising (uvicorn's default), so the process exits 0.
        """
        if self.drain.draining:
            self._cut_now = True
        else:
            self.drain.begin()

    async def on_tick(self, counter: int) -> bool:
        if self.engine.crashed and not self.keep_alive_on_engine_death and not self.drain.draining:
            log.error("The engine thread died: shutting down with exit status 1 "
                      "(ESS_KEEP_ALIVE_ON_ENGINE_DEATH=true keeps the server up, answering 503)")
            self.engine_died = True
            self.drain.begin()
        if self.drain.draining and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain_then_exit())
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        loop = asyncio.get_running_loop()
        log.info("Draining %d request(s) for up to %g s (ESS_SHUTDOWN_TIMEOUT_SECONDS)",
                 self.drain.in_flight, self.shutdown_timeout)
        await self._wait_in_flight(loop.time() + self.shutdown_timeout, lambda: self._cut_now)
        if self.drain.in_flight:
            log.warning("Shutdown timeout: aborting %d request(s) still running",
                        self.drain.in_flight)
            await self.engine.stop()
            await self._wait_in_flight(loop.time() + FLUSH_SECONDS, lambda: False)
        self.should_exit = True

    async def _wait_in_flight(self, deadline: float, stop) -> None:
        loop = asyncio.get_running_loop()
        while self.drain.in_flight and loop.time() < deadline and not stop():
            await asyncio.sleep(POLL_SECONDS)


OWN_LOGGERS = ("ess", "safety_decoding")
"""Our packages' loggers: `server_config` sends their records to uvicorn's handler (the
engine's warm-up, the compiled step's compile time, a failed compile)."""


def log_config(level: str = "info") -> dict:
    """uvicorn's logging config, plus `OWN_LOGGERS` on its ``default`` handler (stderr) at
    ``level`` (a key of uvicorn's ``LOG_LEVELS``, ``ESS_LOG_LEVEL``). Without them, our INFO
    records had no handler and were dropped (Python logs only warnings then)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    for name in OWN_LOGGERS:
        # propagate: a handler on the root (pytest's caplog) still sees them; an embedding app
        # that puts one on the root prints our lines twice, which beats losing them
        config["loggers"][name] = {"handlers": ["default"], "level": uvicorn.config.LOG_LEVELS[level],
                                   "propagate": True}
    return config


def server_config(app, settings, **overrides) -> uvicorn.Config:
    """The uvicorn config of ``ess serve``; ``timeout_graceful_shutdown`` is only a backstop
    for responses that ignore the drain (uvicorn cancels them `FLUSH_SECONDS` after it)."""
    options = {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
               "log_config": log_config(settings.log_level), "timeout_graceful_shutdown": FLUSH_SECONDS,
               **overrides}
    return uvicorn.Config(app, **options)


LISTEN_BACKLOG = 2048
"""Connections the kernel queues before they are accepted (uvicorn's default backlog)."""


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening, as uvicorn makes one (``SO_REUSEADDR``).

    `serve` listens before the model loads, so a busy port fails at once (uvicorn binds only
    after the app is built). It listens, not only binds: with ``SO_REUSEADDR`` a second bind of a
    port that nobody listens on yet succeeds. Connections made during the load wait in the
    backlog and are answered once the server is up (our choice, where uvicorn refused them).

    Raises:
        ServeError: the address cannot be bound (in use, or not this machine's).
    """
    from .bootstrap import ServeError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {url_host(host)}:{port} ({exc.strerror or exc}); set "
                         "ESS_PORT (--port) or ESS_HOST (--host)") from exc
    return sock


def url_host(host: str) -> str:
    """``host`` as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def serve(settings, app=None) -> int:
    """Serve ``app`` (built from ``settings`` by `bootstrap.build_app` when None) until a
    shutdown signal, drain (module docstring), and return the exit status: 0, or 1 when the
    engine thread died.

    Raises:
        ServeError: the address cannot be bound (`listen`), or the app cannot be built.
    """
    logging.config.dictConfig(log_config(settings.log_level))  # before the model loads, which logs too
    sock = listen(settings.host, settings.port)
    with sock:
        if app is None:
            from .bootstrap import build_app

            app = build_app(settings)
        config = server_config(app, settings)  # configures uvicorn's loggers
        # uvicorn names the address only when it binds the socket itself
        host, port = sock.getsockname()[:2]
        log.info("ess serve: listening on http://%s:%d (Press CTRL+C to quit)", url_host(host), port)
        server = DrainingServer(config, settings.shutdown_timeout_seconds,
                                settings.keep_alive_on_engine_death)
        server.run(sockets=[sock])
    return 1 if server.engine_died else 0
