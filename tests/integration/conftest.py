"""A real `ess serve` process on the shipped checkpoint, reached over HTTP on localhost."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def server_env() -> dict:
    """The test server's environment: float32 unless ``ESS_DTYPE`` is set. Our choice: the
    verdicts these tests assert were measured in float32, and ``auto`` picks bfloat16 on CPUs
    with AMX or AVX512-BF16, where a score near the threshold could flip."""
    return {**os.environ, "ESS_DTYPE": os.environ.get("ESS_DTYPE", "float32")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    """Wait until ``proc`` (an ``ess serve``) answers ``/health`` with 200; fail the test if it
    exits first or takes longer than ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ess serve exited with {proc.returncode}; see its log")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"ess serve did not become healthy in {timeout:.0f} s")


@pytest.fixture(scope="session")
def server_url():
    port = _free_port()
    log = open(REPO / "tests" / "integration" / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ess.cli", "serve", "--port", str(port)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=server_env())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
