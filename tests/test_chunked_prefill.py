"""Chunked prefill computes what one prefill forward computes (safety_decoding/decode.py)."""

import pytest

from safety_decoding.decode import Decoder, GenerationRequest
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import build_chat_prompt
from safety_decoding.sampling import SamplingParams
from safety_decoding.types import Schedule

PROMPTS = ["What is the capital of France? Answer in one long sentence, with some history.",
           "Name three colours, please.",
           "Write a haiku about rain falling on a quiet harbour town at night."]


def _requests(tokenizer, prefix="", enabled=True):
    return [GenerationRequest(build_chat_prompt(tokenizer, [{"role": "user", "content": t}], response_prefix=prefix),
                              SamplingParams(max_new_tokens=12),
                              SafetyParams(enabled=enabled, schedule=Schedule.EACH, threshold=0.99))
            for t in PROMPTS]


def _run(decoder, tokenizer, chunk, requests, join_late=False):
    """Text, finish reason, query score and max score per request; the requests join a batch
    where a short request is decoding (chunks run only then); with ``join_late`` the last one
    joins two decode steps later."""
    batch = decoder.new_batch(prefill_chunk=chunk)
    out, steps = {}, 0
    anchor = GenerationRequest(build_chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}]),
                               SamplingParams(max_new_tokens=30, ignore_eos=True))
    ids, events = batch.add([anchor])
    first = requests[:-1] if join_late else requests
    more, extra = batch.add(first)
    ids, events = ids + more, events + extra
    while batch or (join_late and steps < 3):
        if join_late and steps == 2:
            more, extra = batch.add(requests[-1:])
            ids += more
            events += extra
        events += batch.step()
        steps += 1
    for e in events:
        text, _ = out.get(e.index, ("", None))
        out[e.index] = (text + e.text, e)
    return [(out[i][0], out[i][1].finish_reason, out[i][1].safety["query_score"] if out[i][1].safety else None,
             out[i][1].safety["max_score"] if out[i][1].safety else None) for i in ids]


@pytest.mark.parametrize("chunk", [3, 8])
@pytest.mark.parametrize("case", ["plain", "prefill", "join_late", "signal_off"])
def test_chunked_prefill_matches_one_forward(tiny_model, tokenizer, chunk, case):
    dec = Decoder(tiny_model, tokenizer)
    reqs = lambda: _requests(tokenizer, prefix="Sure, here is" if case == "prefill" else "",  # noqa: E731
                             enabled=case != "signal_off")
    whole = _run(dec, tokenizer, None, reqs(), join_late=case == "join_late")
    chunked = _run(dec, tokenizer, chunk, reqs(), join_late=case == "join_late")
    assert [w[:2] for w in whole] == [c[:2] for c in chunked]
    for w, c in zip(whole, chunked):
        assert c[2:] == pytest.approx(w[2:], abs=1e-5)
    assert all(w[0] for w in whole)


def test_running_rows_step_while_a_long_prompt_prefills(tiny_model, tokenizer):
    """A join in chunks: the running row gets a token at every step of the join."""
    dec = Decoder(tiny_model, tokenizer)
    short = GenerationRequest(build_chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}]),
                              SamplingParams(max_new_tokens=60, ignore_eos=True))
    chunk = len(short.prompt.ids) + 1  # [CLS] + prompt: the short one prefills at once
    batch = dec.new_batch(prefill_chunk=chunk)
    (sid,), first = batch.add([short])
    assert first and len(batch.rows) == 1
    long_prompt = build_chat_prompt(tokenizer, [{"role": "user", "content": PROMPTS[0] * 6}])
    (lid,), events = batch.add([GenerationRequest(long_prompt, SamplingParams(max_new_tokens=4))])
    assert not events and len(batch) == 2  # it joins later, counted as in flight
    chunks = len(long_prompt.ids) // chunk  # at least this many steps before its first token
    assert chunks >= 3
    for i in range(chunks - 1):
        step = batch.step()
        assert [e.index for e in step] == [sid]  # the running row advanced alone
        assert batch.prefill_chunks_run == i + 1  # one chunk before each step (a metric reads it)
    seen = set()
    for _ in range(4):
        seen |= {e.index for e in batch.step()}
    assert lid in seen


def test_a_join_into_an_empty_batch_prefills_at_once(tiny_model, tokenizer):
    batch = Decoder(tiny_model, tokenizer).new_batch(prefill_chunk=4)
    batch.add(_requests(tokenizer))
    assert not batch._joining and len(batch.rows) == len(PROMPTS)


def test_prefill_chunk_must_be_positive(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="prefill_chunk"):
        Decoder(tiny_model, tokenizer).new_batch(prefill_chunk=0)


def test_chunked_joins_are_not_bucketed(tiny_model, tokenizer):
    """The prefill bucket pads whole prefills only: a chunked join runs no chunk of padding."""
    counts = []
    for bucket in (1, 16):
        dec = Decoder(tiny_model, tokenizer)
        dec.prefill_bucket = bucket
        batch = dec.new_batch(prefill_chunk=3)
        batch.add([GenerationRequest(build_chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}]),
                                     SamplingParams(max_new_tokens=40, ignore_eos=True))])
        join = _requests(tokenizer)[1:2]
        assert (1 + len(join[0].prompt.ids)) % 16 > 3  # a bucket would add at least one chunk of padding
        batch.add(join)
        while batch._joining:
            batch.step()
        counts.append(batch.prefill_chunks_run)
    assert counts[0] == counts[1] > 1, counts
