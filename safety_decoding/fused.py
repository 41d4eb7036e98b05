"""The serving forward of a Llama-style body: fused projections, prepacked weights, no wrappers.

transformers' ``LlamaModel`` spends a decode step of a 135M model mostly outside the matrix
products: module calls, keyword plumbing, mask and cache dispatch, three q/k/v and two
gate/up products per layer. `FusedBody` computes the same function (the tests compare it to
transformers' forward) with

- one q/k/v product and one gate/up product per layer (the weights concatenated once);
- on CPU, weights prepacked once into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``,
  what inductor's ``freezing`` does) for `PACK_ROWS_HINT` rows, which runs the small-row
  products of a decode step up to 3x faster than ``F.linear`` on the plain layout
  (`benchmarks.pack_hint`); the residual adds ride on the o and down products as oneDNN
  post-ops; where oneDNN cannot pack a dtype (bfloat16 without AVX512/AMX), the plain layout;
- fewer small operations per layer, each with transformers' arithmetic (the same values in
  float32; in bfloat16 the fused add and ``addcmul`` round once where transformers rounds
  twice): torch's RMSNorm in float32, one rotary embedding for the query and key heads
  together (`rotate`), one additive mask per forward, and `grouped_attention`. Every
  operation costs a few microseconds of dispatch on CPU whatever its size, and a 30-layer step
  runs about 1,500.

With ``quantization`` `Quantization.INT8` (``ESS_QUANTIZATION=int8``; CPU, float32) every
projection but the MLP's down projection, LM head included, runs fbgemm's dynamic int8 product
(torch's ``quantized.linear_dynamic``, what ``torch.ao.quantization.quantize_dynamic`` gives
``nn.Linear``): weights int8 per output channel, activations quantized per call; about 40 % of
the float32 bytes to read, and int8 products run about 2.5x faster than float32 ones at 1-2 rows
on 2 AVX2 cores (`benchmarks.pack_hint`).
The down projection stays float32 (prepacked) because quantizing it is what moves the head's
scores: on the 90 word-sense pairs the shipped checkpoint never trained on, with every
projection int8 24-28 % of its query verdicts differ from float32's and its TPR falls from
74-83 % to 34-36 %; with the down projection float32, 4-6 % differ and TPR is 71-78 % (AUROC
0.926-0.933 against 0.923-0.924; `benchmarks.quant_agreement`,
`benchmarks/results/quant_agreement.json`). Its input, ``SiLU(gate) * up``, has a few large
channels, and one activation scale per call leaves the rest a handful of int8 steps. Off by
default: the threshold was calibrated in float32. Our choice.

A checkpoint whose LoRA adapter runs on the ``[CLS]`` and probe rows only (`types.LoraRows.SAFETY`)
keeps it unmerged: every row runs the base weights, and `RowAdapter` adds the adapter's product
on those rows (docs/method.md, "Decision 17").

Inference only (no dropout; an every-row LoRA must be merged first), and the weights are
copies: a model trained further needs a new `FusedBody`. Our choice, in the style of
gpt-fast's ``generate.py``; ``ESS_FUSED_FORWARD=false`` keeps transformers' forward.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .types import Quantization

PACK_ROWS_HINT = 16
"""Rows per product that oneDNN packs the weights for. A hint of 1 picks a one-row kernel that
runs 2 rows (a decode step with a ``[CLS]`` probe) at 1.7x the cost of one: on 2 AVX2 cores all
of a step's float32 products take 33-35 ms at 1 row with any hint, but at 2 rows 58 ms with hint
1 and 33.5-35 ms with hints 2-32, at 16 rows 106 against 80-84 ms (`benchmarks.pack_hint`,
`benchmarks/results/pack_hint.json`). Our choice."""


def check_quantization(quantization: Quantization, device: torch.device, dtype: torch.dtype) -> None:
    """Raises:
        ValueError: ``quantization`` is int8 and the model is not float32 on a CPU with fbgemm
            (fbgemm's dynamic products take float32 activations on x86 CPUs only)."""
    if quantization == Quantization.INT8 and not (
            device.type == "cpu" and dtype == torch.float32 and "fbgemm" in torch.backends.quantized.supported_engines):
        raise ValueError(f"quantization: int8 needs dtype float32 on an x86 CPU (fbgemm), got {dtype} on {device}")


def _int8_weight(weight: torch.Tensor, bias: torch.Tensor | None):
    """``weight (out, in)`` float -> fbgemm's packed int8 weight, symmetric per output channel
    (scale = max |w| / 127 of the row, zero point 0; ``quantize_dynamic``'s per-channel scheme)."""
    w = weight.float()
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # torch warns that quantized tensors are deprecated (torchao)
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float())


