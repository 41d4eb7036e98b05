"""A compiled decode forward: the body's function for one row, compiled by inductor on CPU.

gpt-fast's lever (``torch.compile`` of the decode step) in the form that pays on a 2-core CPU
with AMX (`benchmarks.compile_step`): inductor with weight ``freezing`` (weights become constants,
prepacked once) and, with AMX or in float32, ``max_autotune`` (its micro-GEMM templates;
`inductor_options`). Inductor also fuses the norms, the rotary arithmetic and the residual adds
into generated C++ kernels. The shapes the graph is compiled for are the batch (one row) and
the rows per step (``q``: 1, a token; 2, a token and its ``[CLS]`` probe). The KV length is a
dynamic dimension: the graph reads the `kv_cache.SlotCache` buffers as they are (any capacity),
writes the step's K/V at the slots after the used ones and attends over the used slots, so a
generation never recompiles.

Larger batches, prefills (a chunk of 1 or 2 columns for one row excepted: the graph computes any
rows appended to a cache), LoRA rows on the safety rows only, CUDA and int8 run `FusedBody`'s
eager forward: at 8 rows and more the products already cost about what one row does on AMX
(``ess bench peer``: concurrency 8 runs at 1.7x llama.cpp), while at one row the step is
bound by its ~1,500 small eager operations. Our choice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from torch import nn

from .device import cpu_has_amx
from .fused import concat_bias, grouped_attention, rotate
from .kv_cache import SlotCache

log = logging.getLogger(__name__)

INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "cpp_wrapper": True}
"""``torch._inductor.config`` fields the graph compiles with where `inductor_options` keeps
``max_autotune``. With AMX (bfloat16) one forward of the body runs 1.79-1.88x as fast as
`FusedBody`'s eager one with all three, 1.78-1.81x without ``cpp_wrapper``, 1.28-1.34x with
``freezing`` alone and 0.94-1.0x with none (`benchmarks.compile_step`,
`benchmarks/results/compile_step.json`); on AVX2 in float32, 2.1-2.3x
(`compile_step-s21-avx2-weights.json`). ``cpp_wrapper`` runs the whole graph as one C++ call
that releases the GIL (the Python wrapper holds it through each kernel), so the event loop's
thread streams frames while a step runs; it adds about 10 s of compiling per rows count.
Inductor's FX graph cache cannot keep these graphs ("mkldnn tensors unpickleable": the packed
weights of the GEMM templates), so every process compiles anew."""


def inductor_options(dtype: torch.dtype, amx: bool) -> dict[str, bool]:
    """The inductor options for a graph of ``dtype`` on a CPU with (``amx``) or without AMX.

    `INDUCTOR_OPTIONS`, less ``max_autotune`` for bfloat16 and float16 without AMX: there its
    micro-GEMM templates run slower than oneDNN's packed products that ``freezing`` keeps (2 AMD
    EPYC Zen 5 cores with AVX512-BF16, session 28: autotuned 0.71-0.86x `FusedBody`'s eager
    forward, ``freezing`` alone 1.13-1.26x; `benchmarks/results/compile_step-s28-zen5*.json`).
    Measured, our choice."""
    if dtype in (torch.bfloat16, torch.float16) and not amx:
        return {**INDUCTOR_OPTIONS, "max_autotune": False}
    return dict(INDUCTOR_OPTIONS)


RECOMPILE_REFUSED = "Detected recompile"
"""How torch's ``fail_on_recompile`` stance words its refusal (`CompiledStep.__call__`)."""

ROWS = (1, 2)
"""Rows per step the graph is compiled for: a token, and a token with its ``[CLS]`` probe."""


