"""One request's failure never ends another's (tiny model).

Per row: an exception while handling one row (its sampling, its policy, its stop strings)
ends that row with finish_reason ``error``; the other rows finish exactly as they would alone.
Shared forward: the rows move to a fresh batch (`DecodeBatch.resume`) and go on where they
stopped; the engine does that once per request, then gives up.
"""

from __future__ import annotations

import asyncio

import pytest

import safety_decoding.decode as decode
from conftest import tiny_safety_model
from safety_decoding.decode import Decoder, GenerationRequest
from safety_decoding.policy import SafetyParams, SafetyState
from safety_decoding.prompt import build_chat_prompt
from safety_decoding.sampling import SamplingParams
from safety_decoding.text import StopStringBuffer
from safety_decoding.types import FinishReason
from server.engine import Engine, EngineError

TEXTS = ["What is the capital of France?", "Hi", "Name three colours, please.", "Count to five."]
FAILS_AT = 3
"""The failing row fails in its 4th call of the patched function: mid-batch, after it released
text and while the other rows still run."""


def requests(tokenizer) -> list[GenerationRequest]:
    """Four different rows: greedy, seeded sampling, a stop string, and the periodic monitor."""
    chat = lambda t: build_chat_prompt(tokenizer, [{"role": "user", "content": t}])  # noqa: E731
    return [
        GenerationRequest(chat(TEXTS[0]), SamplingParams(max_new_tokens=16), SafetyParams()),
        GenerationRequest(chat(TEXTS[1]), SamplingParams(max_new_tokens=14, do_sample=True,
                                                         temperature=0.9, seed=3), SafetyParams()),
        GenerationRequest(chat(TEXTS[2]), SamplingParams(max_new_tokens=18, stop=("zz",)),
                          SafetyParams(action="monitor")),
        GenerationRequest(chat(TEXTS[3]), SamplingParams(max_new_tokens=12, ignore_eos=True),
                          SafetyParams(schedule="periodic", period=3, action="monitor"), trace=True),
    ]


def outcome(events) -> dict:
    """What a caller sees of one request: its text, tokens, finish reason and verdicts."""
    final = events[-1]
    return {"text": "".join(e.text for e in events), "ids": [t.id for e in events for t in e.tokens],
            "finish_reason": final.finish_reason, "safety": final.safety,
            "generated": final.generated_tokens}


def run_batch(decoder, reqs) -> dict[int, list]:
    out: dict[int, list] = {}
    for step in decoder.generate(reqs):
        for e in step:
            out.setdefault(e.index, []).append(e)
    return out


@pytest.fixture(scope="module")
def solo(tiny_model, tokenizer):
    dec = Decoder(tiny_model, tokenizer)
    return [outcome(run_batch(dec, [r])[0]) for r in requests(tokenizer)]


def _fail_on_call(calls: list, n: int):
    calls.append(None)
    if len(calls) > n:
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")


@pytest.mark.parametrize("where", ["sampling", "policy", "stop strings"])
def test_a_row_that_fails_leaves_alone_and_the_others_finish_as_solo(tiny_model, tokenizer, solo,
                                                                      monkeypatch, where):
    reqs = requests(tokenizer)
    victim, calls = reqs[1], []
    if where == "sampling":
        real = decode.select_token

        def select_token(logits, history, p, procs, generator):
            if p is victim.sampling:
                _fail_on_call(calls, FAILS_AT)
            return real(logits, history, p, procs, generator)

        monkeypatch.setattr(decode, "select_token", select_token)
    elif where == "policy":  # before the forward: the row leaves before the step's forward
        real = SafetyState.needs_check

        def needs_check(self, n):
            if self.params is victim.safety:
                _fail_on_call(calls, FAILS_AT)
            return real(self, n)

        monkeypatch.setattr(SafetyState, "needs_check", needs_check)
    else:
        victim = reqs[2]  # the one with a stop string (an empty tuple is shared by every row)
        real = StopStringBuffer.push

        def push(self, text):
            if self.stop is victim.sampling.stop:
                _fail_on_call(calls, FAILS_AT)
            return real(self, text)

        monkeypatch.setattr(StopStringBuffer, "push", push)
    got = run_batch(Decoder(tiny_model, tokenizer), reqs)
    v = reqs.index(victim)
    assert len(calls) == FAILS_AT + 1  # it did fail, mid-batch
    failed = got[v][-1]
    assert failed.finish_reason == FinishReason.ERROR and failed.safety is None
    assert failed.error == "RuntimeError: probability tensor contains either inf, nan or element < 0"
    released = [t.id for e in got[v] for t in e.tokens]
    assert failed.generated_tokens == len(released) and released == solo[v]["ids"][:len(released)]
    for i in range(len(reqs)):
        if i != v:
            assert outcome(got[i]) == solo[i], i


