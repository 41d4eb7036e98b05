from dataclasses import replace

import pytest
import torch

from safety_decoding.decode import Decoder, GenerationRequest
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import build_chat_prompt
from safety_decoding.sampling import SamplingParams
from safety_decoding.text import refusal_separator

from conftest import scripted_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(autouse=True, params=[True, False], ids=["fused", "eager"])
def forward_path(request, monkeypatch):
    """Every test here runs on the fused forward (the default) and on transformers' (the
    ``ESS_FUSED_FORWARD=false`` fallback)."""
    init = Decoder.__init__
    monkeypatch.setattr(Decoder, "__init__",
                        lambda self, model, tok, fused=True: init(self, model, tok, fused=request.param))
    return request.param


def run(decoder, prompt, sampling=None, safety=None):
    events = [e for step in decoder.generate([GenerationRequest(
        prompt, sampling or SamplingParams(max_new_tokens=24), safety or SafetyParams())]) for e in step]
    return "".join(e.text for e in events), events


def test_plain_decoding_matches_transformers_generate(tiny_model, tokenizer):
    prompt = build_chat_prompt(tokenizer, QUESTION)
    text, events = run(Decoder(tiny_model, tokenizer), prompt, safety=SafetyParams(enabled=False))
    ref = tiny_model.lm.generate(torch.tensor([prompt.ids]), max_new_tokens=24, do_sample=False,
                                 pad_token_id=2)[0, len(prompt.ids):]
    ref_ids = [t for t in ref.tolist() if t != 2]
    ids = [t.id for e in events for t in e.tokens]
    assert ids == ref_ids[:len(ids)] and len(ids) >= 1


def test_batched_rows_match_single_rows(tiny_model, tokenizer):
    dec = Decoder(tiny_model, tokenizer)
    prompts = [build_chat_prompt(tokenizer, QUESTION),
               build_chat_prompt(tokenizer, [{"role": "user", "content": "Name three colours, please."}])]
    singles = [run(dec, p)[0] for p in prompts]
    out = ["", ""]
    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=24)) for p in prompts]
    for step in dec.generate(reqs):
        for e in step:
            out[e.index] += e.text
    assert out == singles


@pytest.mark.parametrize("bucket", [7, 16])
def test_prefill_bucket_padding_changes_no_generation(tiny_model, tokenizer, bucket):
    prompt = build_chat_prompt(tokenizer, QUESTION)
    dec = Decoder(tiny_model, tokenizer)
    dec.prefill_bucket = 1
    text, events = run(dec, prompt)
    dec.prefill_bucket = bucket
    padded_text, padded = run(dec, prompt)
    assert padded_text == text and padded[-1].finish_reason == events[-1].finish_reason
    assert padded[-1].safety["query_score"] == pytest.approx(events[-1].safety["query_score"], abs=1e-5)


def test_seed_makes_sampling_deterministic(tiny_model, tokenizer):
    dec = Decoder(tiny_model, tokenizer)
    prompt = build_chat_prompt(tokenizer, QUESTION)
    s = lambda seed: SamplingParams(max_new_tokens=20, do_sample=True, temperature=1.5, top_p=0.95,
                                    top_k=50, seed=seed)
    a, b, c = (run(dec, prompt, s(seed))[0] for seed in (7, 7, 8))
    assert a == b and a != c


