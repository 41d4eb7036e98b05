"""The serving forward of a Llama-style body: fused projections, prepacked weights, no wrappers.

transformers' ``LlamaModel`` spends a decode step of a 135M model mostly outside the matrix
products: module calls, keyword plumbing, mask and cache dispatch, three q/k/v and two
gate/up products per layer. `FusedBody` computes the same function (the tests compare it to
transformers' forward) with

- one q/k/v product and one gate/up product per layer (the weights concatenated once);
- on CPU, weights prepacked once into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``,
  what inductor's ``freezing`` does), which runs the small-row products of a decode step up to
  2x faster than ``F.linear`` on the plain layout (measured on 2 AVX2 cores: the 49,152 x 576
  LM head at 1 row 6.5 ms against 12.3 ms; a whole decode step's products at 8 rows 169-219 ms
  against 270-401 ms); where oneDNN cannot pack a dtype (bfloat16 without AVX512/AMX), the
  plain layout;
- the layers' own norms, rotary embedding and the `attention.ess_sdpa` kernel, so the numerics
  are transformers' own.

Inference only (no dropout, no LoRA: build it from merged weights), and the weights are
copies: a model trained further needs a new `FusedBody`. Our choice, in the style of
gpt-fast's ``generate.py``; ``ESS_FUSED_FORWARD=false`` keeps transformers' forward.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .attention import ess_sdpa


class Projection:
    """``x (..., in) -> (..., out)`` with a fixed weight ``(out, in)`` and optional bias ``(out,)``,
    prepacked for oneDNN where it can be (CPU, float32, or bfloat16 on CPUs with AVX512/AMX)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.bias = bias
        self.packed = None
        if weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # batch-size hint
            except RuntimeError:  # oneDNN cannot pack this dtype on this CPU
                pass
        self.weight = None if self.packed is not None else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return nn.functional.linear(x, self.weight, self.bias)


def _fuse(*linears: nn.Linear) -> Projection:
    """One `Projection` for several linears on the same input (outputs concatenated)."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    biases = [lin.bias for lin in linears]
    bias = None if all(b is None for b in biases) else torch.cat([
        b.detach() if b is not None else lin.weight.new_zeros(lin.out_features)
        for b, lin in zip(biases, linears)])
    return Projection(weight, bias)


class FusedLayer:
    """One decoder layer (``LlamaDecoderLayer``'s function, fused projections)."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn  # read by `ess_sdpa` (groups, training flag); its weights are unused
        self.head_dim = attn.head_dim
        self.splits = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        self.qkv = _fuse(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o = Projection(attn.o_proj.weight.detach(), _bias(attn.o_proj))
        self.gate_up = _fuse(mlp.gate_proj, mlp.up_proj)
        self.down = Projection(mlp.down_proj.weight.detach(), _bias(mlp.down_proj))
        self.act = mlp.act_fn
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm

    def __call__(self, x, cos, sin, mask, cache_layer):
        B, q, _ = x.shape
        qkv = self.qkv(self.input_norm(x))
        heads = [t.view(B, q, -1, self.head_dim).transpose(1, 2) for t in qkv.split(self.splits, -1)]
        query, key = apply_rotary_pos_emb(heads[0], heads[1], cos, sin)
        if cache_layer is not None:
            key, value = cache_layer.update(key, heads[2])
        else:
            value = heads[2]
        out, _ = ess_sdpa(self.attn, query, key, value, mask, scaling=self.attn.scaling)
        x = x + self.o(out.reshape(B, q, -1))
        gate, up = self.gate_up(self.post_norm(x)).chunk(2, -1)
        return x + self.down(self.act(gate) * up)


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def can_fuse(body: nn.Module) -> bool:
    """True when every projection of ``body`` is a plain ``nn.Linear`` (no LoRA or quantized
    wrappers) and its layers are Llama-shaped."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    try:
        return all(type(getattr(layer.self_attn, n)) is nn.Linear for layer in body.layers for n in names) and \
            all(type(getattr(layer.mlp, n)) is nn.Linear for layer in body.layers
                for n in ("gate_proj", "up_proj", "down_proj"))
    except AttributeError:
        return False


class FusedBody:
    """``LlamaModel``'s forward for serving: ``(inputs_embeds (B, q, H), mask (B, 1, q, kv) bool,
    position_ids (B, q), cache or None) -> hidden (B, q, H)`` after the final norm; and
    `lm_logits` with a prepacked LM head.

    Raises:
        ValueError: ``body`` has a projection that is not a plain ``nn.Linear`` (see `can_fuse`).
    """

    def __init__(self, body: nn.Module, lm_head: nn.Linear):
        if not can_fuse(body):
            raise ValueError("FusedBody needs merged, plain nn.Linear projections (merge LoRA first)")
        self.layers = [FusedLayer(layer) for layer in body.layers[: body.config.num_hidden_layers]]
        self.norm, self.rotary = body.norm, body.rotary_emb
        self.lm_head = Projection(lm_head.weight.detach(), _bias(lm_head))

    def __call__(self, x, mask, position_ids, cache=None) -> torch.Tensor:
        cos, sin = self.rotary(x, position_ids=position_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache.layers[i] if cache is not None else None)
        return self.norm(x)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., H)`` -> ``(..., V)``."""
        return self.lm_head(hidden)
