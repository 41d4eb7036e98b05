"""ESS_SAFETY_ENABLED=false is said wherever an operator looks: a WARNING at start-up,
``/info``, ``/health`` and the ``ess_safety_enabled`` gauge (tiny model, TestClient)."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from safety_decoding.decode import Decoder
from server.app import create_app
from server.engine import Engine
from server.settings import Settings

from _server_helpers import metric_value

SAFETY_OFF_LOG = "ESS_SAFETY_ENABLED=false"


def _client(tiny_model, tokenizer, **settings) -> TestClient:
    app = create_app(Engine(Decoder(tiny_model, tokenizer)),
                     Settings(max_new_tokens_limit=8, **settings))
    return TestClient(app)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def off(tiny_model, tokenizer):
    with _client(tiny_model, tokenizer, safety_enabled=False) as c:
        yield c


def test_start_up_warns_when_safety_is_off(tiny_model, tokenizer, caplog):
    caplog.set_level(logging.WARNING)
    with _client(tiny_model, tokenizer, safety_enabled=False):
        pass
    assert any(SAFETY_OFF_LOG in m and "never production" in m for m in _warnings(caplog))


def test_start_up_is_quiet_when_safety_is_on(tiny_model, tokenizer, caplog):
    caplog.set_level(logging.WARNING)
    with _client(tiny_model, tokenizer):
        pass
    assert not any(SAFETY_OFF_LOG in m for m in _warnings(caplog))


def test_info_health_and_the_gauge_say_safety_is_off(off):
    assert off.get("/info").json()["safety"]["enabled"] is False
    r = off.get("/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok", "safety": "disabled"})
    assert off.head("/health").status_code == 200
    assert metric_value(off.get("/metrics").text, "ess_safety_enabled") == 0


def test_info_health_and_the_gauge_say_safety_is_on(tiny_model, tokenizer):
    with _client(tiny_model, tokenizer) as on:
        assert on.get("/info").json()["safety"]["enabled"] is True
        assert on.get("/health").json() == {"status": "ok"}
        assert metric_value(on.get("/metrics").text, "ess_safety_enabled") == 1


def test_requests_still_work_with_safety_off_and_report_no_verdict(off):
    r = off.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200
    safety = r.json()["safety"]
    assert safety["query_score"] is None and safety["checks"] == 0  # no [CLS], no re-check
    assert metric_value(off.get("/metrics").text, "ess_safety_enabled") == 0  # stays 0