class StepGraph(nn.Module):
    """The body's decode forward over `SlotCache` buffers (what inductor compiles).

    ``forward(x (B, q, H), cos, signed_sin (B, 1, q, D) from `fused.rotary_tables`, mask
    (B, 1, g*q, n) additive from `fused.grouped_mask`, keys, values: per layer (B, Hkv, C, D)
    buffers with C >= n) -> hidden (B, q, H)`` after the final norm. The step's rows take the
    slots ``n - q .. n - 1``; their K/V are written there in place. Weights are buffers, so that
    ``freezing`` folds them. The arithmetic is `fused.FusedLayer`'s (transformers' RMSNorm:
    variance in float32, the weight in the input's dtype; `fused.rotate`;
    `fused.grouped_attention`; projection biases and the config's MLP activation where the model
    has them).

    ``weight_dtype`` (None: the model's) stores the projection weights in another dtype, each
    product's input cast to it and its result cast back: `benchmarks.compile_step`'s
    ``--weights bfloat16``, which halves the bytes a step reads. Measured, not served (2 AVX2
    cores, float32: a step 1.13-1.18x as fast; docs/architecture.md, "The KV cache and slot layout").
    """

    def __init__(self, body: nn.Module, weight_dtype: torch.dtype | None = None):
        super().__init__()
        cfg = body.config
        self.n_layers, self.eps = cfg.num_hidden_layers, cfg.rms_norm_eps
        self.hidden = cfg.hidden_size
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.scaling = body.layers[0].self_attn.scaling
        self.act = body.layers[0].mlp.act_fn  # transformers builds every layer's from config.hidden_act
        for i, layer in enumerate(body.layers[:self.n_layers]):
            a, m = layer.self_attn, layer.mlp
            projections = {"qkv": (a.q_proj, a.k_proj, a.v_proj), "o": (a.o_proj,),
                           "gate_up": (m.gate_proj, m.up_proj), "down": (m.down_proj,)}
            for name, linears in projections.items():
                weight = torch.cat([lin.weight.detach() for lin in linears]).to(weight_dtype or linears[0].weight.dtype)
                self.register_buffer(f"{name}{i}", weight.contiguous(), persistent=False)
                self.register_buffer(f"{name}_bias{i}", concat_bias(*linears), persistent=False)  # None: no bias
            self.register_buffer(f"norm_in{i}", layer.input_layernorm.weight.detach(), persistent=False)
            self.register_buffer(f"norm_post{i}", layer.post_attention_layernorm.weight.detach(), persistent=False)
        self.register_buffer("norm", body.norm.weight.detach(), persistent=False)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * nn.functional.rms_norm(x.float(), (self.hidden,), None, self.eps).to(x.dtype)

    def _project(self, x: torch.Tensor, name: str, i: int) -> torch.Tensor:
        bias, weight = getattr(self, f"{name}_bias{i}"), getattr(self, f"{name}{i}")
        y = (x.to(weight.dtype) @ weight.t()).to(x.dtype)
        return y if bias is None else y + bias

    def forward(self, x, cos, sin, mask, keys: list[torch.Tensor], values: list[torch.Tensor]):
        B, q, _ = x.shape
        D, n = self.head_dim, mask.shape[-1]
        n_qk = (self.n_heads + self.n_kv) * D
        slots = torch.arange(n - q, n, device=x.device)
        for i in range(self.n_layers):
            qkv = self._project(self._norm(x, getattr(self, f"norm_in{i}")), "qkv", i)
            qk = rotate(qkv[..., :n_qk].view(B, q, -1, D).transpose(1, 2), cos, sin)
            query, key = qk.split([self.n_heads, self.n_kv], 1)
            keys[i].index_copy_(2, slots, key)
            values[i].index_copy_(2, slots, qkv[..., n_qk:].view(B, q, self.n_kv, D).transpose(1, 2))
            attended = grouped_attention(query, keys[i][:, :, :n], values[i][:, :, :n], mask, self.scaling)
            x = x + self._project(attended, "o", i)
            gate, up = self._project(self._norm(x, getattr(self, f"norm_post{i}")), "gate_up", i).chunk(2, -1)
            x = x + self._project(self.act(gate) * up, "down", i)
        return self._norm(x, self.norm)


def mark_dynamic(mask: torch.Tensor, buffers: list[torch.Tensor]) -> None:
    """Mark the dimensions a decode step's graph takes as dynamic: the KV length (``mask``'s
    last) and the capacity of the K/V ``buffers`` (their third)."""
    torch._dynamo.mark_dynamic(mask, 3)
    for b in buffers:
        torch._dynamo.mark_dynamic(b, 2)


