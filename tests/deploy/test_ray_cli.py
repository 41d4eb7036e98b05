"""``ess serve --ray`` as an operator runs it: option errors and a missing Ray in one line;
on the real checkpoint, a stream that is running when SIGTERM arrives still finishes (the
replica drains) and the command exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from ._deploy import REPO, free_port

from _server_helpers import sse_data  # noqa: E402  (path set by _deploy)

pytestmark = pytest.mark.deploy


def ess(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ess.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_bad_replica_counts_are_one_line():
    proc = ess("serve", "--ray", "--replicas", "2", "--max-replicas", "1")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "ess serve: error: max_replicas: must be >= replicas"


def test_missing_ray_says_how_to_install():
    code = ("import sys; sys.modules['ray'] = None; from ess.cli import main; "
            "sys.exit(main(['serve', '--ray']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert "pip install 'ess-serve[ray]'" in proc.stderr


@pytest.mark.integration
def test_sigterm_drains_a_running_stream(tmp_path):
    pytest.importorskip("ray", reason="Ray Serve is not installed (the `ray` extra)")
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    # Replicas import the server from this checkout.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "ess.cli", "serve", "--ray",
                             "--replicas", "1", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "ess serve --ray never became healthy"
            time.sleep(1)
        body, signalled = "", False
        with httpx.stream("POST", url + "/generate_stream", timeout=120, json={
                "inputs": "Tell me a long story about a lighthouse.",
                "parameters": {"max_new_tokens": 80, "do_sample": False}}) as r:
            assert r.status_code == 200
            for chunk in r.iter_text():
                body += chunk
                if not signalled and body.count("data:") >= 2:
                    proc.send_signal(signal.SIGTERM)
                    signalled = True
        events = sse_data(body)
        assert signalled and events[-1]["generated_text"] is not None  # the final frame came
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
