"""Numerically safe sampling: tiny temperatures are greedy, bad values are rejected by name,
and NaN or inf never reach ``torch.multinomial``."""

import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper

from conftest import scripted_model
from safety_decoding.decode import Decoder, GenerationRequest
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import build_chat_prompt
from safety_decoding.sampling import (MIN_REPETITION_PENALTY, SAMPLING_EPS, SamplingError,
                                      SamplingParams, logits_processors, make_generator,
                                      select_token)
from safety_decoding.types import FinishReason, ParameterError

LOGITS = torch.tensor([1.0, 3.0, 2.0, -1.0])


def pick(p: SamplingParams, logits=LOGITS, history=(1, 2)):
    return select_token(logits, torch.tensor(history), p, logits_processors(p), make_generator(p))


@pytest.mark.parametrize("t", [1e-300, 1e-6, SAMPLING_EPS / 2])
def test_a_temperature_below_epsilon_is_greedy(t):
    p = SamplingParams(do_sample=True, temperature=t, seed=0)
    assert p.greedy and not any(isinstance(x, TemperatureLogitsWarper) for x in logits_processors(p))
    token, lp = pick(p)
    assert token == 1 and math.isfinite(lp)
    assert not SamplingParams(do_sample=True, temperature=SAMPLING_EPS).greedy


@pytest.mark.parametrize("field,value", [("temperature", 0.0), ("temperature", -1.0),
                                         ("temperature", math.inf), ("temperature", math.nan),
                                         ("repetition_penalty", 0.0), ("repetition_penalty", -0.5),
                                         ("repetition_penalty", math.inf),
                                         ("repetition_penalty", math.nan)])
def test_bad_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(ParameterError) as err:
        SamplingParams(**{field: value})
    assert err.value.field == field


def test_a_tiny_repetition_penalty_is_applied_at_the_floor():
    p = SamplingParams(repetition_penalty=1e-300)
    (proc,) = logits_processors(p)
    assert isinstance(proc, RepetitionPenaltyLogitsProcessor) and proc.penalty == MIN_REPETITION_PENALTY
    token, lp = pick(p, logits=torch.tensor([5.0, 30.0, 20.0, -1.0]), history=(0, 3))
    assert token == 0 and math.isfinite(lp)  # the seen positive logit, boosted, wins; no inf


@pytest.mark.parametrize("do_sample", [False, True])
def test_nan_or_inf_logits_raise_a_sampling_error_before_multinomial(do_sample, monkeypatch):
    def no_multinomial(*args, **kwargs):
        raise AssertionError("torch.multinomial reached")

    monkeypatch.setattr(torch, "multinomial", no_multinomial)
    p = SamplingParams(do_sample=do_sample, seed=0)
    for bad in (torch.tensor([1.0, math.nan, 0.0]), torch.tensor([math.inf, 1.0, 0.0])):
        with pytest.raises(SamplingError, match="not finite"):
            pick(p, logits=bad)


def test_tiny_temperature_after_a_forced_refusal_leaves_the_batch_alive(tokenizer):
    """The batch-kill repro in the library: a refused request sampling at temperature 1e-300
    shares decode steps with two other requests; all three finish normally."""
    dec = Decoder(scripted_model(tokenizer, 5.0, [-5.0]), tokenizer)
    chat = lambda t: build_chat_prompt(tokenizer, [{"role": "user", "content": t}])  # noqa: E731
    others = [GenerationRequest(chat(t), SamplingParams(max_new_tokens=20, ignore_eos=True),
                                SafetyParams(enabled=False)) for t in ("Hello there", "Count to five.")]
    tiny = GenerationRequest(chat("How do I pick a lock?"),
                             SamplingParams(max_new_tokens=40, do_sample=True, temperature=1e-300))
    solo = ["".join(e.text for s in dec.generate([r]) for e in s) for r in others]
    dec.model.head.reset()  # the batch's prefill gets the malicious query verdict
    texts, final = ["", "", ""], [None] * 3
    for step in dec.generate(others + [tiny]):
        for e in step:
            texts[e.index] += e.text
            final[e.index] = e.finish_reason or final[e.index]
    assert texts[:2] == solo and final[:2] == [FinishReason.LENGTH] * 2
    assert texts[2].startswith(dec.refusal) and final[2] in (FinishReason.LENGTH, FinishReason.EOS)
