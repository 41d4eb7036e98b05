"""Test helpers for the server tests: decoders that slow down or record, a model that writes
a scripted text, a real uvicorn server on localhost, and SSE parsing."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import torch
import uvicorn

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
        self.requests = []
        self.adds: list[int] = []
        """Requests per prefill (`DecodeBatch.add` call)."""

    def new_batch(self, prefill_chunk=None):
        return RecordingBatch(self, prefill_chunk)

    def after_step(self, batch):
        if self.delay:
            time.sleep(self.delay)


class RecordingBatch(HookedBatch):
    def add(self, requests):
        self.decoder.ran.extend(r.prompt.ids for r in requests)
        self.decoder.requests.extend(requests)
        self.decoder.adds.append(len(requests))
        return super().add(requests)


class FailingDecoder(SlowDecoder):
    """Raises in the decode step after ``at_step`` steps of any request whose prompt says
    "boom" (a device failure on demand); sleeps ``delay`` seconds a step like `SlowDecoder`."""

    def __init__(self, model, tokenizer, at_step: int = 1, delay: float = 0.0):
        super().__init__(model, tokenizer, delay)
        self.at_step = at_step

    def after_step(self, batch):
        super().after_step(batch)
        for row in batch.rows:
            if row.n_generated > self.at_step and "boom" in self.tok.decode(list(row.req.prompt.ids)):
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


class RecordingDecoder(SlowDecoder):
    """A real `Decoder` that keeps every `GenerationRequest` it ran (prompts, parameters)."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer, delay=0.0)


def start_server(app, server: uvicorn.Server | None = None,
                 **config) -> tuple[uvicorn.Server, threading.Thread, str]:
    """Start uvicorn for ``app`` on a free localhost port in a thread (``config``: more
    `uvicorn.Config` options; ``server``: an already configured one to run instead); returns
    the server, its thread and its URL."""
    srv = server or uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                  log_level="warning", **config))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(1000):
        if srv.started:
            break
        time.sleep(0.01)
    assert srv.started, "uvicorn did not start"
    port = srv.servers[0].sockets[0].getsockname()[1]
    return srv, thread, f"http://127.0.0.1:{port}"


@contextmanager
def serve(app, lifespan: str = "on") -> Iterator[str]:
    """Run ``app`` with uvicorn on a free localhost port; yields its URL. ``lifespan="off"``
    leaves the engine unstarted."""
    srv, thread, url = start_server(app, lifespan=lifespan)
    try:
        yield url
    finally:
        srv.should_exit = True
        thread.join(10)


def aborts(url: str) -> float:
    """``ess_requests_total{finish_reason="abort"}`` of the server at ``url``."""
    return metric_value(httpx.get(f"{url}/metrics", timeout=30).text, "ess_requests_total",
                        'finish_reason="abort"')


def wait_for_aborts(url: str, n: float, timeout: float = 10.0) -> None:
    """Poll until the server has counted ``n`` aborts (AssertionError after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if aborts(url) == n:
            return
        time.sleep(0.05)
    raise AssertionError(f"abort count stayed at {aborts(url)}, expected {n}")


def scripted_text_model(tokenizer, prompt_tokens: int, script: list[int], seed: int = 0):
    """A tiny model whose language head writes ``script`` (then EOS) after a prompt of
    ``prompt_tokens`` tokens, whatever the sampling: the logits are one-hot by position.

    Position-keyed (not call-counted), so it needs no reset between requests. The first
    generated token is predicted at position ``prompt_tokens`` ([CLS] holds position 0); a
    decode step's rows are the token (its position) and maybe a probe at position 0, so the
    largest position of a row is the one whose next token is asked for.
    """
    from conftest import tiny_safety_model

    model = tiny_safety_model(tokenizer, seed)
    inner_hidden = model.hidden_states
    vocab = len(tokenizer)
    last_pos = {}

    def hidden_states(ids, kinds, position_ids, *args, **kwargs):
        last_pos["rows"] = position_ids.max(dim=1).values
        return inner_hidden(ids, kinds, position_ids, *args, **kwargs)

    def lm_logits(hidden):
        rows = last_pos["rows"]
        logits = torch.full((hidden.shape[0], vocab), -30.0)
        for b, pos in enumerate(rows.tolist()):
            i = pos - prompt_tokens
            token = script[i] if 0 <= i < len(script) else tokenizer.eos_token_id
            logits[b, token] = 30.0
        return logits

    model.hidden_states = hidden_states
    model.lm_logits = lm_logits
    return model


def sse_payloads(body: str) -> list[str]:
    """The raw ``data:`` payloads of an SSE body, ``[DONE]`` included (comments skipped)."""
    return [line[len("data: "):] for frame in body.split("\n\n") for line in frame.splitlines()
            if line.startswith("data: ")]
