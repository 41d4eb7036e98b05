"""A real Prometheus scrapes a running ESS server (tiny model) every second; the series and
every PromQL query of the Grafana dashboard come back through Prometheus' HTTP API."""

from __future__ import annotations

import time

import httpx
import pytest

from server.app import create_app
from server.engine import Engine
from server.settings import Settings

from ._deploy import dashboard_queries, finite, running_prometheus

from _server_helpers import SlowDecoder, metric_value, serve  # noqa: E402  (path set by _deploy)

pytestmark = pytest.mark.deploy

TRAFFIC_SECONDS = 4.0  # several 1 s scrapes see the counters rise: rate() needs two samples
MAX_REQUESTS = 200


@pytest.fixture(scope="module")
def scraped(tiny_model, tokenizer, tmp_path_factory):
    """(Prometheus, server URL, the server's final /metrics text) after traffic that Prometheus
    watched: ``periodic`` every 2 tokens, so decode steps both with and without a probe exist;
    every other request asks for threshold 0.001, so query-stage trips exist."""
    settings = Settings(safety_schedule="periodic", safety_period=2, max_new_tokens_limit=64)
    # 10 ms a step: each request spans a few steps of wall time, the traffic several scrapes.
    app = create_app(Engine(SlowDecoder(tiny_model, tokenizer, delay=0.01)), settings)
    with serve(app) as url:
        target = url.removeprefix("http://")
        with running_prometheus(tmp_path_factory.mktemp("prometheus"), [target]) as prom:
            prom.wait_for('up{job="ess"}', lambda v: v == [1.0])
            start, n = time.monotonic(), 0
            with httpx.Client(base_url=url, timeout=30) as client:
                while time.monotonic() - start < TRAFFIC_SECONDS and n < MAX_REQUESTS:
                    params = {"max_new_tokens": 8, "do_sample": False}
                    if n % 2:
                        params["safety"] = {"threshold": 0.001}
                    r = client.post("/generate", json={"inputs": f"Hello number {n}",
                                                       "parameters": params})
                    assert r.status_code == 200, r.text
                    n += 1
                final = client.get("/metrics").text
            yield prom, url, final


def test_prometheus_scrapes_the_safety_series(scraped):
    prom, _, final = scraped
    checks = metric_value(final, "ess_safety_checks_total")
    assert checks and checks > 0
    # Prometheus catches up with the server's final count within a few scrapes.
    prom.wait_for("ess_safety_checks_total", lambda v: v == [checks])
    trips = {(s["metric"]["stage"], s["metric"]["action"]): float(s["value"][1])
             for s in prom.query("ess_safety_trips_total")}
    assert set(trips) == {(stage, action) for stage in ("query", "response")
                          for action in ("refuse", "reweight", "monitor")}
    query_refusals = metric_value(final, "ess_safety_trips_total",
                                  'action="refuse",stage="query"')  # as printed: sorted
    assert query_refusals and query_refusals > 0
    prom.wait_for('ess_safety_trips_total{stage="query",action="refuse"}',
                  lambda v: v == [query_refusals])
    prom.wait_for('ess_requests_total{finish_reason="content_filter"}',
                  lambda v: bool(v) and v[0] > 0)


def test_prometheus_has_the_latency_histograms(scraped):
    prom, _, _ = scraped
    for name in ("ess_time_to_first_token_seconds", "ess_time_per_output_token_seconds",
                 "ess_request_duration_seconds"):
        assert prom.wait_for(f"sum({name}_count)", lambda v: bool(v) and v[0] > 0)
        assert prom.wait_for(
            f"histogram_quantile(0.5, sum by (le) (rate({name}_bucket[5m])))", finite)[0] > 0
    probes = {s["metric"]["safety_check"] for s in prom.query("ess_decode_step_seconds_count")}
    assert probes == {"true", "false"}


def test_overhead_ratio_promql_returns_a_number(scraped):
    prom, _, _ = scraped
    (expr,) = [e for title, e in dashboard_queries("5m") if title == "Safety overhead ratio"
               and "rate(" in e]
    (ratio,) = prom.wait_for(expr, finite)
    assert ratio > 0
    (gauge,) = prom.wait_for("ess_safety_overhead_ratio", lambda v: bool(v) and v[0] > 0)
    assert gauge > 0


def test_every_dashboard_query_returns_numbers(scraped):
    """Each PromQL target of docker/grafana/dashboards/ess-serve.json, with a 5 m rate window:
    Prometheus accepts it and, after the traffic, returns finite numbers."""
    prom, _, _ = scraped
    for title, expr in dashboard_queries("5m"):
        assert prom.wait_for(expr, finite, timeout=30), title
