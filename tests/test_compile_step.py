"""benchmarks.compile_step compares like with like: its static step is `FusedBody`'s function."""

import torch

from benchmarks.compile_step import StaticStep
from safety_decoding.fused import FusedBody, grouped_mask, rotary_tables

from conftest import tiny_safety_model


def test_the_static_step_computes_the_fused_bodys_function(tokenizer):
    model = tiny_safety_model(tokenizer, seed=2)
    body, cfg = model.decoder, model.decoder.config
    fused = FusedBody(body, model._causal_lm().lm_head)
    step = StaticStep(body)
    q, spare = 5, 3  # five rows after no cache; three unused static slots, masked off
    x = torch.randn(1, q, cfg.hidden_size)
    positions = torch.arange(q)[None]
    causal = torch.ones(1, 1, q, q, dtype=torch.bool).tril()
    allowed = torch.cat([causal, torch.zeros(1, 1, q, spare, dtype=torch.bool)], -1)
    cos, sin = rotary_tables(body.rotary_emb, x, positions)
    cache = torch.zeros(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, q + spare, step.head_dim)
    with torch.inference_mode():
        want = fused(x, causal, positions)
        got = step(x, cos, sin, grouped_mask(allowed, x.dtype, fused.groups), cache, cache.clone(),
                   torch.arange(q))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
