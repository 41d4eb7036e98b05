"""The fused serving forward computes transformers' function (safety_decoding/fused.py)."""

import copy

import pytest
import torch

from safety_decoding.decode import Decoder, GenerationRequest
from safety_decoding.fused import FusedBody, Projection, can_fuse
from safety_decoding.kv_cache import SlotCache
from safety_decoding.layout import sequence_layout, stack_layouts
from safety_decoding.masks import PROBE, TOKEN, strategic_attention_mask
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import build_chat_prompt
from safety_decoding.sampling import SamplingParams
from safety_decoding.types import Quantization, Schedule

from conftest import tiny_safety_model

PROMPTS = ["What is the capital of France?", "Name three colours, please.", "Write a haiku about rain."]


def _both(model, fn):
    """``fn()`` with transformers' forward, then with the fused one."""
    out = []
    for on in (False, True):
        model.use_fused_forward(on)
        with torch.inference_mode():
            out.append(fn())
    model.use_fused_forward(False)
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_prefill_and_a_probe_step_match_transformers(tokenizer, bias):
    model = tiny_safety_model(tokenizer, seed=1)
    if bias:  # biases everywhere: the fused q/k/v bias is the three concatenated, o and down
        for layer in model.decoder.layers:  # add theirs in the fused residual add
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.bias = torch.nn.Parameter(torch.randn(lin.out_features) * 0.1)
    prompts = [build_chat_prompt(tokenizer, [{"role": "user", "content": t}]) for t in PROMPTS[:2]]
    batch = stack_layouts([sequence_layout(p.ids, p.query_mask, [], response_start=p.response_start)
                           for p in prompts], left=True)

    def forward():
        cache = SlotCache(model.decoder.config)
        h, _ = model.hidden_states(batch.ids, batch.kinds, batch.positions, batch.mask(), cache)
        kv = batch.kinds.shape[1]  # one step: a token row and a probe row per sequence
        kinds = torch.cat([batch.kinds, torch.tensor([[TOKEN, PROBE]] * 2)], 1)
        in_query = torch.cat([batch.in_query, torch.zeros(2, 2, dtype=torch.bool)], 1)
        rows = torch.arange(kv, kv + 2).expand(2, 2)
        mask = strategic_attention_mask(kinds, in_query, rows, torch.ones(2, 2, dtype=torch.bool))
        step, _ = model.hidden_states(torch.tensor([[42, 0], [43, 0]]), kinds[:, kv:],
                                      torch.tensor([[len(prompts[0].ids) + 1, 0]] * 2), mask, cache)
        return h, step, model.lm_logits(step[:, 0])

    eager, fused = _both(model, forward)
    for a, b in zip(eager, fused):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_generation_is_the_same_on_both_paths(tiny_model, tokenizer):
    """Greedy text, finish reasons and every verdict agree, for a batch with probe steps."""
    def generate(fused):
        dec = Decoder(tiny_model, tokenizer, fused=fused)
        assert (tiny_model.fused is not None) == fused
        reqs = [GenerationRequest(build_chat_prompt(tokenizer, [{"role": "user", "content": t}]),
                                  SamplingParams(max_new_tokens=16),
                                  SafetyParams(schedule=Schedule.EACH, threshold=0.99))
                for t in PROMPTS]
        out = {}
        for step in dec.generate(reqs):
            for e in step:
                text, _ = out.get(e.index, ("", None))
                out[e.index] = (text + e.text, e)
        return [(out[i][0], out[i][1].finish_reason, out[i][1].safety["max_score"]) for i in range(len(PROMPTS))]

    eager, fused = generate(False), generate(True)
    tiny_model.use_fused_forward(False)
    assert [e[:2] for e in eager] == [f[:2] for f in fused]
    assert [e[2] for e in eager] == pytest.approx([f[2] for f in fused], abs=1e-5)
    assert any(e[0] for e in eager)


