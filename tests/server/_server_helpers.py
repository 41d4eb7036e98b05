"""Test helpers for the server tests: a slowed-down decoder and SSE parsing."""

from __future__ import annotations

import json
import time

from safety_decoding.decode import DecodeBatch, Decoder


class HookedBatch(DecodeBatch):
    """A real `DecodeBatch` that calls ``decoder.after_step(batch)`` after each decode step."""

    def step(self):
        events = super().step()
        self.decoder.after_step(self)
        return events


class SlowDecoder(Decoder):
    """A real `Decoder` that sleeps ``delay`` seconds after every step (a long request on
    demand), and records the prompts it ran."""

    def __init__(self, model, tokenizer, delay: float = 0.05):
        super().__init__(model, tokenizer)
        self.delay = delay
        self.ran: list[tuple[int, ...]] = []
        self.adds: list[int] = []
        """Requests per prefill (`DecodeBatch.add` call)."""

    def new_batch(self):
        return RecordingBatch(self)

    def after_step(self, batch):
        time.sleep(self.delay)


class RecordingBatch(HookedBatch):
    def add(self, requests):
        self.decoder.ran.extend(r.prompt.ids for r in requests)
        self.decoder.adds.append(len(requests))
        return super().add(requests)


class FailingDecoder(Decoder):
    """Raises in the decode step after ``at_step`` steps of any request whose prompt says
    "boom" (a device failure on demand)."""

    def __init__(self, model, tokenizer, at_step: int = 1):
        super().__init__(model, tokenizer)
        self.at_step = at_step

    def new_batch(self):
        return HookedBatch(self)

    def after_step(self, batch):
        for row in batch.rows:
            if len(row.gen) > self.at_step and "boom" in self.tok.decode(list(row.req.prompt.ids)):
                raise RuntimeError("device fell over")


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
