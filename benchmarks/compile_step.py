"""``torch.compile`` of a decode step against our eager `fused.FusedBody`, on this machine.

gpt-fast's lever: write the decode step with static shapes (a preallocated KV cache written
with ``index_copy_``, attention over every slot under an additive mask) and compile it. On CPU,
inductor fuses the small element-wise operations into generated C++ kernels; with ``freezing``
it also prepacks the weights for oneDNN, and ``max-autotune`` adds AMX micro-GEMM templates.
`StaticStep` is the body's function written that way (the same layers, norms and rotary
arithmetic as `FusedBody`; token rows, no LoRA rows). The benchmark times one decode forward
of the body (``--rows`` 1: a token; 2: the shape of a token and its ``[CLS]`` probe, which with
a merged adapter cost what two token rows do; ``--kv`` slots already filled; `FusedBody`'s
call also crops its cache back, a few microseconds): `FusedBody` eager (the server's),
`StaticStep` eager, and `StaticStep` compiled in each ``--modes`` entry, with each compile's
wall time (cold: no FX graph cache). `tests/test_compile_step.py` checks that `StaticStep`
computes `FusedBody`'s function.

Every forward is timed in the same rounds, in a seeded order per round
(`benchmarks.common.shuffled`: the machine's load moves all of them alike).

Run: ``python -m benchmarks.compile_step [--modes default freezing autotune] [--json PATH]``
(about 5 minutes on 2 cores; each compile takes 20-45 s there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch._dynamo
from torch import nn

from benchmarks.common import load, markdown_table, shuffled, write_json

MODES = {"default": {}, "freezing": {"freezing": True},
         "autotune": {"freezing": True, "max_autotune": True}}
"""Inductor settings per mode name (``torch.compile`` options: ``torch._inductor.config`` fields)."""


class StaticStep(nn.Module):
    """The body's forward over a fixed-size KV cache: ``(x (B, q, H), cos, signed_sin (B, 1, q, D),
    mask (B, 1, g*q, C) additive, keys/values (L, B, Hkv, C, D), slots (q,)) -> (B, q, H)`` after
    the final norm; writes the rows' K/V at ``slots``. Weights are buffers (inductor freezes
    them); the same arithmetic as `fused.FusedLayer` (`fused.rotate`, `fused.grouped_attention`)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        cfg = body.config
        self.n_layers, self.eps = cfg.num_hidden_layers, cfg.rms_norm_eps
        self.hidden, self.head_dim = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        for i, layer in enumerate(body.layers[:self.n_layers]):
            a, m = layer.self_attn, layer.mlp
            weights = {"qkv": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                       "o": a.o_proj.weight, "gate_up": torch.cat([m.gate_proj.weight, m.up_proj.weight]),
                       "down": m.down_proj.weight, "norm_in": layer.input_layernorm.weight,
                       "norm_post": layer.post_attention_layernorm.weight}
            for name, w in weights.items():
                self.register_buffer(f"{name}{i}", w.detach().clone().contiguous())
        self.register_buffer("norm", body.norm.weight.detach().clone())

    def _norm(self, x, weight):  # LlamaRMSNorm: float32 variance, then the weight in x's dtype
        return weight * nn.functional.rms_norm(x.float(), (self.hidden,), None, self.eps).to(x.dtype)

    def forward(self, x, cos, sin, mask, keys, values, slots):
        from safety_decoding.fused import grouped_attention, rotate

        B, q, _ = x.shape
        D, n_qk = self.head_dim, (self.n_heads + self.n_kv) * self.head_dim
        for i in range(self.n_layers):
            w = lambda name: getattr(self, f"{name}{i}")  # noqa: E731
            qkv = self._norm(x, w("norm_in")) @ w("qkv").t()
            qk = rotate(qkv[..., :n_qk].view(B, q, -1, D).transpose(1, 2), cos, sin)
            query, key = qk.split([self.n_heads, self.n_kv], 1)
            keys[i].index_copy_(2, slots, key)
            values[i].index_copy_(2, slots, qkv[..., n_qk:].view(B, q, self.n_kv, D).transpose(1, 2))
            attended = grouped_attention(query, keys[i], values[i], mask, D ** -0.5)
            x = x + attended @ w("o").t()
            gate, up = (self._norm(x, w("norm_post")) @ w("gate_up").t()).chunk(2, -1)
            x = x + (nn.functional.silu(gate) * up) @ w("down").t()
        return self._norm(x, self.norm)


