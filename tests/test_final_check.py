"""The final check (`decode.needs_final_check`): a response that ends with tokens no passing
check covers gets one more check before they leave, so no request size or schedule lets text
out unread (one token at a time after a client's prefill included)."""

import pytest

from safety_decoding.decode import Decoder, GenerationRequest
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import build_chat_prompt
from safety_decoding.sampling import SamplingParams

from conftest import scripted_model

QUESTION = [{"role": "user", "content": "Continue the text."}]


@pytest.fixture(params=[True, False], ids=["fused", "eager"])
def fused(request):
    return request.param


def run(decoder, prompt, max_new_tokens, safety, ignore_eos=True, seed=None):
    """(released tokens, final event); a ``seed`` samples (the random model's greedy text repeats one token)."""
    sampling = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos, do_sample=seed is not None,
                              seed=seed)
    req = GenerationRequest(prompt, sampling, safety, trace=True)
    events = [e for step in decoder.generate([req]) for e in step]
    return [t for e in events for t in e.tokens], events[-1]


def test_one_token_after_a_prefill_is_checked_before_it_leaves(tokenizer, fused):
    # query benign, the check that covers the prefill and g_0 malicious: nothing unchecked leaves
    prompt = build_chat_prompt(tokenizer, QUESTION, response_prefix="Sure, here is how to")
    model = scripted_model(tokenizer, -5.0, [5.0])
    tokens, last = run(Decoder(model, tokenizer, fused=fused, first_check=0), prompt, 1, SafetyParams(tau=1))
    assert tokens and all(t.forced for t in tokens)  # the refusal's first token, never g_0
    assert last.safety["intervened"] and last.safety["stage"] == "response"


def test_the_last_token_of_a_capped_response_is_checked(tiny_model, tokenizer, fused):
    prompt = build_chat_prompt(tokenizer, QUESTION)
    tokens, last = run(Decoder(tiny_model, tokenizer, fused=fused, first_check=0), prompt, 5,
                       SafetyParams(threshold=0.999))
    assert len(tokens) == 5 and last.finish_reason == "length"
    assert [t["tokens"] for t in last.safety["trace"]] == [0, 1, 2, 3, 4, 5]


def test_a_malicious_last_token_is_replaced_by_the_refusal(tokenizer, fused):
    # the checks covering g_0..g_3 pass, the final one (covering g_4) fails: g_4 never leaves
    prompt = build_chat_prompt(tokenizer, QUESTION)
    model = scripted_model(tokenizer, -5.0, [-5.0, -5.0, -5.0, -5.0, 5.0])
    tokens, last = run(Decoder(model, tokenizer, fused=fused, first_check=0), prompt, 5, SafetyParams(tau=1))
    assert [t.forced for t in tokens] == [False] * 4 + [True]  # the refusal fills the room left
    assert last.safety["trip_token"] == 4


def test_a_periodic_tail_is_checked_at_the_end(tiny_model, tokenizer):
    prompt = build_chat_prompt(tokenizer, QUESTION)
    safety = SafetyParams(threshold=0.999, schedule="periodic", period=4)
    tokens, last = run(Decoder(tiny_model, tokenizer, first_check=0), prompt, 6, safety)
    assert len(tokens) == 6 and [t["tokens"] for t in last.safety["trace"]][-1] == 6


def test_monitor_and_safety_off_end_without_an_extra_check(tiny_model, tokenizer):
    prompt = build_chat_prompt(tokenizer, QUESTION)
    dec = Decoder(tiny_model, tokenizer, first_check=0)
    _, last = run(dec, prompt, 3, SafetyParams(threshold=0.999, action="monitor"))
    assert [t["tokens"] for t in last.safety["trace"]][-1] == 2  # monitor holds nothing back
    tokens, _ = run(dec, prompt, 3, SafetyParams(enabled=False))
    assert len(tokens) == 3


def test_a_final_check_after_eos_reads_what_a_step_check_reads(tiny_model, tokenizer):
    # periodic (no check within the response) ends by EOS after g_0..g_{i-1}: its final check
    # covers them with the window of `each`'s check at i tokens, and gives the same score (the
    # newest token is not fed twice)
    prompt = build_chat_prompt(tokenizer, QUESTION)
    dec = Decoder(tiny_model, tokenizer, first_check=0)
    tokens, each = run(dec, prompt, 12, SafetyParams(threshold=0.999), seed=0)
    ids = [t.id for t in tokens]
    i = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])  # a token new to the response
    dec.stop_ids = {ids[i]}
    ended, last = run(dec, prompt, 12, SafetyParams(threshold=0.999, schedule="periodic", period=100), False, 0)
    assert [t.id for t in ended] == ids[:i] and last.finish_reason == "eos_token"
    final = last.safety["trace"][-1]
    assert final["tokens"] == i
    assert final["score"] == pytest.approx(each.safety["trace"][i]["score"], abs=2e-4)