class Projection:
    """``x (..., in) -> (..., out)`` with a fixed weight ``(out, in)`` and optional bias ``(out,)``,
    prepacked for oneDNN where it can be (CPU, float32, or bfloat16 on CPUs with AVX512/AMX), or
    as fbgemm's int8 weight (``quantization`` int8; see `check_quantization`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 quantization: Quantization = Quantization.NONE):
        self.bias = bias
        self.packed = None
        self.int8 = None
        if quantization == Quantization.INT8:
            self.int8 = _int8_weight(weight, bias)
        elif weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
            except RuntimeError:  # oneDNN cannot pack this dtype on this CPU
                pass
        self.weight = None if self.packed is not None or self.int8 is not None else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None:
            # reduce_range: 7-bit activations, as quantize_dynamic on x86 (fbgemm's int16 sums
            # of two u8*s8 products can overflow with 8 bits).
            return torch.ops.quantized.linear_dynamic(x, self.int8, True)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return nn.functional.linear(x, self.weight, self.bias)

    def plus(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)``, the add fused into oneDNN's product where the weight is packed."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
        return self(x).add_(residual)


class RowAdapter:
    """The LoRA factors of projections that share one input, for some rows of a forward only
    (`types.LoraRows.SAFETY`): ``delta(x (n, in)) = (x @ A^T) @ B^T`` with the projections' ``A``
    stacked and their ``B`` (scaling folded in) block-diagonal, so one pair of small products
    serves q/k/v (or gate/up) together."""

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor] | None], outs: list[int]):
        """``parts``: per projection ``(A (r, in), B (out, r) scaled)`` or None; ``outs``: their
        output sizes."""
        a = torch.cat([p[0] for p in parts if p is not None])
        b = a.new_zeros(sum(outs), a.shape[0])
        row = col = 0
        for p, out in zip(parts, outs):
            if p is not None:
                b[row:row + out, col:col + p[0].shape[0]] = p[1]
                col += p[0].shape[0]
            row += out
        self.a_t, self.b_t = a.t().contiguous(), b.t().contiguous()  # (in, R), (R, out)

    def add_to(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``y (B, q, out) += delta(x (B, q, in))`` on the flattened ``rows (n,)``, in place."""
        picked = x.reshape(-1, x.shape[-1]).index_select(0, rows)
        y.view(-1, y.shape[-1]).index_add_(0, rows, picked @ self.a_t @ self.b_t)
        return y


def _lora_parts(module: nn.Module) -> tuple[nn.Linear, tuple[torch.Tensor, torch.Tensor] | None]:
    """``(base nn.Linear, (A, B * scaling) or None)`` of a plain linear or a peft LoRA linear."""
    if type(module) is nn.Linear:
        return module, None
    (name,) = module.active_adapters  # `can_fuse` admits one plain adapter only
    a, b = module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach()
    return module.base_layer, (a, b * module.scaling[name])


def _row_adapter(*parts: tuple[nn.Linear, tuple | None]) -> RowAdapter | None:
    """One `RowAdapter` for `_lora_parts` of projections on the same input, or None without LoRA."""
    if all(lora is None for _, lora in parts):
        return None
    return RowAdapter([lora for _, lora in parts], [lin.out_features for lin, _ in parts])


def concat_bias(*linears: nn.Linear) -> torch.Tensor | None:
    """The biases of linears whose outputs are concatenated (zeros for those without), or None
    when none has one."""
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                      for lin in linears])


def _fuse(*linears: nn.Linear, quantization: Quantization = Quantization.NONE) -> Projection:
    """One `Projection` for several linears on the same input (outputs concatenated)."""
    return Projection(torch.cat([lin.weight.detach() for lin in linears]), concat_bias(*linears), quantization)


