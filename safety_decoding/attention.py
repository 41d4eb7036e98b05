"""Attention kernel choice for the strategic mask: grouped-query SDPA without copying K/V.

Every decode step runs under a custom 4-D mask (two query rows on a ``[CLS]`` probe step). With
a mask, transformers' ``sdpa`` path expands the key/value heads to the query heads
(``repeat_kv``: a copy of the whole KV cache, per layer, per step); SmolLM2 has 9 query heads
on 3 key/value heads, so that copy is 3x the cache. On CPU, torch's SDPA takes grouped-query
attention with a mask natively (``enable_gqa=True``), so we register ``ess_sdpa``, which does
that on CPU and defers to transformers' ``sdpa`` everywhere else (on CUDA ``enable_gqa`` with a
mask would fall back to the math kernel). Same math: tests compare both paths.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "ess_sdpa"


def ess_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
             **kwargs):
    """transformers attention function. ``query (B, Hq, q, D)``, ``key/value (B, Hkv, kv, D)``,
    ``attention_mask (B, 1, q, kv)`` (bool, or additive float) or None -> ``((B, q, Hq, D), None)``."""
    groups = getattr(module, "num_key_value_groups", 1)
    if query.device.type == "cpu" and groups > 1 and attention_mask is not None and not module.training:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


AttentionInterface.register(NAME, ess_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_ess_attention(lm) -> None:
    """Switch a transformers model that uses ``sdpa`` to `ess_sdpa` (in place)."""
    if getattr(lm.config, "_attn_implementation", None) == "sdpa":
        lm.set_attn_implementation(NAME)
