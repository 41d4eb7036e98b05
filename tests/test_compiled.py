"""The compiled decode step (`safety_decoding.compiled`) computes the fused forward's function.

One tiny model of its own (the shared fixture's fused body is rebuilt by every `Decoder`), in
float32, compiled once for the module: compiling takes 10-20 s on 2 cores.
"""

import pytest
import torch

from safety_decoding.compiled import CompiledStep, StepGraph
from safety_decoding.decode import Decoder, GenerationRequest
from safety_decoding.fused import grouped_mask, rotary_tables
from safety_decoding.kv_cache import SlotCache
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import build_chat_prompt
from safety_decoding.sampling import SamplingParams

from conftest import tiny_safety_model


@pytest.fixture(scope="module")
def compiled_decoder(tokenizer):
    decoder = Decoder(tiny_safety_model(tokenizer, seed=3), tokenizer, compile=True)
    decoder.model.fused.compiled.warm_up()
    return decoder


def _prefilled(body, cfg, n: int) -> SlotCache:
    cache = SlotCache(cfg)
    with torch.inference_mode():
        body(torch.randn(1, n, cfg.hidden_size), torch.ones(1, 1, n, n, dtype=torch.bool).tril(),
             torch.arange(n)[None], cache)
    return cache


def _copy(cache: SlotCache, cfg) -> SlotCache:
    other = SlotCache(cfg)
    for mine, theirs in zip(other.layers, cache.layers):
        mine.lazy_initialization(theirs.keys, theirs.values)
        mine.keys, mine.values = theirs.keys.clone(), theirs.values.clone()
    return other


@pytest.mark.parametrize("q", [1, 2])
def test_compiled_steps_equal_the_eager_fused_steps(compiled_decoder, q):
    """Hidden states and the K/V written over 80 steps of a token row (``q`` 1) or a token and
    its probe (2, the probe's slot dropped after each step as the decoder does). The buffers
    outgrow their first capacity (71 slots after a prefill of 7) with no recompile: the KV length
    and capacity are dynamic."""
    body, cfg = compiled_decoder.model.fused, compiled_decoder.model.decoder.config
    torch.manual_seed(q)
    n = 7
    cache = _prefilled(body, cfg, n)
    twin = _copy(cache, cfg)
    capacity = cache.layers[0].reserve(0)[0].shape[2]
    for _ in range(80):
        with torch.inference_mode(), torch.compiler.set_stance("fail_on_recompile"):
            x = torch.randn(1, q, cfg.hidden_size)
            mask = torch.ones(1, 1, q, n + q, dtype=torch.bool)
            mask[0, 0, 0, n + 1:] = False  # the token row does not see the probe
            positions = torch.arange(n, n + q)[None]
            got = body(x, mask, positions, cache)
            compiled, body.compiled = body.compiled, None
            try:
                want = body(x, mask, positions, twin)
            finally:
                body.compiled = compiled
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert cache.get_seq_length() == twin.get_seq_length() == n + q
        for mine, theirs in zip(cache.layers, twin.layers):
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(mine.values, theirs.values, rtol=1e-4, atol=1e-5)
        if q == 2:
            cache.crop(-1), twin.crop(-1)
        n += 1
    assert cache.layers[0].reserve(0)[0].shape[2] > capacity
    assert body.compiled.failure is None  # no step fell back to eager


def test_generations_are_the_same_compiled_and_eager(compiled_decoder, tokenizer, monkeypatch):
    """Greedy tokens, finish reasons and every safety verdict, safety on and off, for a batch of
    two (eager while both run, compiled once one is left) and for one request alone."""
    def run(requests):
        out = {}
        for events in compiled_decoder.generate(requests):
            for e in events:
                row = out.setdefault(e.index, {"ids": []})
                row["ids"] += [t.id for t in e.tokens]
                if e.finish_reason:
                    row["finish"], row["safety"] = e.finish_reason, e.safety
        return out

    def requests(*new_tokens):
        """One request per entry, safety on for the first, off for the second."""
        prompts = ["Tell me about the sea.", "How do I bake bread?"]
        return [GenerationRequest(build_chat_prompt(tokenizer, [{"role": "user", "content": p}]),
                                  SamplingParams(max_new_tokens=n, ignore_eos=True),
                                  SafetyParams(enabled=i == 0, threshold=0.99), trace=True)
                for i, (p, n) in enumerate(zip(prompts, new_tokens))]

    calls = []
    step = CompiledStep.__call__
    monkeypatch.setattr(CompiledStep, "__call__", lambda self, x, *a: calls.append(x.shape[1]) or step(self, x, *a))
    fused = compiled_decoder.model.fused
    for batch in (requests(12), requests(5, 14)):
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled = run(batch)
        kept, fused.compiled = fused.compiled, None
        try:
            eager = run(batch)
        finally:
            fused.compiled = kept
        assert compiled == eager
        assert all(len(r["ids"]) > 0 for r in compiled.values())
    assert set(calls) == {1, 2}  # steps with and without a probe ran compiled
    assert fused.compiled.failure is None


