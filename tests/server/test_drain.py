"""The shutdown drain (`server.lifecycle`) on a real uvicorn server and the tiny model: what
finishes in time finishes, what does not ends with an error event and a complete body."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from _http import stream_payloads
from _server_helpers import SlowDecoder, start_server
from server.app import create_app
from server.engine import Engine
from server.lifecycle import DrainingServer, server_config
from server.settings import Settings

TIMEOUT = 2.0  # ESS_SHUTDOWN_TIMEOUT_SECONDS of the test server


def _start(app, settings) -> tuple[DrainingServer, threading.Thread, str]:
    return start_server(app, DrainingServer(server_config(app, settings, port=0, log_level="warning"),
                                            settings.shutdown_timeout_seconds))


def test_sigterm_drains_then_cuts_with_error_events(tiny_model, tokenizer):
    settings = Settings(max_new_tokens_limit=1000, shutdown_timeout_seconds=TIMEOUT,
                        sse_ping_seconds=0, retry_after_seconds=7)
    app = create_app(Engine(SlowDecoder(tiny_model, tokenizer, delay=0.03)), settings)
    srv, thread, url = _start(app, settings)
    long_tgi = {"inputs": "Hi", "parameters": {"max_new_tokens": 1000, "ignore_eos": True}}
    short_tgi = {"inputs": "Hi", "parameters": {"max_new_tokens": 25, "ignore_eos": True}}
    long_chat = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True,
                 "max_tokens": 1000, "ignore_eos": True}
    started = [threading.Event() for _ in range(3)]
    with ThreadPoolExecutor(4) as pool:
        short = pool.submit(stream_payloads, url, "/generate_stream", short_tgi, started[0])
        cut = pool.submit(stream_payloads, url, "/generate_stream", long_tgi, started[1])
        cut_chat = pool.submit(stream_payloads, url, "/v1/chat/completions", long_chat, started[2])
        whole = pool.submit(httpx.post, url + "/generate", json=long_tgi, timeout=60)
        assert all(e.wait(30) for e in started)
        t0 = time.monotonic()
        srv.handle_exit(signal.SIGTERM, None)

        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and health.json() == {"status": "draining"}
        refused = httpx.post(url + "/generate", json=short_tgi, timeout=5)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "7"
        assert refused.json()["error_type"] == "unavailable"
        refused = httpx.post(url + "/v1/chat/completions", json={**long_chat, "stream": False},
                             timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
        assert httpx.get(url + "/metrics", timeout=5).status_code == 200  # scrapes still answer

        # Finished in time: its normal final event.
        details = json.loads(short.result()[-1])["details"]
        assert details["generated_tokens"] == 25 and details["finish_reason"] != "abort"
        # Cut by the timeout: an error event naming the shutdown, then a clean close.
        last = json.loads(cut.result()[-1])
        assert set(last) == {"error", "error_type"} and "shutting down" in last["error"]
        chat = cut_chat.result()
        assert chat[-1] == "[DONE]"
        assert "shutting down" in json.loads(chat[-2])["error"]["message"]
        assert whole.result().status_code == 503
    cut_after = time.monotonic() - t0
    assert TIMEOUT <= cut_after < TIMEOUT + 5
    thread.join(15)
    assert not thread.is_alive()
    assert not app.state.engine.ready


def test_sigterm_when_idle_exits_at_once(tiny_model, tokenizer):
    settings = Settings(shutdown_timeout_seconds=30)
    app = create_app(Engine(SlowDecoder(tiny_model, tokenizer, delay=0)), settings)
    srv, thread, url = _start(app, settings)
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    t0 = time.monotonic()
    srv.handle_exit(signal.SIGTERM, None)
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - t0 < 5


def test_second_signal_cuts_the_drain_short(tiny_model, tokenizer):
    settings = Settings(max_new_tokens_limit=1000, shutdown_timeout_seconds=60, sse_ping_seconds=0)
    app = create_app(Engine(SlowDecoder(tiny_model, tokenizer, delay=0.03)), settings)
    srv, thread, url = _start(app, settings)
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 1000, "ignore_eos": True}}
        cut = pool.submit(stream_payloads, url, "/generate_stream", body, started)
        assert started.wait(30)
        t0 = time.monotonic()
        srv.handle_exit(signal.SIGTERM, None)
        time.sleep(0.3)
        srv.handle_exit(signal.SIGINT, None)
        assert "shutting down" in cut.result()[-1]
    thread.join(15)
    assert not thread.is_alive() and time.monotonic() - t0 < 10


class CrashingDecoder(SlowDecoder):
    """The engine thread dies on a prompt that says "crash": `prefill_columns`, which the
    engine calls outside any decode step, raises (a bug in the loop, on demand)."""

    def prefill_columns(self, request):
        if "crash" in self.tok.decode(request.prompt.ids):
            raise RuntimeError("bug in the engine loop")
        return super().prefill_columns(request)


@pytest.mark.parametrize("keep_alive", [False, True])
def test_a_dead_engine_ends_the_server_with_status_1_unless_kept_alive(tiny_model, tokenizer, keep_alive):
    """As vLLM: the engine thread's death fails what it held and stops the server, whose
    `serve` then returns 1 for a supervisor to restart it; ESS_KEEP_ALIVE_ON_ENGINE_DEATH keeps
    it up, answering 503."""
    settings = Settings(shutdown_timeout_seconds=30, keep_alive_on_engine_death=keep_alive)
    app = create_app(Engine(CrashingDecoder(tiny_model, tokenizer, delay=0)), settings)
    srv = DrainingServer(server_config(app, settings, port=0, log_level="critical"),
                         settings.shutdown_timeout_seconds, settings.keep_alive_on_engine_death)
    srv, thread, url = start_server(app, srv)
    failed = httpx.post(url + "/generate", json={"inputs": "crash"}, timeout=30)
    assert failed.status_code == 424  # TGI's status of a failed generation
    thread.join(10)
    if keep_alive:
        assert thread.is_alive() and not srv.engine_died
        assert httpx.get(url + "/health", timeout=5).status_code == 503
        srv.handle_exit(signal.SIGTERM, None)
        thread.join(10)
    else:
        assert srv.engine_died
    assert not thread.is_alive()


def test_a_busy_port_fails_before_the_model_loads(monkeypatch):
    """`serve` listens first: a second server on a busy port stops in a second with the address
    and the setting to change, without building the app (which loads the model); so does one
    that starts while the first is still loading (bound and listening, not yet serving)."""
    import pytest

    import server.bootstrap as bootstrap
    from server.bootstrap import ServeError
    from server.lifecycle import listen, serve

    built = []
    monkeypatch.setattr(bootstrap, "build_app", lambda settings: built.append(settings))
    with listen("127.0.0.1", 0) as loading:
        port = loading.getsockname()[1]
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port} .*ESS_PORT"):
            serve(Settings(host="127.0.0.1", port=port))
    assert built == []


def test_the_listening_address_is_written_as_a_url():
    from server.lifecycle import url_host

    assert (url_host("::1"), url_host("127.0.0.1"), url_host("localhost")) == ("[::1]", "127.0.0.1", "localhost")


@pytest.mark.parametrize("level, shown", [("INFO", True), ("warning", False)])
def test_our_info_records_reach_the_server_log_at_ess_log_level(level, shown):
    """`ess serve` shows the engine's and the compiled step's INFO lines (they were dropped:
    no handler took our loggers' records below WARNING), unless ESS_LOG_LEVEL is above INFO.
    In a child process: the config is process-wide."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import logging, logging.config; from server.lifecycle import log_config; "
            "from server.settings import Settings; "
            "logging.config.dictConfig(log_config(Settings().log_level)); "
            "logging.getLogger('safety_decoding.compiled').info('compiled the decode step for 1 row(s)'); "
            "logging.getLogger('ess.engine').info('engine warm'); "
            "logging.getLogger('ess.engine').warning('a warning')")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ESS_LOG_LEVEL": level}
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=repo, env=env).stderr
    assert ("compiled the decode step for 1 row(s)" in err and "engine warm" in err) == shown
    assert "a warning" in err


def test_an_unknown_log_level_is_refused_naming_the_setting(monkeypatch):
    from pydantic import ValidationError

    from server.settings import Settings

    monkeypatch.setenv("ESS_LOG_LEVEL", "verbose")
    with pytest.raises(ValidationError, match="log_level"):
        Settings()