class CompiledStep:
    """`StepGraph` compiled for one-row decode steps (`ROWS`), called by `fused.FusedBody`.

    Compiling takes about 55 s per rows count on 2 cores (inductor generates, autotunes and
    builds C++ with the system's compiler); the first forward `ready` accepts compiles every
    count of `ROWS` (in the server, its warm-up request).

    Raises (``__init__``):
        ValueError: the body is not on a CPU (CUDA runs the eager forward; our choice until a GPU
            path is measured).
    """

    def __init__(self, body: nn.Module):
        device = next(body.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"the compiled decode step runs on CPU only, the model is on {device}")
        self.graph = StepGraph(body).eval()
        self.options = inductor_options(self.graph.norm.dtype, cpu_has_amx())
        """What inductor compiles with on this machine (`inductor_options`)."""
        self.fn = torch.compile(self.graph, dynamic=False, options=self.options)
        self.compile_seconds: dict[int, float] = {}
        """Seconds each rows count took to compile (`warm_up`); empty before."""
        self.failure: str | None = None
        """Why compiling failed (every step then runs eager), or None."""

    def ready(self, x: torch.Tensor, cache, rows) -> bool:
        """Whether a forward of ``x (B, q, H)`` on ``cache`` with LoRA ``rows`` runs compiled:
        one row of `ROWS` rows after a filled `SlotCache`, no LoRA rows, inference tensors
        (``torch.inference_mode``, as `decode.DecodeBatch.step` runs: the graph is compiled for
        them, and other tensors would compile it again), and a graph that compiled. The first
        forward that qualifies compiles every count of `ROWS` (`warm_up`); a failure to compile
        (no C++ compiler, for one) is logged once and leaves every step eager."""
        if not (x.shape[0] == 1 and x.shape[1] in ROWS and rows is None and isinstance(cache, SlotCache)
                and cache.get_seq_length() > 0 and x.is_inference() and cache.layers[0].keys.is_inference()):
            return False
        if not self.compile_seconds and self.failure is None:
            try:
                self.warm_up()
            except Exception as exc:  # inductor raises many types; any of them means eager
                self.failure = f"{type(exc).__name__}: {exc}"
                log.warning("the decode step did not compile, every step runs eager: %s", self.failure)
        return self.failure is None

    def __call__(self, x, cos, sin, mask, cache: SlotCache) -> torch.Tensor | None:
        """`StepGraph`'s forward on ``cache``'s buffers (a forward `ready` accepted); ``cache``
        then holds the step's slots. None: the inputs needed a new graph, which is refused (see
        below; logged, and every later step runs eager, as after a failed compile); the caller
        runs the eager forward, ``cache`` untouched.

        Dynamo reads inductor's ``freezing`` when it traces, so a graph traced outside
        `warm_up`'s ``inductor.patch(self.options)`` would lose the packed weights, after
        about a minute of compiling on the engine thread. `ready`'s conditions and the dynamic
        KV dimensions leave nothing to recompile (tests/test_compiled.py), and the call runs
        under ``fail_on_recompile`` in case something does. Not patching the options around
        every call saved about 0.2 ms of a decode step (0.9-1.3 ms a call in a bare loop) on 2
        cores with AMX; the stance costs nothing measurable (session 18)."""
        # One spare slot: the graph is compiled for buffers longer than the slots it reads (dynamo
        # guards on it), so a buffer filled to the last slot would compile it again.
        keys, values = cache.reserve(x.shape[1] + 1)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                hidden = self.fn(x, cos, sin, mask, keys, values)
        except RuntimeError as exc:
            if not str(exc).startswith(RECOMPILE_REFUSED):
                raise
            self.failure = f"a decode step needed a new graph: {str(exc).splitlines()[0]}"
            log.warning("%s; every step runs eager from now on", self.failure)
            return None
        cache.advance(x.shape[1])
        return hidden

    def warm_up(self, rows: Iterable[int] = ROWS) -> dict[int, float]:
        """Compile for each rows count now (`compile_seconds`).

        The KV length and capacity are marked dynamic, and given distinct sizes here (dynamo
        would otherwise take equal sizes for one symbol)."""
        import torch._inductor.config as inductor

        g = self.graph
        dtype = g.norm.dtype
        with torch.inference_mode():
            for q in rows:
                t = time.perf_counter()
                x = torch.zeros(1, q, g.hidden, dtype=dtype)
                cos, sin = (torch.ones(1, 1, q, g.head_dim, dtype=dtype) for _ in range(2))  # not aliased
                mask = torch.zeros(1, 1, g.n_heads // g.n_kv * q, 37, dtype=dtype)
                buffers = [torch.zeros(1, g.n_kv, 101, g.head_dim, dtype=dtype) for _ in range(2 * g.n_layers)]
                mark_dynamic(mask, buffers)
                with inductor.patch(self.options):
                    self.fn(x, cos, sin, mask, buffers[:g.n_layers], buffers[g.n_layers:])
                self.compile_seconds[q] = round(time.perf_counter() - t, 1)
                log.info("compiled the decode step for %d row(s) in %.1f s", q, self.compile_seconds[q])
        return self.compile_seconds
