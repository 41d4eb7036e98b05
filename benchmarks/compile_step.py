"""``torch.compile`` of a decode step against our eager `fused.FusedBody`, on this machine.

gpt-fast's lever: write the decode step for the compiler and compile it. On CPU, inductor fuses
the small element-wise operations into generated C++ kernels; with ``freezing`` it also
prepacks the weights, and ``max-autotune`` adds AMX micro-GEMM templates. The graph is the
server's, `compiled.StepGraph` (K/V written into the cache buffers, attention over the used
slots; the KV length and capacity marked dynamic as `compiled.CompiledStep` marks them). The
benchmark times one decode forward of the body (``--rows`` 1: a token; 2: a token and its
``[CLS]`` probe; ``--kv`` slots already filled; `FusedBody`'s call also crops its cache back, a
few microseconds): `FusedBody` eager (``ESS_COMPILE=false``), `StepGraph` eager, and
`StepGraph` compiled in each ``--modes`` entry (``served`` is what ``ESS_COMPILE=true``
runs), with each compile's wall time (cold: no FX graph cache).

Every forward is timed in the same rounds, in a seeded order per round
(`benchmarks.common.shuffled`: the machine's load moves all of them alike).

``--weights bfloat16`` adds the compiled graphs with `StepGraph`'s weights in bfloat16 (half the
bytes a step reads; each product's input cast to bfloat16), for CPUs that run float32.

Run: ``python -m benchmarks.compile_step [--modes default freezing autotune served]
[--weights model bfloat16] [--json PATH]`` (about 8 minutes on 2 cores with AMX, each compile
20-60 s there; 150-170 s a compile on 2 AVX2-only cores).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch

from benchmarks.common import load, markdown_table, shuffled, write_json
from safety_decoding.compiled import StepGraph, inductor_options, mark_dynamic
from safety_decoding.device import cpu_has_amx

MODES = {"default": {}, "freezing": {"freezing": True},
         "autotune": {"freezing": True, "max_autotune": True}, "served": None}
"""Inductor settings per mode name (``torch.compile`` options: ``torch._inductor.config`` fields);
``served`` (None here) is what ``ESS_COMPILE=true`` runs on this machine and dtype
(`compiled.inductor_options`: ``cpp_wrapper`` added, and ``autotune`` or ``freezing``)."""
WEIGHTS = {"model": None, "bfloat16": torch.bfloat16}
"""``--weights``: `StepGraph`'s ``weight_dtype`` per name (None: the model's)."""


def graph_inputs(graph: StepGraph, rows: int, kv: int, capacity: int, dtype: torch.dtype):
    """Random inputs of one decode forward of ``rows`` rows after ``kv`` filled slots of
    ``capacity`` (each call writes the same slots again)."""
    g, D = graph.n_heads // graph.n_kv, graph.head_dim
    with torch.inference_mode():  # the server's steps run on inference tensors
        buffers = [torch.randn(1, graph.n_kv, capacity, D, dtype=dtype) for _ in range(2 * graph.n_layers)]
        mask = torch.zeros(1, 1, g * rows, kv + rows, dtype=dtype)
        mark_dynamic(mask, buffers)
        return (torch.randn(1, rows, graph.hidden, dtype=dtype), torch.randn(1, 1, rows, D, dtype=dtype),
                torch.randn(1, 1, rows, D, dtype=dtype), mask, buffers[:graph.n_layers], buffers[graph.n_layers:])


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
    ap.add_argument("--weights", nargs="+", choices=list(WEIGHTS), default=["model"],
                    help="compiled StepGraph's projection weights: the model's dtype (default), "
                         "and/or bfloat16 (activations cast to bfloat16 for each product, results "
                         "cast back)")
    ap.add_argument("--json", default="benchmarks/results/compile_step.json")
    args = ap.parse_args(argv)

    import torch._inductor.config as inductor

    decoder, _ = load()
    if decoder.model.fused is None:
        raise SystemExit("the fused forward is off for this checkpoint: nothing to compare with")
    dtype = next(decoder.model.parameters()).dtype
    step = StepGraph(decoder.model.decoder).eval()
    inputs = {r: graph_inputs(step, r, args.kv, args.capacity, dtype) for r in args.rows}
    # Every forward is built (and compiled) first, then all are timed in the same rounds, so a
    # change in the machine's load lands on all of them alike.
    rows = {("FusedBody eager", r): {"call": fused_forward(decoder, r, args.kv)} for r in args.rows}
    rows |= {("StepGraph eager", r): {"call": lambda r=r: step(*inputs[r])} for r in args.rows}
    for mode, weights in itertools.product(args.modes, args.weights):
        # A graph module per mode: dynamo guards on the module, and with one module a later mode
        # was served an earlier mode's graph (session 28: "served" timed, 0.0 s to compile).
        graph = StepGraph(decoder.model.decoder, WEIGHTS[weights]).eval()
        name = mode if weights == "model" else f"{mode}, {weights} weights"
        # Options make each mode its own backend (dynamo keeps one compiled entry per backend),
        # and the same settings hold globally while it compiles: freezing is decided when dynamo
        # traces, before options apply. No FX graph cache: the compile time is a cold start's.
        options = inductor_options(dtype, cpu_has_amx()) if mode == "served" else MODES[mode]
        settings = {**options, "fx_graph_cache": False}
        compiled = torch.compile(graph, dynamic=False, options=settings)
        with inductor.patch(settings):
            for r in args.rows:
                t = time.perf_counter()
                with torch.inference_mode():
                    compiled(*inputs[r])  # the first call compiles
                rows[(f"StepGraph compiled ({name})", r)] = {"call": lambda c=compiled, r=r: c(*inputs[r]),
                                                         "compile_s": round(time.perf_counter() - t, 1)}
        print(f"  {name}: compiled", file=sys.stderr)
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
           "capacity": args.capacity, "rounds": args.rounds, "repeats": args.repeats,
           "served_options": inductor_options(dtype, cpu_has_amx()), "results": results}
    print(markdown_table(["forward", "rows", "ms", "speed x FusedBody", "compile s"],
                         [[r["forward"], r["rows"], r["ms"], r["x_fused"], r.get("compile_s", "-")]
                          for r in results]))
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
