"""HTTP helpers shared by tests/server and tests/integration."""

from __future__ import annotations

import threading

import httpx


def stream_payloads(url: str, path: str, body: dict, started: threading.Event) -> list[str]:
    """The ``data:`` payloads of one SSE stream (``started`` set at the first); httpx raises
    when the chunked body is cut short."""
    with httpx.stream("POST", url + path, json=body, timeout=120) as r:
        assert r.status_code == 200
        payloads = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                payloads.append(line[len("data: "):])
                started.set()
    return payloads