def test_rows_resume_in_a_fresh_batch_after_a_forward_failure(tiny_model, tokenizer, solo, monkeypatch):
    """A failed shared forward leaves every row as it was at the step boundary; resumed in a
    fresh batch, each finishes as it would have, nothing released twice."""
    dec = Decoder(tiny_model, tokenizer)
    real, steps = dec.model.hidden_states, []

    def hidden_states(ids, kinds, *args):
        if ids.shape[1] <= 2:  # a decode step (a prefill has the whole prompt)
            steps.append(None)
            if len(steps) == 5:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(ids, kinds, *args)

    monkeypatch.setattr(dec.model, "hidden_states", hidden_states)
    batch, out, resumed = dec.new_batch(), {}, 0
    ids, events = batch.add(requests(tokenizer))
    index = dict(zip(ids, range(len(ids))))  # batch id -> request
    while True:
        for e in events:
            out.setdefault(index[e.index], []).append(e)
        if not batch:
            break
        try:
            events = batch.step()
        except RuntimeError:
            rows = batch.rows
            before = [index[r.id] for r in rows]
            batch, events = dec.new_batch(), []
            index = dict(zip(batch.resume(rows), before))
            resumed += len(rows)
    assert resumed == 4 and len(steps) > 5
    assert [outcome(out[i]) for i in range(4)] == solo


def _engine_run(decoder, reqs):
    async def main():
        engine = Engine(decoder)
        await engine.start()
        results = await asyncio.gather(*(_collect(engine.submit(r)) for r in reqs))
        ready = engine.ready
        await engine.stop()
        return results, ready, engine

    return asyncio.run(main())


async def _collect(stream):
    events = []
    try:
        async for ev in stream:
            events.append(ev)
    except EngineError as exc:
        return events, exc
    return events, None


def _failing_forward(decoder, fail_on: set[int]):
    """Make the decode forwards number ``fail_on`` (counted while two rows run) raise."""
    real, steps = decoder.model.hidden_states, []

    def hidden_states(ids, kinds, *args):
        if ids.shape[1] <= 2 and ids.shape[0] == 2:
            steps.append(None)
            if len(steps) in fail_on:
                raise RuntimeError("device fell over")
        return real(ids, kinds, *args)

    decoder.model.hidden_states = hidden_states
    return steps


def test_engine_retries_the_running_requests_once_after_a_forward_failure(tokenizer, solo):
    dec = Decoder(tiny_safety_model(tokenizer), tokenizer)
    steps = _failing_forward(dec, {3})
    reqs = requests(tokenizer)[:2]
    results, ready, engine = _engine_run(dec, reqs)
    assert len(steps) > 3 and ready
    for i, (events, error) in enumerate(results):
        assert error is None
        assert outcome(events) == solo[i]  # the same text: nothing lost, nothing repeated


def test_engine_gives_up_after_a_second_forward_failure(tokenizer):
    dec = Decoder(tiny_safety_model(tokenizer), tokenizer)
    _failing_forward(dec, {3, 4})
    results, ready, engine = _engine_run(dec, requests(tokenizer)[:2])
    assert ready
    for events, error in results:
        assert "generation failed: RuntimeError: device fell over" in str(error)
        assert all(e.finish_reason is None for e in events)
    text = engine.metrics.exposition().decode()
    assert 'ess_requests_total{finish_reason="error"} 2.0' in text


def test_engine_fails_only_the_request_whose_row_failed(tokenizer, solo, monkeypatch):
    reqs = requests(tokenizer)[:2]
    real, calls = decode.select_token, []

    def select_token(logits, history, p, procs, generator):
        if p is reqs[1].sampling:
            _fail_on_call(calls, FAILS_AT)
        return real(logits, history, p, procs, generator)

    monkeypatch.setattr(decode, "select_token", select_token)
    results, ready, engine = _engine_run(Decoder(tiny_safety_model(tokenizer), tokenizer), reqs)
    (good, good_error), (bad, bad_error) = results
    assert good_error is None and outcome(good) == solo[0]
    assert str(bad_error) == ("generation failed: RuntimeError: probability tensor contains either "
                              "inf, nan or element < 0")
    text = engine.metrics.exposition().decode()
    assert 'ess_requests_total{finish_reason="error"} 1.0' in text
