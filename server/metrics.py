"""Prometheus metrics on a per-app registry (names, base units and bounded labels:
docs/architecture.md, "Metrics").

Nothing is registered at import time: each `Metrics` owns a fresh ``CollectorRegistry``, so
several apps (tests) never collide. prometheus-client is thread-safe, so the engine thread
records directly.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from safety_decoding.types import Action, FinishReason

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Of ``GET /metrics``: Prometheus text format 0.0.4, what `generate_latest` writes for our
names and what every Prometheus version scrapes (prometheus-client's own "latest" type names
1.0.0, which older scrapers do not know)."""

# 1 ms .. 60 s: a GPU answers a short request in tens of milliseconds; a 1k-token response of
# the 135M model on a busy CPU takes most of a minute.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)
# Decode steps are shorter than requests: start finer (0.25 ms) and stop at 10 s.
STEP_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 10.0)
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # p_malicious in [0, 1]

FINISH_REASONS = tuple(FinishReason)
TRIP_STAGES = ("query", "response")
TRIP_ACTIONS = tuple(Action)


class Metrics:
    """All ``ess_*`` series of one server, plus the helpers the engine calls.

    Args:
        registry: where to register; a new ``CollectorRegistry`` when None.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("ess_requests", "Finished requests by finish reason.",
                                ["finish_reason"], registry=r)
        self.request_duration = Histogram(
            "ess_request_duration_seconds", "Submit to last event, queue time included.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "ess_time_to_first_token_seconds",
            "Submit to the first released token (once per request that released one).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(
            "ess_time_per_output_token_seconds",
            "Per request: (last token time - first token time) / (tokens - 1).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("ess_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("ess_generation_tokens",
                                         "Generated tokens released to clients.", registry=r)
        self.running = Gauge("ess_num_requests_running", "Requests in the decode loop.",
                             registry=r)
        self.waiting = Gauge("ess_num_requests_waiting", "Requests queued for the engine.",
                             registry=r)
        self.safety_checks = Counter(
            "ess_safety_checks",
            "Safety verdicts computed: query verdicts plus response re-checks.",
            registry=r)
        self.safety_trips = Counter(
            "ess_safety_trips", "Safety trips by stage; action=monitor counts would-be trips.",
            ["stage", "action"], registry=r)
        self.safety_score = Histogram("ess_safety_score", "Query verdict p_malicious.",
                                      buckets=SCORE_BUCKETS, registry=r)
        self.decode_step = Histogram(
            "ess_decode_step_seconds", "One decode step (prefill excluded), by whether it ran a "
            "[CLS] probe.", ["safety_check"], buckets=STEP_BUCKETS, registry=r)
        self.prefill_chunks = Counter(
            "ess_prefill_chunks",
            "Chunks of chunked prefills (ESS_PREFILL_CHUNK), each run just before a decode step "
            "and timed with it in ess_decode_step_seconds.", registry=r)
        self.overhead_ratio = Gauge(
            "ess_safety_overhead_ratio",
            "Mean decode step seconds with a probe / without one (0 until both were observed).",
            registry=r)
        self.safety_enabled = Gauge(
            "ess_safety_enabled",
            "1 when the safety checks run, 0 when ESS_SAFETY_ENABLED=false turned them off.",
            registry=r)
        self.safety_enabled.set(1)  # the library's default; the app sets the server's value
        for reason in FINISH_REASONS:  # export zeros so dashboards see every series at once
            self.requests.labels(reason)
        for stage in TRIP_STAGES:
            for action in TRIP_ACTIONS:
                self.safety_trips.labels(stage, action)
        # Running sums for the overhead ratio (the histogram's own sums are not public API).
        self._lock = threading.Lock()
        self._step_sum = {True: 0.0, False: 0.0}
        self._step_count = {True: 0, False: 0}

    def set_safety_enabled(self, enabled: bool) -> None:
        """Export whether this server runs the safety checks (``ess_safety_enabled``)."""
        self.safety_enabled.set(1 if enabled else 0)

    def observe_steps(self, seconds: list[float], checked: list[bool]) -> None:
        """Record one request's decode steps (seconds) and whether each ran a probe."""
        with self._lock:
            for s, with_check in zip(seconds, checked):
                self.decode_step.labels("true" if with_check else "false").observe(s)
                self._step_sum[with_check] += s
                self._step_count[with_check] += 1
            if self._step_count[True] and self._step_count[False]:
                mean_on = self._step_sum[True] / self._step_count[True]
                mean_off = self._step_sum[False] / self._step_count[False]
                if mean_off > 0:
                    self.overhead_ratio.set(mean_on / mean_off)

    def observe_safety(self, summary: dict | None) -> None:
        """Record the `SafetyState.summary` of one finished request (None: safety off)."""
        if not summary:
            return
        query_checked = summary.get("query_score") is not None
        self.safety_checks.inc(int(query_checked) + summary.get("checks", 0))
        if query_checked:
            self.safety_score.observe(summary["query_score"])
        if summary.get("intervened") and summary.get("stage") in TRIP_STAGES:
            self.safety_trips.labels(summary["stage"], summary.get("action", Action.REFUSE)).inc()
        for stage in summary.get("would_trip") or ():
            if stage in TRIP_STAGES:
                self.safety_trips.labels(stage, Action.MONITOR).inc()

    def exposition(self) -> bytes:
        """Prometheus text format of this registry."""
        return generate_latest(self.registry)