def test_lora_model_is_not_fused(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = tiny_safety_model(tokenizer)
    model.lm = get_peft_model(model.lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not can_fuse(model.decoder)
    assert model.use_fused_forward(True) is False and model.fused is None
    with pytest.raises(ValueError, match="merge LoRA"):
        FusedBody(model.decoder, model._causal_lm().lm_head)


def test_fused_forward_is_never_used_under_autograd(tokenizer):
    """Training reads the model's own parameters: gradients must reach them."""
    model = tiny_safety_model(tokenizer)
    assert model.use_fused_forward(True)
    layout = stack_layouts([sequence_layout([5, 6, 7], [True] * 3, [])])
    h, _ = model.hidden_states(layout.ids, layout.kinds, layout.positions, layout.mask())
    h.sum().backward()
    assert model.decoder.layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize("rows", [1, 2, 7])
def test_projection_matches_linear(rows):
    torch.manual_seed(0)
    w, b = torch.randn(48, 32), torch.randn(48)
    x = torch.randn(3, rows, 32)
    torch.testing.assert_close(Projection(w, b)(x), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_a_model_with_a_fused_body_can_be_deep_copied(tiny_model, tokenizer):
    model = copy.deepcopy(tiny_model)
    Decoder(model, tokenizer)  # builds the fused body (packed weights on CPU)
    assert model.fused is not None
    clone = copy.deepcopy(model)
    assert clone.fused is None and model.fused is not None


@pytest.mark.parametrize("rows", [1, 2, 7])
def test_int8_projection_is_close_to_linear(rows):
    """fbgemm's dynamic int8 product: within a few percent of the float product, and `plus`
    adds the residual."""
    torch.manual_seed(0)
    w, b, r = torch.randn(48, 32) * 0.05, torch.randn(48) * 0.1, torch.randn(3, rows, 48)
    x = torch.randn(3, rows, 32)
    proj, ref = Projection(w, b, Quantization.INT8), torch.nn.functional.linear(x, w, b)
    assert proj.packed is None and proj.weight is None  # no float copy kept
    assert ((proj(x) - ref).norm() / ref.norm()).item() < 0.03
    torch.testing.assert_close(proj.plus(x, r.clone()), proj(x) + r)


def test_int8_forward_stays_close_to_float(tokenizer):
    model = tiny_safety_model(tokenizer, seed=1)
    prompt = build_chat_prompt(tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    layout = stack_layouts([sequence_layout(prompt.ids, prompt.query_mask, [], response_start=prompt.response_start)])

    def logits(quantization):
        model.use_fused_forward(True, quantization)
        with torch.inference_mode():
            h, _ = model.hidden_states(layout.ids, layout.kinds, layout.positions, layout.mask())
            return model.lm_logits(h[:, -1])

    ref, q = logits("none"), logits("int8")
    model.use_fused_forward(False)
    assert torch.nn.functional.cosine_similarity(ref, q).item() > 0.99
    assert not torch.equal(ref, q)


def test_int8_needs_the_fused_forward_in_float32(tokenizer):
    with pytest.raises(ValueError, match="quantization: int8 needs the fused forward"):
        Decoder(tiny_safety_model(tokenizer), tokenizer, fused=False, quantization="int8")
    with pytest.raises(ValueError, match="quantization: int8 needs dtype float32"):
        Decoder(tiny_safety_model(tokenizer).to(torch.bfloat16), tokenizer, quantization="int8")
    with pytest.raises(ValueError):
        Decoder(tiny_safety_model(tokenizer), tokenizer, quantization="int4")


def test_int8_decoder_generates_with_checks(tokenizer):
    model = tiny_safety_model(tokenizer, seed=1)
    dec = Decoder(model, tokenizer, quantization=Quantization.INT8)
    assert model.fused.lm_head.int8 is not None
    layer = model.fused.layers[0]
    assert all(p.int8 is not None for p in (layer.qkv, layer.o, layer.gate_up))
    assert layer.down.int8 is None  # stays float: it moves the head's scores (fused.py)
    reqs = [GenerationRequest(build_chat_prompt(tokenizer, [{"role": "user", "content": t}]),
                              SamplingParams(max_new_tokens=8), SafetyParams(schedule=Schedule.EACH, threshold=0.99))
            for t in PROMPTS[:2]]
    final = [e for step in dec.generate(reqs) for e in step if e.finish_reason]
    assert len(final) == 2 and all(0 <= e.safety["max_score"] <= 1 for e in final)
