"""The speculative first check (`safety_decoding.first_check`): the check of ``g_0`` run inside
the prefill is the check step 1 would run, and only moves when ``g_0`` is released."""

import pytest
import torch

from safety_decoding.decode import Decoder, GenerationRequest
from safety_decoding.first_check import DEFAULT_CANDIDATES, default_candidates, draft_candidates, with_candidates
from safety_decoding.layout import sequence_layout, stack_layouts
from safety_decoding.masks import PAD, PROBE, TOKEN
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import build_chat_prompt
from safety_decoding.sampling import SamplingParams

from conftest import scripted_model, tiny_safety_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
OTHER = [{"role": "user", "content": "Name three colours, please."}]


@pytest.fixture(params=[True, False], ids=["fused", "eager"])
def fused(request):
    return request.param


def run(decoder, prompts, safety=None, max_new_tokens=12):
    """Per prompt: (token ids, events as (from the prefill?, event)). The default threshold lets
    the random head's verdicts pass: what is compared is the verdicts and when tokens leave."""
    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=max_new_tokens), safety or SafetyParams(threshold=0.999),
                              trace=True) for p in prompts]
    out = [([], []) for _ in prompts]
    for i, step in enumerate(decoder.generate(reqs)):
        for e in step:
            out[e.index][0].extend(t.id for t in e.tokens)
            out[e.index][1].append((i == 0, e))
    return out


def with_first(decoder, ids):
    decoder.first_candidates = tuple(ids)
    return decoder


def from_prefill(events):
    """The token ids released by the prefill's step, and whether it reported a check."""
    return [t.id for pre, e in events if pre for t in e.tokens], any(e.checked for pre, e in events if pre)


def same_verdicts(events, reference):
    """The same checks (tokens covered) with the same scores (rounded to 4 places)."""
    a, b = (e[-1][1].safety["trace"] for e in (events, reference))
    assert [t["tokens"] for t in a] == [t["tokens"] for t in b]  # g_0 is never checked twice
    assert [t["score"] for t in a] == pytest.approx([t["score"] for t in b], abs=2e-4)


def test_candidate_and_probe_rows_read_what_step_one_reads():
    layout = sequence_layout([5, 6, 7, 8], [False, True, True, False], response_start=3)  # 1 prefill token
    batch = stack_layouts([layout, sequence_layout([5, 6], [False, True])], left=True)
    L, k = batch.kinds.shape[1], 3
    ids, kinds, pos, mask = with_candidates(batch, (11, 12, 13), [5, 3], [(-1, 1), None], [True, True])
    m = mask[0, 0]
    assert kinds[0, L:].tolist() == [TOKEN] * k + [PROBE] * k and kinds[1, L:].tolist() == [PAD] * 2 * k
    assert ids[0, L:L + k].tolist() == [11, 12, 13] and pos[0, L:].tolist() == [5] * k + [0] * k
    for j in range(k):
        cand, probe = L + j, L + k + j
        assert m[cand, :L].tolist() == [True] * L  # [CLS] (read by response rows) and the prompt
        assert (m[cand, L:].nonzero().flatten() + L).tolist() == [cand]  # never another candidate
        # the probe: the query, the prefill token in the window, its own candidate, itself
        assert m[probe].nonzero().flatten().tolist() == [2, 3, 4, cand, probe]
    assert mask[1, 0, L:, L:].equal(torch.eye(2 * k, dtype=torch.bool))  # a row that does not speculate


def test_a_hit_releases_g0_with_the_prefill_and_its_verdict_is_step_ones(tiny_model, tokenizer, fused):
    prompt = build_chat_prompt(tokenizer, QUESTION)
    [(ids0, events0)] = run(Decoder(tiny_model, tokenizer, fused=fused, first_check=0), [prompt])
    spec = with_first(Decoder(tiny_model, tokenizer, fused=fused), [ids0[0] + 1, ids0[0], ids0[0] + 2])
    [(ids1, events1)] = run(spec, [prompt])
    assert ids1 == ids0
    assert from_prefill(events0) == ([], False) and from_prefill(events1) == ([ids0[0]], True)
    same_verdicts(events1, events0)


def test_a_miss_changes_nothing(tiny_model, tokenizer, fused):
    prompt = build_chat_prompt(tokenizer, QUESTION)
    [(ids0, events0)] = run(Decoder(tiny_model, tokenizer, fused=fused, first_check=0), [prompt])
    spec = with_first(Decoder(tiny_model, tokenizer, fused=fused), [ids0[0] + 1, ids0[0] + 2])
    [(ids1, events1)] = run(spec, [prompt])
    assert ids1 == ids0 and from_prefill(events1) == ([], False)
    same_verdicts(events1, events0)


