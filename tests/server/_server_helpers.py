"""Test helpers for the server tests: a slowed-down decoder and SSE parsing."""

from __future__ import annotations

import json
import time

from safety_decoding.decode import Decoder


class SlowDecoder(Decoder):
    """A real `Decoder` that sleeps ``delay`` seconds after every step (a long request on
    demand), and records the prompts it ran."""

    def __init__(self, model, tokenizer, delay: float = 0.05):
        super().__init__(model, tokenizer)
        self.delay = delay
        self.ran: list[tuple[int, ...]] = []

    def generate(self, requests):
        self.ran.extend(r.prompt.ids for r in requests)
        for events in super().generate(requests):
            time.sleep(self.delay)
            yield events


def sse_data(body: str) -> list[dict]:
    """The JSON payloads of the ``data:`` lines of an SSE body (comments skipped)."""
    out = []
    for frame in body.split("\n\n"):
        for line in frame.splitlines():
            if line.startswith("data: "):
                out.append(json.loads(line[len("data: "):]))
    return out


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample in Prometheus text format (``labels`` as printed)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return None