def static_inputs(step: StaticStep, rows: int, kv: int, capacity: int, dtype: torch.dtype):
    """Random inputs of one decode forward of ``rows`` rows after ``kv`` filled slots."""
    g, D = step.n_heads // step.n_kv, step.head_dim
    mask = torch.zeros(1, 1, g * rows, capacity, dtype=dtype)
    mask[..., kv + rows:] = float("-inf")
    cache = torch.randn(step.n_layers, 1, step.n_kv, capacity, D, dtype=dtype)
    return (torch.randn(1, rows, step.hidden, dtype=dtype), torch.randn(1, 1, rows, D, dtype=dtype),
            torch.randn(1, 1, rows, D, dtype=dtype), mask, cache, cache.clone(), torch.arange(kv, kv + rows))


def median_ms(fn, repeats: int) -> float:
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 2)


def fused_forward(decoder, rows: int, kv: int):
    """`FusedBody`'s decode forward of ``rows`` rows after a prefill of ``kv`` slots (a callable)."""
    from safety_decoding.kv_cache import SlotCache

    model = decoder.model
    body, cfg = model.fused, model.decoder.config
    dtype = next(model.parameters()).dtype
    cache = SlotCache(cfg)
    with torch.inference_mode():
        body(torch.randn(1, kv, cfg.hidden_size, dtype=dtype), torch.ones(1, 1, kv, kv, dtype=torch.bool).tril(),
             torch.arange(kv)[None], cache)
    x = torch.randn(1, rows, cfg.hidden_size, dtype=dtype)
    mask, positions = torch.ones(1, 1, rows, kv + rows, dtype=torch.bool), torch.arange(kv, kv + rows)[None]

    def forward():
        for layer in cache.layers:
            layer.crop(-(layer.get_seq_length() - kv))
        body(x, mask, positions, cache)
    return forward


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compile_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kv", type=int, default=300, help="filled KV slots (default 300)")
    ap.add_argument("--capacity", type=int, default=512, help="static KV cache slots (default 512)")
    ap.add_argument("--rounds", type=int, default=10, help="timing rounds, forwards in a seeded order each")
    ap.add_argument("--repeats", type=int, default=5, help="calls per forward per round")
    ap.add_argument("--json", default="benchmarks/results/compile_step.json")
    args = ap.parse_args(argv)

    import torch._inductor.config as inductor

    decoder, _ = load()
    if decoder.model.fused is None:
        raise SystemExit("the fused forward is off for this checkpoint: nothing to compare with")
    dtype = next(decoder.model.parameters()).dtype
    step = StaticStep(decoder.model.decoder).eval()
    inputs = {r: static_inputs(step, r, args.kv, args.capacity, dtype) for r in args.rows}
    # Every forward is built (and compiled) first, then all are timed in the same rounds, so a
    # change in the machine's load lands on all of them alike.
    rows = {("FusedBody eager", r): {"call": fused_forward(decoder, r, args.kv)} for r in args.rows}
    rows |= {("static eager", r): {"call": lambda r=r: step(*inputs[r])} for r in args.rows}
    for mode in args.modes:
        # Options make each mode its own backend (dynamo keeps one compiled entry per backend),
        # and the same settings hold globally while it compiles: freezing is decided when dynamo
        # traces, before options apply. No FX graph cache: the compile time is a cold start's.
        settings = {**MODES[mode], "fx_graph_cache": False}
        compiled = torch.compile(step, dynamic=False, options=settings)
        with inductor.patch(settings):
            for r in args.rows:
                t = time.perf_counter()
                with torch.inference_mode():
                    compiled(*inputs[r])  # the first call compiles
                rows[(f"static compiled ({mode})", r)] = {"call": lambda c=compiled, r=r: c(*inputs[r]),
                                                         "compile_s": round(time.perf_counter() - t, 1)}
        print(f"  {mode}: compiled", file=sys.stderr)
    keys = list(rows)
    times = {key: [] for key in keys}
    for round_ in range(args.rounds):
        for i in shuffled(len(keys), round_):
            times[keys[i]].append(median_ms(rows[keys[i]]["call"], args.repeats))
    results = []
    for (name, r), row in rows.items():
        ms = round(statistics.median(times[(name, r)]), 2)
        results.append({"forward": name, "rows": r, "ms": ms,
                        "x_fused": round(statistics.median(times[("FusedBody eager", r)]) / ms, 2),
                        **{k: v for k, v in row.items() if k != "call"}})
    out = {"dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "kv": args.kv,
           "capacity": args.capacity, "rounds": args.rounds, "repeats": args.repeats, "results": results}
    print(markdown_table(["forward", "rows", "ms", "speed x FusedBody", "compile s"],
                         [[r["forward"], r["rows"], r["ms"], r["x_fused"], r.get("compile_s", "-")]
                          for r in results]))
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
