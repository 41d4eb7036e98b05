"""SIGTERM on a real `ess serve` process (server/lifecycle.py): /health and new requests get
503 at once; streams that finish within ESS_SHUTDOWN_TIMEOUT_SECONDS end normally, the others
end with an error event naming the shutdown (then [DONE] on OpenAI routes) and a complete
chunked body; the process exits 0."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from _http import stream_payloads

from .conftest import REPO, _free_port, wait_healthy

pytestmark = pytest.mark.integration

TIMEOUT = 10  # ESS_SHUTDOWN_TIMEOUT_SECONDS
# New tokens: well within the timeout even on 2 busy cores (6 steps) / far past it.
SHORT, LONG = 6, 1000


def _bodies(n: int) -> dict[str, tuple[str, dict]]:
    return {
        "tgi": ("/generate_stream", {"inputs": "Write a long essay about bread.",
                                     "parameters": {"max_new_tokens": n, "ignore_eos": True}}),
        "completions": ("/v1/completions", {"model": "m", "stream": True, "ignore_eos": True,
                                            "prompt": "Write a long essay about bread.",
                                            "max_tokens": n}),
        "chat": ("/v1/chat/completions", {"model": "m", "stream": True, "ignore_eos": True,
                                          "max_tokens": n, "messages": [
                                              {"role": "user",
                                               "content": "Tell me about bread."}]}),
    }


def test_sigterm_drains_then_cuts_and_exits_0(tmp_path):
    port = _free_port()
    env = {**os.environ, "ESS_SHUTDOWN_TIMEOUT_SECONDS": str(TIMEOUT), "ESS_SSE_PING_SECONDS": "0"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ess.cli", "serve", "--port", str(port)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        jobs = [(kind, n, *body) for n in (SHORT, LONG) for kind, body in _bodies(n).items()
                if n == LONG or kind != "completions"]
        started = [threading.Event() for _ in jobs]
        with ThreadPoolExecutor(len(jobs) + 1) as pool:
            streams = [pool.submit(stream_payloads, url, path, body, ev)
                       for (_, _, path, body), ev in zip(jobs, started)]
            whole = pool.submit(httpx.post, url + "/generate", timeout=120,
                                json=_bodies(LONG)["tgi"][1])
            assert all(ev.wait(120) for ev in started)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            health = httpx.get(url + "/health", timeout=5)
            refused = httpx.post(url + "/generate", json=_bodies(SHORT)["tgi"][1], timeout=5)
            results = [s.result() for s in streams]
            whole_status = whole.result().status_code
        code = proc.wait(timeout=TIMEOUT + 30)
        drained = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "ASGI callable returned without completing response" not in text
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    assert refused.status_code == 503 and "retry-after" in refused.headers
    assert whole_status == 503  # a non-streamed request cut by the timeout
    assert drained < TIMEOUT + 15
    for (kind, n, _, _), payloads in zip(jobs, results):
        if kind != "tgi":
            assert payloads[-1] == "[DONE]", (kind, n)
            payloads = payloads[:-1]
        last = json.loads(payloads[-1])
        if n == SHORT:  # finished within the timeout
            final = last.get("details") if kind == "tgi" else last.get("choices", [{}])[0]
            assert (final or {}).get("finish_reason") == "length", (kind, last)
        elif kind == "tgi":  # cut: TGI's error event
            assert set(last) == {"error", "error_type"} and "shutting down" in last["error"]
        else:  # cut: OpenAI's error chunk, then [DONE]
            assert "shutting down" in last["error"]["message"], (kind, last)