def test_a_step_that_would_recompile_runs_eager_and_later_steps_too(tokenizer, monkeypatch, caplog):
    """A graph traced outside the warm-up would lose the frozen weights, so a refused recompile
    (``fail_on_recompile``) falls back to the eager forward with the same values, logged once."""
    decoder = Decoder(tiny_safety_model(tokenizer, seed=4), tokenizer, compile=True)
    body, cfg = decoder.model.fused, decoder.model.decoder.config
    compiled = body.compiled
    compiled.compile_seconds = {1: 0.0, 2: 0.0}  # as after a warm-up, without compiling
    calls = []

    def refuse(*args):
        calls.append(1)
        raise RuntimeError("Detected recompile when torch.compile stance is 'fail_on_recompile'. ...")

    monkeypatch.setattr(compiled, "fn", refuse)
    torch.manual_seed(0)
    cache = _prefilled(body, cfg, 6)
    twin = _copy(cache, cfg)
    with torch.inference_mode():
        x, mask, positions = torch.randn(1, 1, cfg.hidden_size), torch.ones(1, 1, 1, 7, dtype=torch.bool), torch.tensor([[6]])
        got = body(x, mask, positions, cache)
        body.compiled = None
        want = body(x, mask, positions, twin)
        body.compiled = compiled
    torch.testing.assert_close(got, want)
    assert cache.get_seq_length() == twin.get_seq_length() == 7
    assert compiled.failure and "needed a new graph" in caplog.text
    assert not compiled.ready(x, cache, None) and calls == [1]  # later steps go eager at once


def test_runs_one_row_steps_after_a_prefill_only(compiled_decoder):
    cfg, compiled = compiled_decoder.model.decoder.config, compiled_decoder.model.fused.compiled
    cache = _prefilled(compiled_decoder.model.fused, cfg, 5)
    with torch.inference_mode():
        rows = {(b, q): torch.zeros(b, q, cfg.hidden_size) for b, q in ((1, 1), (1, 2), (2, 1), (1, 3))}
    x = lambda b, q: rows[(b, q)]  # noqa: E731
    assert compiled.ready(x(1, 1), cache, None) and compiled.ready(x(1, 2), cache, None)
    assert not compiled.ready(x(2, 1), cache, None)  # a batch: eager
    assert not compiled.ready(x(1, 3), cache, None)  # a prefill chunk of 3 (of 1-2: compiled)
    assert not compiled.ready(x(1, 1), SlotCache(cfg), None)  # a prefill
    assert not compiled.ready(x(1, 1), None, None)
    assert not compiled.ready(x(1, 2), cache, torch.tensor([1]))  # LoRA on the probe row
    assert not compiled.ready(torch.zeros(1, 1, cfg.hidden_size), cache, None)  # not inference


def test_a_failed_compile_leaves_every_step_eager(tokenizer, monkeypatch, caplog):
    """No C++ compiler (say): logged once, the generation the same as eager."""
    model = tiny_safety_model(tokenizer, seed=6)
    decoder = Decoder(model, tokenizer, compile=True)
    compiled = model.fused.compiled

    def broken(self, rows=None):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
    monkeypatch.setattr(CompiledStep, "warm_up", broken)
    request = lambda: GenerationRequest(build_chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}]),  # noqa: E731
                                        SamplingParams(max_new_tokens=6, ignore_eos=True))
    ids = lambda: [t.id for events in decoder.generate([request()]) for e in events for t in e.tokens]  # noqa: E731
    with caplog.at_level("WARNING", logger="safety_decoding.compiled"):
        got = ids()
    assert "No working C++ compiler" in compiled.failure
    assert sum("did not compile" in r.message for r in caplog.records) == 1
    model.fused.compiled = None
    assert got == ids()


def test_compile_runs_only_where_it_can(tokenizer):
    """int8 weights and the transformers forward keep every step eager; the decoder says so."""
    model = tiny_safety_model(tokenizer, seed=4)
    assert Decoder(model, tokenizer, compile=True, quantization="int8").compiled is False
    assert model.fused.compiled is None
    assert Decoder(model, tokenizer, compile=True, fused=False).compiled is False
    assert Decoder(model, tokenizer).compiled is False  # off unless asked


@pytest.mark.parametrize("variant", [{}, {"attention_bias": True, "mlp_bias": True}, {"hidden_act": "gelu"}])
def test_the_graph_is_the_fused_bodys_function_uncompiled(tokenizer, variant):
    """`StepGraph` itself (eager), so a failure above points at the compiler or at the graph;
    also on the Llama variants `fused.can_fuse` admits (projection biases, another activation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safety_decoding.model import SafetyConfig, SafetyModel

    torch.manual_seed(5)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, **variant)).eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)  # transformers starts them at zero
    decoder = Decoder(SafetyModel(lm, SafetyConfig("tiny", "none", 64, len(tokenizer))).eval(), tokenizer)
    body, cfg = decoder.model.fused, decoder.model.decoder.config
    graph = StepGraph(decoder.model.decoder)
    cache = _prefilled(body, cfg, 9)
    twin = _copy(cache, cfg)
    x, positions = torch.randn(1, 2, cfg.hidden_size), torch.arange(9, 11)[None]
    mask = torch.ones(1, 1, 2, 11, dtype=torch.bool)
    with torch.inference_mode():
        want = body(x, mask, positions, twin)
        cos, sin = rotary_tables(body.rotary, x, positions)
        keys, values = cache.reserve(2)
        got = graph(x, cos, sin, grouped_mask(mask, x.dtype, body.groups), keys, values)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