def test_stop_string_ends_generation_and_is_not_returned(tiny_model, tokenizer):
    dec = Decoder(tiny_model, tokenizer)
    prompt = build_chat_prompt(tokenizer, QUESTION)
    full, _ = run(dec, prompt, SamplingParams(max_new_tokens=24))
    stop = full[len(full) // 2: len(full) // 2 + 3]
    text, events = run(dec, prompt, SamplingParams(max_new_tokens=24, stop=(stop,)))
    assert events[-1].finish_reason == "stop_sequence"
    assert text == full[:full.find(stop)]


def test_length_finish_and_token_count(tiny_model, tokenizer):
    text, events = run(Decoder(tiny_model, tokenizer), build_chat_prompt(tokenizer, QUESTION),
                       SamplingParams(max_new_tokens=5), SafetyParams(enabled=False))
    assert events[-1].finish_reason in ("length", "eos_token")
    assert sum(len(e.tokens) for e in events) == events[-1].generated_tokens <= 5


def scripted(tokenizer, query, checks):
    return scripted_model(tokenizer, query, checks)


def test_malicious_query_inserts_refusal_prefix(tokenizer):
    tiny_model = scripted(tokenizer, 5.0, [-5.0])
    dec = Decoder(tiny_model, tokenizer)
    text, events = run(dec, build_chat_prompt(tokenizer, QUESTION), SamplingParams(max_new_tokens=30))
    assert text.startswith(tiny_model.config.refusal_prefix)
    assert events[-1].safety["intervened"] and events[-1].safety["stage"] == "query"
    assert events[0].tokens[0].forced


def test_no_token_after_s_t_reaches_any_event(tokenizer):
    # checks cover g_0..g_{n-1}; the 4th check (covering g_3) starts a malicious streak
    tiny_model = scripted(tokenizer, -5.0, [-5, -5, -5, 5, 5, 5, -5])
    dec = Decoder(tiny_model, tokenizer)
    prompt = build_chat_prompt(tokenizer, QUESTION)
    text, events = run(dec, prompt, SamplingParams(max_new_tokens=40), SafetyParams(tau=3))
    emitted = [t for e in events for t in e.tokens]
    first_forced = next(i for i, t in enumerate(emitted) if t.forced)
    assert first_forced == 3  # g_0..g_2 passed; g_3.. were held and then truncated
    assert events[-1].safety["stage"] == "response" and events[-1].safety["trip_token"] == 3
    # The refusal starts a new paragraph right after the text that passed.
    passed = "".join(t.text for t in emitted[:3])
    assert text.startswith(passed + refusal_separator(passed, True) + tiny_model.config.refusal_prefix)


def test_a_refusal_at_the_token_cap_stops_at_max_new_tokens(tokenizer):
    # the 4th check (covering g_3) starts a streak that is still unresolved (tau 3) when the
    # cap ends the response: g_3.. are dropped and the refusal fills only the room left
    model = scripted(tokenizer, -5.0, [-5, -5, -5, 5])
    _, events = run(Decoder(model, tokenizer), build_chat_prompt(tokenizer, QUESTION),
                    SamplingParams(max_new_tokens=6, ignore_eos=True), SafetyParams(tau=3))
    emitted = [t for e in events for t in e.tokens]
    assert [t.forced for t in emitted] == [False] * 3 + [True] * 3
    assert events[-1].safety["intervened"] and events[-1].safety["trip_token"] == 3


@pytest.mark.parametrize(("before", "mid_response", "separator"), [
    ("The", True, "\n\n"), ("Step 1.\n", True, "\n"), ("Done.\n\n", True, ""),
    ("Sure, here is", False, " "), ("Sure, here is ", False, ""), ("", False, "")])
def test_a_mid_response_refusal_starts_a_new_paragraph(before, mid_response, separator):
    assert refusal_separator(before, mid_response) == separator


def test_monitor_mode_leaves_output_untouched(tokenizer):
    prompt = build_chat_prompt(tokenizer, QUESTION)
    clean, _ = run(Decoder(scripted(tokenizer, -5.0, [-5.0]), tokenizer), prompt)
    text, events = run(Decoder(scripted(tokenizer, 5.0, [5.0]), tokenizer), prompt,
                       safety=SafetyParams(action="monitor"))
    assert text == clean
    assert events[-1].safety["would_trip"] and not events[-1].safety["intervened"]


def test_abort_stops_at_step_boundary(tiny_model, tokenizer):
    dec = Decoder(tiny_model, tokenizer)
    steps = []
    req = GenerationRequest(build_chat_prompt(tokenizer, QUESTION), SamplingParams(max_new_tokens=50),
                            SafetyParams(enabled=False), cancelled=lambda: len(steps) >= 3)
    for step in dec.generate([req]):
        steps.append(step)
    assert steps[-1][-1].finish_reason == "abort" and len(steps) <= 4


def test_periodic_schedule_never_leaks_tokens_after_s_t(tokenizer):
    # period 3: checks at n=3 (pass, clears g_0..g_2), n=6 and n=9 (fail): trip back to g_3
    model = scripted(tokenizer, -5.0, [-5, 5, 5, -5])
    text, events = run(Decoder(model, tokenizer), build_chat_prompt(tokenizer, QUESTION),
                       SamplingParams(max_new_tokens=40),
                       SafetyParams(schedule="periodic", period=3, tau=2))
    emitted = [t for e in events for t in e.tokens]
    first_forced = next(i for i, t in enumerate(emitted) if t.forced)
    assert first_forced == 3 and events[-1].safety["trip_token"] == 3
    assert sum(e.checked for e in events) == 3


def test_update_cls_changes_what_later_tokens_read(tiny_model, tokenizer):
    dec = Decoder(tiny_model, tokenizer)
    prompt = build_chat_prompt(tokenizer, QUESTION)
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    _, kept = run(dec, prompt, sp, SafetyParams(threshold=0.99, action="monitor"))
    _, updated = run(dec, prompt, sp, SafetyParams(threshold=0.99, action="monitor", update_cls=True))
    lp = lambda evs: [t.logprob for e in evs for t in e.tokens]
    assert lp(kept)[:2] == lp(updated)[:2]  # g_0 and g_1 come before the first write
    assert lp(kept) != lp(updated)


def test_reweight_steers_to_the_refusal_without_forcing(tokenizer):
    prompt = build_chat_prompt(tokenizer, QUESTION)
    strong = Decoder(scripted(tokenizer, 5.0, [-5.0]), tokenizer)
    text, events = run(strong, prompt, SamplingParams(max_new_tokens=30),
                       SafetyParams(action="reweight", reweight_strength=50.0))
    emitted = [t for e in events for t in e.tokens]
    assert text.startswith(strong.refusal) and not any(t.forced for t in emitted)
    assert events[-1].safety["intervened"] and events[-1].safety["reweights"] == 1
    weak = Decoder(scripted(tokenizer, 5.0, [-5.0]), tokenizer)
    text, _ = run(weak, prompt, SamplingParams(max_new_tokens=30),
                  SafetyParams(action="reweight", reweight_strength=0.01))
    assert not text.startswith(weak.refusal)  # a nudge the random model does not follow


def writes_its_refusal(model, completion=" it could cause harm."):
    """``model`` as a checkpoint trained with no refusal text (`SafetyConfig.refusal_completion`)."""
    model.config = replace(model.config, refusal_completion=completion)
    return model


@pytest.mark.parametrize("checks", [[-5.0], [-5, -5, -5, 5, 5, 5, -5]], ids=["query", "response"])
def test_a_server_written_refusal_is_inserted_whole_and_ends_the_response(tokenizer, checks):
    model = writes_its_refusal(scripted(tokenizer, 5.0 if len(checks) == 1 else -5.0, checks))
    text, events = run(Decoder(model, tokenizer), build_chat_prompt(tokenizer, QUESTION),
                       SamplingParams(max_new_tokens=60, ignore_eos=True), SafetyParams(tau=3))
    refusal = model.config.refusal_prefix + model.config.refusal_completion
    assert text.endswith(refusal) and text.count(refusal) == 1
    assert events[-1].finish_reason == "eos_token" and events[-1].safety["intervened"]
    emitted = [t for e in events for t in e.tokens]
    assert all(t.forced for t in emitted[next(i for i, t in enumerate(emitted) if t.forced):])
    # inserted at once: the refusal costs no decode step of its own
    assert sum(1 for e in events if any(t.forced for t in e.tokens)) == 1


def test_a_server_written_refusal_at_the_token_cap_is_cut_short(tokenizer):
    model = writes_its_refusal(scripted(tokenizer, 5.0, [-5.0]))
    _, events = run(Decoder(model, tokenizer), build_chat_prompt(tokenizer, QUESTION),
                    SamplingParams(max_new_tokens=4))
    assert events[-1].generated_tokens == 4 and events[-1].finish_reason in ("eos_token", "length")


def test_reweight_that_follows_a_server_written_refusal_ends_with_it(tokenizer):
    prompt = build_chat_prompt(tokenizer, QUESTION)
    dec = Decoder(writes_its_refusal(scripted(tokenizer, 5.0, [-5.0])), tokenizer)
    text, events = run(dec, prompt, SamplingParams(max_new_tokens=60, ignore_eos=True),
                       SafetyParams(action="reweight", reweight_strength=50.0))
    assert text == dec.refusal + dec.refusal_completion and events[-1].finish_reason == "eos_token"
    assert not any(t.forced for e in events for t in e.tokens)  # steered, never forced


def test_rows_joining_and_leaving_a_running_batch_match_single_rows(tiny_model, tokenizer):
    """Continuous batching: requests join at step boundaries (different prompt lengths, so the
    cache is left-padded on either side), finish at different steps and leave (the batch is
    trimmed), and each keeps its own safety state: outputs and verdicts equal solo runs."""
    dec = Decoder(tiny_model, tokenizer)
    texts = ["What is the capital of France?", "Hi", "Name three colours, please, and explain why "
             "each of them is a primary colour in painting but not in light.", "Count to five."]
    schedules = ["each", "annealing", "periodic", "each"]
    reqs = [GenerationRequest(build_chat_prompt(tokenizer, [{"role": "user", "content": t}]),
                              SamplingParams(max_new_tokens=n),
                              SafetyParams(schedule=s, period=3, update_cls=True, action=a), trace=True)
            for t, n, s, a in zip(texts, (20, 6, 14, 24), schedules, ("monitor", "refuse", "monitor", "monitor"))]
    solo = []
    for r in reqs:
        events = [e for step in dec.generate([r]) for e in step]
        solo.append(("".join(e.text for e in events), events[-1].finish_reason, events[-1].safety))
    batch, out, ids = dec.new_batch(), {}, {}
    joins = {0: [0], 2: [1, 2], 5: [3]}  # step -> requests that join before it
    step = 0
    while step <= max(joins) or batch:
        for i in joins.get(step, []):
            [rid], events = batch.add([reqs[i]])
            ids[rid] = i
            for e in events:
                out[i] = out.get(i, "") + e.text
        for e in batch.step():
            out[ids[e.index]] = out.get(ids[e.index], "") + e.text
            if e.finish_reason:
                assert (out[ids[e.index]], e.finish_reason, e.safety) == solo[ids[e.index]]
        step += 1
    assert [out[i] for i in range(4)] == [s[0] for s in solo]
    assert solo[0][2]["checks"] >= 10 and solo[2][2]["checks"] >= 3  # monitor: the probes kept running
    assert len(batch) == 0 and batch.num_slots == 0
