"""Where a decode step's time goes: ``python -m benchmarks.step_profile [--batch 1 8] [--json PATH]``.

Runs the shipped checkpoint in process (`Decoder`, no HTTP), ``batch`` identical requests with a
prompt of about ``--prompt-tokens`` tokens, greedy, ``ignore_eos``, safety ``each`` and off;
after warm-up steps it times decode steps, then profiles more of them with ``torch.profiler``
and splits the mean step into: matrix products (oneDNN's linear, or ``aten::addmm``/``mm``
without packing), attention (SDPA), every other torch operation, and the rest (Python: the
loop, the layers' code, sampling, detokenizing). Prints a table (milliseconds per step) and the
top operations, and writes JSON. The profiler adds its own cost to the torch part, so the
split is a guide, and ``step ms`` is measured without it.
"""

from __future__ import annotations

import argparse

from benchmarks.common import load, markdown_table, timed_batch, write_json
from safety_decoding.types import Quantization

PRODUCTS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear", "quantized::linear_dynamic")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
             "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention")


def split(events, steps: int, step_ms: float) -> dict:
    """Milliseconds per step by kind, from profiler ``key_averages`` (self CPU time)."""
    by = {"products": 0.0, "attention": 0.0, "other_ops": 0.0}
    for e in events:
        kind = "products" if e.key in PRODUCTS else "attention" if e.key in ATTENTION else "other_ops"
        by[kind] += e.self_cpu_time_total / 1000 / steps
    by = {k: round(v, 2) for k, v in by.items()}  # 2 places: a tiny model's attention is under 0.05 ms
    by["python_and_rest"] = round(max(0.0, step_ms - sum(by.values())), 2)
    return by


def run(decoder, batch: int, prompt_tokens: int, safety_on: bool, steps: int) -> tuple[dict, list]:
    from torch.profiler import ProfilerActivity, profile

    from safety_decoding.policy import SafetyParams

    safety = SafetyParams.from_config(decoder.model.config, enabled=safety_on)
    batch_, step_ms, n_prompt = timed_batch(decoder, batch, prompt_tokens, safety, steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            batch_.step()
    events = prof.key_averages()
    row = {"batch": batch, "safety": "each" if safety_on else "off", "prompt_tokens": n_prompt,
           "step_ms": round(step_ms, 1)} | split(events, steps, step_ms)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return row, [(e.key, round(e.self_cpu_time_total / 1000 / steps, 2), e.count // steps) for e in top]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default="none", choices=Quantization.values(),
                    help="ESS_QUANTIZATION of the profiled model (default none)")
    ap.add_argument("--json", default="benchmarks/results/step_profile.json")
    args = ap.parse_args(argv)
    decoder, _ = load(dtype=args.dtype, quantization=args.quantization)
    rows, tops = [], {}
    for batch in args.batch:
        for safety_on in (True, False):
            row, top = run(decoder, batch, args.prompt_tokens, safety_on, args.steps)
            rows.append(row)
            tops[f"{row['safety']}-{batch}"] = top
    cols = ["batch", "safety", "prompt_tokens", "step_ms", "products", "attention", "other_ops", "python_and_rest"]
    print(markdown_table(cols, [[r[c] for c in cols] for r in rows]))
    for name, top in tops.items():
        print(f"\n{name}: top operations (ms per step, calls per step)")
        print(markdown_table(["operation", "ms", "calls"], [list(t) for t in top]))
    out = {"dtype": str(next(decoder.model.parameters()).dtype).removeprefix("torch."),
           "quantization": args.quantization,
           "steps": args.steps, "results": rows, "top_operations": tops}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