class FusedLayer:
    """One decoder layer (``LlamaDecoderLayer``'s function, fused projections)."""

    def __init__(self, layer: nn.Module, quantization: Quantization = Quantization.NONE):
        """A peft LoRA projection (`LoraRows.SAFETY` checkpoints) contributes its base weight to
        the fused product and its factors to a `RowAdapter` (None where there are none)."""
        attn, mlp = layer.self_attn, layer.mlp
        parts = [_lora_parts(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                           mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        q_, k_, v_, o_, gate, up, down = (lin for lin, _ in parts)
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.n_heads = q_.out_features // attn.head_dim
        self.n_qk = q_.out_features + k_.out_features
        q = quantization
        self.qkv = _fuse(q_, k_, v_, quantization=q)
        self.o = Projection(o_.weight.detach(), _bias(o_), q)
        self.gate_up = _fuse(gate, up, quantization=q)
        # down_proj stays float under int8: its input (SiLU(gate) * up) has outliers that one
        # activation scale per call flattens; see the module docstring.
        self.down = Projection(down.weight.detach(), _bias(down))
        self.qkv_lora, self.o_lora = _row_adapter(*parts[:3]), _row_adapter(parts[3])
        self.gate_up_lora, self.down_lora = _row_adapter(*parts[4:6]), _row_adapter(parts[6])
        self.act = mlp.act_fn
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm

    def __call__(self, x, cos, sin, mask, cache_layer, rows=None):
        """``x (B, q, H)``, ``cos``/``sin`` from `rotary_tables`, ``rows (n,)``: the flattened
        rows the LoRA factors run on (None: none) -> ``(B, q, H)``."""
        B, q, _ = x.shape
        h = rms_norm(self.input_norm, x)
        qkv = _adapt(self.qkv(h), self.qkv_lora, h, rows)
        qk = rotate(qkv[..., :self.n_qk].view(B, q, -1, self.head_dim).transpose(1, 2), cos, sin)
        query, key = qk.split([self.n_heads, qk.shape[1] - self.n_heads], 1)
        value = qkv[..., self.n_qk:].view(B, q, -1, self.head_dim).transpose(1, 2)
        if cache_layer is not None:
            key, value = cache_layer.update(key, value)
        attended = grouped_attention(query, key, value, mask, self.scaling)
        x = _adapt(self.o.plus(attended, x), self.o_lora, attended, rows)
        h = rms_norm(self.post_norm, x)
        gate, up = _adapt(self.gate_up(h), self.gate_up_lora, h, rows).chunk(2, -1)
        act = self.act(gate) * up
        return _adapt(self.down.plus(act, x), self.down_lora, act, rows)


def _adapt(y: torch.Tensor, adapter: RowAdapter | None, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return y if adapter is None or rows is None else adapter.add_to(y, x, rows)


def grouped_attention(query, key, value, mask, scaling: float) -> torch.Tensor:
    """Grouped-query attention with the query heads of a group as extra query rows.

    ``query (B, Hq, q, D)``, ``key``/``value (B, Hkv, kv, D)``, ``mask (B, 1, g*q, kv)`` from
    `grouped_mask` (``g = Hq / Hkv``) -> ``(B, q, Hq*D)``. Each key/value head is read once for
    its ``g`` query heads, where SDPA's ``enable_gqa`` (or transformers' ``repeat_kv``) reads it
    ``g`` times: the same values, and on 2 AVX2 cores 0.5x the attention time of a batch-8 decode
    step with probes, 0.7x at batch 1 (`docs/architecture.md`). Our choice."""
    B, Hq, q, D = query.shape
    rows = query.reshape(B, key.shape[1], -1, D)  # a view: the heads of a group are adjacent
    out = nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=scaling)
    # reshape, not view: CUDA kernels may return ``out`` with other strides (tests/test_cuda.py)
    return out.reshape(B, Hq, q, D).transpose(1, 2).reshape(B, q, Hq * D)


def grouped_mask(mask: torch.Tensor, dtype: torch.dtype, groups: int) -> torch.Tensor:
    """``mask (B, 1, q, kv)`` (bool, True: attend; or additive float) -> the additive float mask
    ``(B, 1, groups*q, kv)`` of `grouped_attention`, built once per forward (SDPA would convert a
    boolean mask in every layer)."""
    if mask.dtype == torch.bool:
        mask = torch.full(mask.shape, float("-inf"), dtype=dtype, device=mask.device).masked_fill_(mask, 0.0)
    return mask.repeat(1, 1, groups, 1)


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm``'s function. In float32 torch's ``rms_norm`` (on CPU the same operations
    and values as the module, without its two casts and Python wrapper); other dtypes run the
    module itself, which computes the variance in float32."""
    if x.dtype != torch.float32:
        return norm(x)
    return nn.functional.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def rotary_tables(rotary: nn.Module, x: torch.Tensor, position_ids: torch.Tensor):
    """``position_ids (B, q)`` -> ``(cos, signed_sin)``, each ``(B, 1, q, D)``, for `rotate`.

    ``signed_sin`` carries `rotate_half`'s minus sign on its first half, so that one ``roll``
    replaces ``rotate_half``'s two slices, negation and concatenation in every layer."""
    cos, sin = rotary(x, position_ids=position_ids)
    half = sin.shape[-1] // 2
    return cos.unsqueeze(1), torch.cat([-sin[..., :half], sin[..., half:]], -1).unsqueeze(1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x (B, heads, q, D)``: transformers' ``x * cos + rotate_half(x) * sin``
    (``rotate_half(x) = cat(-x2, x1)`` = ``roll(x, D/2) * sign``)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def _is_row_lora(module: nn.Module) -> bool:
    """A peft LoRA linear that `RowAdapter` can run: one active adapter, unmerged, plain LoRA
    (no DoRA, no LoRA bias) over a plain ``nn.Linear``."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(module, LoraLinear) or type(module.base_layer) is not nn.Linear or module.merged:
        return False
    names = module.active_adapters
    return len(names) == 1 and not module.use_dora.get(names[0], False) and \
        module.lora_B[names[0]].bias is None


def can_fuse(body: nn.Module, row_adapters: bool = False) -> bool:
    """True when every projection of ``body`` is a plain ``nn.Linear`` (with ``row_adapters``,
    also a peft LoRA linear `RowAdapter` can run; no other wrappers) and its layers are
    Llama-shaped (``LlamaRMSNorm`` norms, no query/key norms)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def plain(m):
        return type(m) is nn.Linear or (row_adapters and _is_row_lora(m))

    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    try:
        return all(plain(getattr(layer.self_attn, n)) for layer in body.layers for n in names) and \
            all(plain(getattr(layer.mlp, n)) for layer in body.layers
                for n in ("gate_proj", "up_proj", "down_proj")) and \
            all(type(norm) is LlamaRMSNorm for layer in body.layers
                for norm in (layer.input_layernorm, layer.post_attention_layernorm)) and \
            type(body.norm) is LlamaRMSNorm and \
            not any(hasattr(layer.self_attn, n) for layer in body.layers for n in ("q_norm", "k_norm"))
    except AttributeError:
        return False


class FusedBody:
    """``LlamaModel``'s forward for serving: ``(inputs_embeds (B, q, H), mask (B, 1, q, kv) bool,
    position_ids (B, q), cache or None, rows (n,) or None) -> hidden (B, q, H)`` after the final
    norm; and `lm_logits` with a prepacked LM head. With ``row_adapters`` the body may hold an
    unmerged LoRA adapter, which runs on the flattened ``rows`` of a forward only
    (`types.LoraRows.SAFETY`; `RowAdapter`).

    Raises:
        ValueError: ``body`` has a projection that is not a plain ``nn.Linear`` (see `can_fuse`),
            or ``quantization`` does not fit the model (see `check_quantization`).
    """

    def __init__(self, body: nn.Module, lm_head: nn.Linear, quantization: Quantization = Quantization.NONE,
                 row_adapters: bool = False):
        if not can_fuse(body, row_adapters):
            raise ValueError("FusedBody needs merged, plain nn.Linear projections (merge LoRA first)")
        q = Quantization(quantization)  # ValueError on an unknown name
        check_quantization(q, lm_head.weight.device, lm_head.weight.dtype)
        self.quantization, self.row_adapters = q, row_adapters
        self.layers = [FusedLayer(layer, q) for layer in body.layers[: body.config.num_hidden_layers]]
        self.norm, self.rotary = body.norm, body.rotary_emb
        self.groups = body.config.num_attention_heads // body.config.num_key_value_heads
        self.lm_head = Projection(lm_head.weight.detach(), _bias(lm_head), q)
        self.compiled = None
        """A `compiled.CompiledStep` that runs the one-row decode steps it accepts, or None
        (`Decoder`'s ``compile``)."""

    def __call__(self, x, mask, position_ids, cache=None, rows=None) -> torch.Tensor:
        cos, sin = rotary_tables(self.rotary, x, position_ids)
        mask = grouped_mask(mask, x.dtype, self.groups)
        if self.compiled is not None and self.compiled.ready(x, cache, rows):
            hidden = self.compiled(x, cos, sin, mask, cache)
            if hidden is not None:  # None: it refused a new graph (`CompiledStep.__call__`)
                return hidden
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache.layers[i] if cache is not None else None, rows)
        return rms_norm(self.norm, x)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., H)`` -> ``(..., V)``."""
        return self.lm_head(hidden)
