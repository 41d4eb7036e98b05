"""Scale-out with Ray Serve on a local Ray cluster: two replicas of the tiny model behind
Ray's proxy; streaming, client disconnects (aborted in the replica's engine) and 503 load
shedding past the queue bound go through it. Skips where Ray Serve is not installed (the
``ray`` extra, which scripts/install.sh installs)."""

from __future__ import annotations

import json
import os
import threading
import time
from functools import partial

import httpx
import pytest

from server.ray_serve import APP_NAME, RayOptions, ray_app
from server.settings import Settings

from ._deploy import REPO, free_port, tiny_slow_decoder

from _server_helpers import metric_value, sse_data  # noqa: E402  (path set by _deploy)

pytestmark = pytest.mark.deploy

DELAY = 0.02  # seconds a decode step: a 40-token request holds its replica for ~1 s
# Small bounds, so a burst of requests fills them: 2 replicas x 2 running, 2 queued in Ray.
SETTINGS = Settings(max_num_seqs=2, max_waiting=2, max_new_tokens_limit=256)


@pytest.fixture(scope="module")
def ray_url():
    ray = pytest.importorskip("ray", reason="Ray Serve is not installed (the `ray` extra)")
    serve = pytest.importorskip("ray.serve")
    # Replicas import this repository's modules and the test helpers by name.
    path = os.pathsep.join(str(p) for p in (REPO, REPO / "tests", REPO / "tests" / "server"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app(SETTINGS, RayOptions(replicas=2, replica_cpus=1),
                          partial(tiny_slow_decoder, DELAY)),
                  name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("Ray Serve did not answer /health in 180 s")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def generate(url, n_tokens: int, timeout: float = 60) -> httpx.Response:
    return httpx.post(url + "/generate", timeout=timeout, json={
        "inputs": "Hello there", "parameters": {"max_new_tokens": n_tokens, "do_sample": False}})


def test_two_replicas_serve(ray_url):
    from ray import serve

    status = serve.status().applications[APP_NAME]
    (deployment,) = status.deployments.values()
    assert deployment.replica_states == {"RUNNING": 2}
    r = generate(ray_url, 4)
    assert r.status_code == 200 and r.json()["generated_text"]
    assert httpx.get(ray_url + "/info", timeout=10).json()["max_num_seqs"] == 2


def test_stream_passes_through_frame_by_frame(ray_url):
    arrivals, body = [], ""
    with httpx.stream("POST", ray_url + "/generate_stream", timeout=60,
                      json={"inputs": "Hi", "parameters": {"max_new_tokens": 30,
                                                           "do_sample": False}}) as r:
        assert r.status_code == 200
        for chunk in r.iter_text():
            arrivals.append(time.monotonic())
            body += chunk
    events = sse_data(body)
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert len(events) == 30
    # Frames arrive as decoded (30 steps of >= 20 ms), not in one piece at the end.
    assert arrivals[-1] - arrivals[0] > 0.2


def test_openai_stream_ends_with_done(ray_url):
    with httpx.stream("POST", ray_url + "/v1/chat/completions", timeout=60, json={
            "model": SETTINGS.model_name, "stream": True, "max_tokens": 5,
            "messages": [{"role": "user", "content": "Hi"}]}) as r:
        assert r.status_code == 200
        payloads = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[0])["object"] == "chat.completion.chunk"


def aborts_seen(url, tries: int = 20) -> float:
    """Largest abort count among the replicas that answer ``tries`` /metrics requests (Ray
    routes each to one replica)."""
    seen = 0.0
    for _ in range(tries):
        text = httpx.get(url + "/metrics", timeout=10).text
        seen = max(seen, metric_value(text, "ess_requests_total", 'finish_reason="abort"') or 0)
    return seen


def test_client_disconnect_aborts_in_the_replica(ray_url):
    before = aborts_seen(ray_url)
    with httpx.stream("POST", ray_url + "/generate_stream", timeout=60,
                      json={"inputs": "Hi", "parameters": {"max_new_tokens": 200,
                                                           "do_sample": False}}) as r:
        frames = 0
        for line in r.iter_lines():
            frames += line.startswith("data:")
            if frames == 2:
                break  # leave mid-stream: 198 tokens (~4 s) still to go
    deadline = time.monotonic() + 30
    while aborts_seen(ray_url) <= before:
        assert time.monotonic() < deadline, "the replica never aborted the request"
        time.sleep(0.2)


def late_first_tokens(url, seconds: float, tries: int = 20) -> set[float]:
    """Requests whose time to first token in a replica's engine exceeded ``seconds``, one count
    per distinct replica answer among ``tries`` /metrics requests (Ray routes each to one)."""
    late = set()
    for _ in range(tries):
        text = httpx.get(url + "/metrics", timeout=10).text
        total = metric_value(text, "ess_time_to_first_token_seconds_count")
        within = metric_value(text, "ess_time_to_first_token_seconds_bucket", f'le="{seconds}"')
        late.add(total - within)
    return late


def test_burst_past_the_queue_is_shed_with_503(ray_url):
    """12 requests of ~3 s at once on 2 replicas x ESS_MAX_NUM_SEQS 2 with ESS_MAX_WAITING 2:
    the excess is refused at once with 503, and no replica runs or queues more than its batch
    (every request's first token comes within 1 s of reaching a replica's engine, while the
    burst's later requests wait seconds in Ray's proxy).

    How many the proxy holds is Ray's bound, which Ray applies approximately at a burst (its
    router's own comments say so): with the bound 2 it held 3-4, so 7-8 of 12 were served, in
    session 22 (docs/operations.md). So the count served is only asserted to leave some shed."""
    codes, lock = [], threading.Lock()

    def one():
        started = time.monotonic()
        code = generate(ray_url, 150).status_code
        with lock:
            codes.append((code, time.monotonic() - started))

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(codes) == 12 and {c for c, _ in codes} == {200, 503}, codes
    # Shed at once: every 503 came before the first request served ended.
    assert max(s for c, s in codes if c == 503) < min(s for c, s in codes if c == 200), codes
    assert late_first_tokens(ray_url, 1.0) == {0}
    assert generate(ray_url, 2).status_code == 200  # served again once the burst is over


def test_autoscaling_adds_a_replica_under_load(ray_url):
    """Redeployed with --replicas 1 --max-replicas 2: ongoing requests above the target (half
    a batch per replica) bring a second replica (look-back 15 s, upscale delay 10 s, then a
    replica start)."""
    from ray import serve

    serve.delete(APP_NAME)
    serve.run(ray_app(SETTINGS, RayOptions(replicas=1, max_replicas=2, replica_cpus=1),
                      partial(tiny_slow_decoder, DELAY)),
              name=APP_NAME, route_prefix="/", blocking=False)

    def replicas() -> dict:
        (deployment,) = serve.status().applications[APP_NAME].deployments.values()
        return deployment.replica_states

    assert replicas() == {"RUNNING": 1}
    stop = threading.Event()

    def load():  # keeps 2 long requests in flight (target: 1 per replica)
        while not stop.is_set():
            generate(ray_url, 100)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while replicas().get("RUNNING", 0) < 2:
            assert time.monotonic() < deadline, f"no second replica in 120 s: {replicas()}"
            time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)


def test_options_are_validated():
    with pytest.raises(ValueError, match="max_replicas"):
        RayOptions(replicas=2, max_replicas=1)
    with pytest.raises(ValueError, match="replicas"):
        RayOptions(replicas=0)