def test_a_batch_of_a_hit_and_a_miss_decodes_as_without(tiny_model, tokenizer):
    prompts = [build_chat_prompt(tokenizer, QUESTION), build_chat_prompt(tokenizer, OTHER)]
    plain = run(Decoder(tiny_model, tokenizer, first_check=0), prompts)
    firsts = [ids[0] for ids, _ in plain]
    spec = run(with_first(Decoder(tiny_model, tokenizer), [firsts[0]]), prompts)
    assert [ids for ids, _ in spec] == [ids for ids, _ in plain]
    for (_, e0), (_, e1) in zip(plain, spec):
        same_verdicts(e1, e0)


def test_a_tripping_first_check_refuses_before_anything_is_released(tokenizer):
    # query benign, the check of g_0 malicious, tau 1: g_0 never leaves, the refusal takes its place
    prompt = build_chat_prompt(tokenizer, QUESTION)
    safety = SafetyParams(tau=1)
    [(passing, _)] = run(Decoder(scripted_model(tokenizer, -5.0, [-5.0]), tokenizer, first_check=0), [prompt])
    [(ids0, _)] = run(Decoder(scripted_model(tokenizer, -5.0, [5.0, -5.0]), tokenizer, first_check=0),
                      [prompt], safety)
    spec = with_first(Decoder(scripted_model(tokenizer, -5.0, [5.0, -5.0]), tokenizer), [passing[0]])
    [(ids1, events1)] = run(spec, [prompt], safety)
    assert ids1 == ids0 and ids1[0] != passing[0]
    final = events1[-1][1].safety
    assert final["stage"] == "response" and final["trip_token"] == 0
    assert [e for pre, e in events1 if pre][0].tokens[0].forced  # the refusal, not g_0


def test_candidates_are_the_models_likeliest_first_tokens(tiny_model, tokenizer):
    cands = draft_candidates(tiny_model, tokenizer, 4)
    assert len(set(cands)) == 4 and draft_candidates(tiny_model, tokenizer, 0) == ()
    assert Decoder(tiny_model, tokenizer, first_check=4).first_candidates == cands


def test_the_check_is_on_by_default_only_where_the_model_computes_in_reduced_precision():
    assert default_candidates(torch.bfloat16) == default_candidates(torch.float16) == DEFAULT_CANDIDATES
    assert default_candidates(torch.float32) == 0


@pytest.mark.parametrize("dtype, first_check, expected", [
    ("float32", None, 0), ("bfloat16", None, DEFAULT_CANDIDATES), ("float32", 4, 4), ("bfloat16", 0, 0)])
def test_a_loaded_checkpoint_takes_the_dtypes_default_unless_told(monkeypatch, tokenizer, dtype, first_check,
                                                                   expected):
    import transformers

    import safety_decoding.model as model_module

    monkeypatch.setattr(model_module, "load_safety_model",
                        lambda checkpoint, base, dtype: tiny_safety_model(tokenizer).to(dtype))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path: tokenizer)
    decoder = Decoder.from_checkpoint("unused", "unused", dtype=dtype, first_check=first_check)
    assert len(decoder.first_candidates) == expected


def test_a_one_token_response_ends_with_the_prefill_when_its_check_ran_there(tiny_model, tokenizer):
    prompt = build_chat_prompt(tokenizer, QUESTION)
    [(ids0, _)] = run(Decoder(tiny_model, tokenizer, first_check=0), [prompt])
    [(ids1, events1)] = run(with_first(Decoder(tiny_model, tokenizer), [ids0[0]]), [prompt], max_new_tokens=1)
    assert ids1 == ids0[:1] and len(events1) == 1
    pre, last = events1[0]
    assert pre and last.finish_reason == "length" and [t["tokens"] for t in last.safety["trace"]] == [0, 1]


def test_the_ttft_benchmark_counts_the_decode_step_a_first_token_waits(tiny_model, tokenizer):
    from benchmarks.first_check_ttft import time_to_first_text

    prompt = build_chat_prompt(tokenizer, QUESTION)
    [(ids0, events0)] = run(Decoder(tiny_model, tokenizer, first_check=0), [prompt])
    assert events0[0][1].tokens[0].text  # the tiny model's first token shows text

    def request():
        return GenerationRequest(prompt, SamplingParams(max_new_tokens=3), SafetyParams(threshold=0.999))
    assert time_to_first_text(Decoder(tiny_model, tokenizer, first_check=0), request())[1] == 1
    assert time_to_first_text(with_first(Decoder(tiny_model, tokenizer), [ids0[0]]), request())[1] == 0
