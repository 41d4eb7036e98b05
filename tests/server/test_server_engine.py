"""Engine: FIFO hand-off, bounded queue, cancellation, failures and metrics (tiny model)."""

from __future__ import annotations

import asyncio

import pytest

from safety_decoding.decode import Decoder, GenerationRequest
from safety_decoding.layout import round_up
from safety_decoding.types import FinishReason
from safety_decoding.policy import SafetyParams
from safety_decoding import prompt
from safety_decoding.prompt import build_raw_prompt
from safety_decoding.sampling import SamplingParams
from server.engine import (WARM_PREFILL_COLUMNS, Engine, EngineError, EngineNotRunning, EngineOverloaded,
                           EngineTimeout, prefill_warm_ups, reported_finish_reason)

from _server_helpers import FailingDecoder, SlowDecoder, metric_value


def _request(tokenizer, text="Hello there", n=3, **safety):
    return GenerationRequest(build_raw_prompt(tokenizer, text), SamplingParams(max_new_tokens=n),
                             SafetyParams(**safety))


async def _drain(stream):
    return [ev async for ev in stream]


def _metrics(engine) -> str:
    return engine.metrics.exposition().decode()


async def _wait_for(predicate, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_events_stream_back_and_metrics_are_recorded(tiny_model, tokenizer):
    async def main():
        engine = Engine(Decoder(tiny_model, tokenizer))
        assert not engine.ready
        prompt._tables.cache_clear()
        await engine.start()
        assert engine.ready
        assert prompt._tables.cache_info().currsize == 1  # built by the warm-up, not a request
        events = await _drain(engine.submit(_request(tokenizer, n=4)))
        await engine.stop()
        assert not engine.ready
        return engine, events

    engine, events = asyncio.run(main())
    final = events[-1]
    assert final.finish_reason is not None and all(e.finish_reason is None for e in events[:-1])
    assert sum(len(e.tokens) for e in events) == final.generated_tokens
    text = _metrics(engine)
    # The warm-up request is not counted; the real one is.
    assert metric_value(text, "ess_requests_total",
                        f'finish_reason="{reported_finish_reason(final)}"') == 1
    assert metric_value(text, "ess_prompt_tokens_total") == final.prompt_tokens
    assert metric_value(text, "ess_generation_tokens_total") == final.generated_tokens
    assert metric_value(text, "ess_time_to_first_token_seconds_count") == 1
    # 3 steps that generate g_1..g_3 and the final check of g_3 (`decode.needs_final_check`);
    # a step 1 whose check of g_0 ran in the prefill (`first_check`) counts as a plain step
    steps = [metric_value(text, "ess_decode_step_seconds_count", f'safety_check="{c}"') or 0
             for c in ("true", "false")]
    assert sum(steps) == 4 and steps[0] >= 3
    assert metric_value(text, "ess_safety_checks_total") == 1 + final.safety["checks"]


def test_overhead_ratio_once_both_kinds_of_step_ran(tiny_model, tokenizer):
    async def main():
        engine = Engine(Decoder(tiny_model, tokenizer))
        await engine.start()
        await _drain(engine.submit(_request(tokenizer, n=3)))
        await _drain(engine.submit(_request(tokenizer, n=3, schedule="first")))
        await engine.stop()
        return _metrics(engine)

    text = asyncio.run(main())
    assert metric_value(text, "ess_decode_step_seconds_count", 'safety_check="false"') == 2
    assert metric_value(text, "ess_safety_overhead_ratio") > 0


def test_full_queue_raises_overloaded_and_frees_up(tiny_model, tokenizer):
    async def main():
        engine = Engine(SlowDecoder(tiny_model, tokenizer, delay=0.02), max_num_seqs=1, max_waiting=1)
        await engine.start()
        first = engine.submit(_request(tokenizer, n=5))
        second = engine.submit(_request(tokenizer, n=2))
        with pytest.raises(EngineOverloaded):
            engine.submit(_request(tokenizer, n=2))
        await _drain(first)
        await _drain(second)
        third = await _drain(engine.submit(_request(tokenizer, n=2)))
        await engine.stop()
        return third

    assert asyncio.run(main())[-1].finish_reason is not None


def test_queued_request_cancelled_is_dropped_without_running(tiny_model, tokenizer):
    async def main():
        decoder = SlowDecoder(tiny_model, tokenizer, delay=0.02)
        engine = Engine(decoder, max_num_seqs=1, max_waiting=4)
        await engine.start()
        running = engine.submit(_request(tokenizer, "first", n=5))
        first = await running.__anext__()  # it runs now
        queued = engine.submit(_request(tokenizer, "second", n=5))
        assert engine.num_waiting == 1
        await queued.aclose()
        assert engine.num_waiting == 0
        assert first.finish_reason is None
        await _drain(running)
        await engine.stop()
        return engine, decoder

    engine, decoder = asyncio.run(main())
    second = build_raw_prompt(tokenizer, "second").ids
    assert second not in decoder.ran
    assert metric_value(_metrics(engine), "ess_requests_total", 'finish_reason="abort"') == 1
    assert metric_value(_metrics(engine), "ess_num_requests_waiting") == 0


def test_leaving_a_running_stream_aborts_it_at_the_next_step(tiny_model, tokenizer):
    async def main():
        engine = Engine(SlowDecoder(tiny_model, tokenizer, delay=0.02))
        await engine.start()
        stream = engine.submit(_request(tokenizer, n=500))
        async for ev in stream:
            if ev.tokens:
                break
        await stream.aclose()
        await _wait_for(lambda: metric_value(
            _metrics(engine), "ess_requests_total", 'finish_reason="abort"') == 1)
        # The engine is free again: a new request runs to completion.
        events = await _drain(engine.submit(_request(tokenizer, n=2)))
        await engine.stop()
        return engine, events

    engine, events = asyncio.run(main())
    assert events[-1].finish_reason not in (None, FinishReason.ABORT)
    assert metric_value(_metrics(engine), "ess_generation_tokens_total") < 500


def _FailingDecoder(model, tokenizer):
    return FailingDecoder(model, tokenizer, at_step=1)


def test_decode_failure_reaches_the_consumer_and_the_engine_survives(tiny_model, tokenizer):
    async def main():
        engine = Engine(_FailingDecoder(tiny_model, tokenizer))
        await engine.start()
        with pytest.raises(EngineError, match="device fell over"):
            await _drain(engine.submit(_request(tokenizer, "boom", n=5)))
        events = await _drain(engine.submit(_request(tokenizer, "fine", n=2)))
        ready = engine.ready
        await engine.stop()
        return engine, events, ready

    engine, events, ready = asyncio.run(main())
    assert ready and events[-1].finish_reason is not None
    assert metric_value(_metrics(engine), "ess_requests_total", 'finish_reason="error"') == 1


def test_stop_fails_queued_requests_and_refuses_new_ones(tiny_model, tokenizer):
    async def main():
        engine = Engine(SlowDecoder(tiny_model, tokenizer, delay=0.02), max_num_seqs=1, max_waiting=4)
        await engine.start()
        running = engine.submit(_request(tokenizer, n=500))
        first = await running.__anext__()  # it runs now
        queued = engine.submit(_request(tokenizer, n=5))
        await engine.stop()
        with pytest.raises(EngineNotRunning):
            await _drain(queued)
        events = [first] + await _drain(running)
        with pytest.raises(EngineNotRunning):
            engine.submit(_request(tokenizer))
        return events

    assert asyncio.run(main())[-1].finish_reason == FinishReason.ABORT


def test_submit_before_start_is_refused(tiny_model, tokenizer):
    async def main():
        engine = Engine(Decoder(tiny_model, tokenizer))
        with pytest.raises(EngineNotRunning):
            engine.submit(_request(tokenizer))

    asyncio.run(main())


def test_a_crashed_engine_thread_fails_start_instead_of_hanging(tiny_model, tokenizer):
    class Broken(Decoder):
        def new_batch(self, prefill_chunk=None):
            raise RuntimeError("bug outside the decode step")

    async def main():
        engine = Engine(Broken(tiny_model, tokenizer))
        with pytest.raises(EngineError, match="bug outside"):
            await asyncio.wait_for(engine.start(), 10)
        assert not engine.ready
        with pytest.raises(EngineNotRunning):
            engine.submit(_request(tokenizer))

    asyncio.run(main())


def test_requests_join_the_running_batch_and_match_solo_runs(tiny_model, tokenizer):
    """Continuous batching: a request submitted while another decodes starts before that one
    ends (its prefill in chunks, counted), and both produce what they produce alone (greedy)."""
    async def main():
        decoder = SlowDecoder(tiny_model, tokenizer, delay=0.01)
        engine = Engine(decoder, max_num_seqs=4, prefill_chunk=4)
        await engine.start()
        solo = [await _drain(engine.submit(_request(tokenizer, t, n=n)))
                for t, n in (("first one", 40), ("second, longer prompt here", 10))]
        log: list[tuple[str, object]] = []

        async def consume(name, stream):
            async for ev in stream:
                log.append((name, ev))

        long = asyncio.create_task(consume("a", engine.submit(_request(tokenizer, "first one", n=40))))
        await _wait_for(lambda: len(log) >= 3)
        await consume("b", engine.submit(_request(tokenizer, "second, longer prompt here", n=10)))
        await long
        await engine.stop()
        return solo, log, _metrics(engine)

    solo, log, text = asyncio.run(main())
    assert metric_value(text, "ess_prefill_chunks_total") >= 2  # b joined a running batch
    names = [n for n, _ in log]
    assert names.index("b") < len(names) - 1 - names[::-1].index("a")  # b ran while a was running
    assert names[-1] == "a"  # and b, shorter, left first
    for name, events in (("a", solo[0]), ("b", solo[1])):
        got = [ev for n, ev in log if n == name]
        assert "".join(ev.text for ev in got) == "".join(ev.text for ev in events)
        assert got[-1].finish_reason == events[-1].finish_reason


def test_prefill_token_budget_splits_admission(tiny_model, tokenizer):
    async def main():
        decoder = SlowDecoder(tiny_model, tokenizer, delay=0.01)
        n = decoder.prefill_columns(_request(tokenizer, n=4))
        assert n > len(build_raw_prompt(tokenizer, "Hello there").ids) + 1  # the first check's slots
        engine = Engine(decoder, max_num_seqs=8, max_batched_tokens=2 * n + 1)
        await engine.start()
        decoder.adds = []
        streams = [engine.submit(_request(tokenizer, n=4)) for _ in range(5)]
        for s in streams:
            await _drain(s)
        await engine.stop()
        return decoder.adds

    adds = asyncio.run(main())
    assert sum(adds) == 5 and max(adds) == 2


def test_request_timeout_stops_running_and_waiting_requests(tiny_model, tokenizer):
    async def main():
        engine = Engine(SlowDecoder(tiny_model, tokenizer, delay=0.02), max_num_seqs=1,
                        request_timeout=0.3)
        await engine.start()
        running = engine.submit(_request(tokenizer, n=500))
        waiting = engine.submit(_request(tokenizer, n=500))
        with pytest.raises(EngineTimeout, match="0.3 s"):
            await _drain(running)
        with pytest.raises(EngineTimeout):
            await _drain(waiting)
        events = await _drain(engine.submit(_request(tokenizer, n=2)))
        await engine.stop()
        return engine, events

    engine, events = asyncio.run(main())
    assert events[-1].finish_reason is not None
    assert metric_value(_metrics(engine), "ess_requests_total", 'finish_reason="timeout"') == 2
    assert metric_value(_metrics(engine), "ess_num_requests_running") == 0


def test_load_off_thread_runs_elsewhere_and_reraises():
    import threading

    from server.engine import load_off_thread

    name = load_off_thread(lambda: threading.current_thread().name)
    assert name.startswith("ess-load") and name != threading.current_thread().name

    def fail():
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        load_off_thread(fail)


def test_warm_ups_cover_every_prefill_width_once_up_to_the_limit(tiny_model, tokenizer):
    decoder = Decoder(tiny_model, tokenizer)
    bucket = decoder.prefill_bucket
    requests = prefill_warm_ups(decoder, 10 * bucket)
    widths = [round_up(decoder.prefill_columns(r), bucket) for r in requests]
    assert widths == list(range(widths[0], 10 * bucket + 1, bucket))
    assert all(not r.safety.enabled and r.sampling.max_new_tokens == 1 for r in requests)
    decoder.prefill_bucket = 1
    assert prefill_warm_ups(decoder, 10 * bucket) == []


@pytest.mark.parametrize("budget_seconds", [60.0, 0.0])
def test_start_runs_the_warm_ups_unrecorded_within_the_budget(tiny_model, tokenizer, monkeypatch, budget_seconds):
    from safety_decoding import decode
    from server import engine as engine_module

    monkeypatch.setattr(engine_module, "WARM_PREFILL_SECONDS", budget_seconds)
    added, batch_add = [], decode.DecodeBatch.add
    monkeypatch.setattr(decode.DecodeBatch, "add", lambda batch, reqs: added.extend(reqs) or batch_add(batch, reqs))
    engine = Engine(Decoder(tiny_model, tokenizer))
    widths = len(prefill_warm_ups(engine._decoder, min(WARM_PREFILL_COLUMNS, engine.model_max_length - 1)))

    async def main():
        await engine.start()
        await engine.stop()

    asyncio.run(main())
    assert widths > 0 and len(added) == 1 + (widths if budget_seconds else 0)
    assert metric_value(_metrics(engine), "ess_prompt_tokens_total") == 0
