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


def plot_dashboard(prom, path, seconds: float = 60.0) -> int:
    """Render every dashboard panel's PromQL over the last ``seconds`` as one PNG (the
    dashboard's series as Prometheus returns them, for where Grafana cannot run); returns the
    number of series drawn."""
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[str]] = {}
    for title, expr in dashboard_queries("30s"):
        panels.setdefault(title, []).append(expr)
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 2.6 * rows), squeeze=False)
    drawn = 0
    for ax, (title, exprs) in zip(axes.flat, panels.items()):
        for expr in exprs:
            for series in prom.query_range(expr, seconds):
                t0 = series["values"][0][0]
                xs = [float(t) - t0 for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                label = ",".join(f"{k}={v}" for k, v in sorted(series["metric"].items())
                                 if k not in ("job", "instance")) or None
                ax.plot(xs, ys, label=label)
                drawn += 1
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("ESS Serve dashboard queries (Prometheus query_range, tiny model, seconds)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return drawn


def test_dashboard_queries_render(scraped, tmp_path):
    """Every panel's PromQL as a range query, drawn: set ESS_DASHBOARD_PNG to keep the image
    (docs/dashboard_promql.png was made so)."""
    import os

    prom, _, _ = scraped
    path = os.environ.get("ESS_DASHBOARD_PNG") or tmp_path / "dashboard.png"
    assert plot_dashboard(prom, path) >= len({t for t, _ in dashboard_queries()})
    assert os.path.getsize(path) > 10_000
