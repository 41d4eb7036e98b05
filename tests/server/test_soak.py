"""`ess bench soak` (benchmarks/soak.py) for one minute against an in-process server on the
tiny model: no 5xx, no unexpected error, no incomplete stream, gauges back to 0."""

from __future__ import annotations

import asyncio
import os

import pytest

from _server_helpers import SlowDecoder, serve
from benchmarks.soak import (Kind, Outcome, Shape, StreamCheck, require_loopback,
                             run_soak, summary_table)
from server.app import create_app
from server.engine import Engine
from server.settings import Settings

SOAK_SECONDS = 60  # the CI budget of this test


def test_soak_one_minute_on_the_tiny_model(tiny_model, tokenizer):
    # 5 ms a step: a 256-token stream runs over a second, so a disconnect lands mid-way.
    app = create_app(Engine(SlowDecoder(tiny_model, tokenizer, delay=0.005)),
                     Settings(max_new_tokens_limit=256))
    with serve(app) as url:
        rep = asyncio.run(run_soak(url, SOAK_SECONDS, clients=4, seed=1, pid=os.getpid()))
    print(summary_table(rep))
    assert rep["failures"] == [] and rep["server_errors"] == 0
    assert rep["unexpected_errors"] == 0 and rep["incomplete_streams"] == 0
    assert rep["gauges_after"] == {"ess_num_requests_running": 0, "ess_num_requests_waiting": 0}
    assert rep["passed"]
    kinds = rep["by_kind"]
    assert set(kinds) == {k.value for k in Kind}  # every kind of request was sent
    assert kinds["invalid"] == {"rejected": sum(kinds["invalid"].values())}
    assert rep["disconnects_made"] > 0 and rep["aborts_counted"] == rep["disconnects_made"]
    assert rep["rss"]["growth_mb"] is not None


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://[::2]:80"])
def test_soak_refuses_other_hosts(url):
    with pytest.raises(ValueError, match="this machine"):
        require_loopback(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.8.9.10",
                                 "http://localhost:1", "http://[::1]:8000"])
def test_soak_accepts_loopback(url):
    require_loopback(url)


def _check(shape: Shape, lines: list[str]) -> Outcome:
    check = StreamCheck(shape)
    for line in lines:
        check.feed(line)
    return check.outcome()[0]


def test_stream_check_tells_complete_from_incomplete_and_errors():
    token = 'data: {"token": {}, "generated_text": null}'
    final = 'data: {"generated_text": "hi", "details": {}}'
    assert _check(Shape.TGI, [token, "", final]) is Outcome.OK
    assert _check(Shape.TGI, [token]) is Outcome.INCOMPLETE
    assert _check(Shape.TGI, ['data: {"error": "x", "error_type": "generation"}']) is Outcome.UNEXPECTED
    assert _check(Shape.TGI, ["data: {not json"]) is Outcome.UNEXPECTED
    chunk = 'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}'
    error = 'data: {"error": {"message": "x"}}'
    assert _check(Shape.OPENAI, [chunk, ": ping", "data: [DONE]"]) is Outcome.OK
    assert _check(Shape.OPENAI, [chunk]) is Outcome.INCOMPLETE
    assert _check(Shape.OPENAI, [error, "data: [DONE]"]) is Outcome.UNEXPECTED
    assert _check(Shape.OPENAI, ["event: weird"]) is Outcome.UNEXPECTED
