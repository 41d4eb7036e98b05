"""SIGTERM on a real `ess serve` process: running streams finish, then the process exits."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from .conftest import REPO, _free_port

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("route", ["/generate_stream", "/v1/completions"])
def test_sigterm_drains_running_streams(route):
    port = _free_port()
    env = {**os.environ, "ESS_SHUTDOWN_TIMEOUT_SECONDS": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "ess.cli", "serve", "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        body = ({"inputs": "Write a long essay about bread.",
                 "parameters": {"max_new_tokens": 60, "ignore_eos": True}}
                if route == "/generate_stream" else
                {"model": "m", "prompt": "Write a long essay about bread.", "max_tokens": 60,
                 "stream": True, "ignore_eos": True, "temperature": 0})
        lines = []
        with httpx.stream("POST", url + route, json=body, timeout=120) as r:
            it = r.iter_lines()
            for line in it:
                if line.startswith("data:"):
                    lines.append(line)
                    if len(lines) == 3:
                        proc.send_signal(signal.SIGTERM)
                        break
            lines += [line for line in it if line.startswith("data:")]
        assert proc.wait(timeout=90) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
    if route == "/generate_stream":
        assert '"finish_reason":"length"' in lines[-1].replace(" ", "")
    else:
        assert lines[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in lines[-2].replace(" ", "")
