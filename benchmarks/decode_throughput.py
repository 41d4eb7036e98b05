"""Decode tokens/s with the safety check on (probe row in every decode step) and off.

One run, interleaved: for each prompt and repetition, plain decoding (no ``[CLS]``, no checks)
and ``each`` + ``refuse`` run back to back, so machine noise hits both alike. Batch size 1,
greedy, ``ignore_eos`` so both generate exactly ``--new-tokens`` tokens.

Usage: ``python benchmarks/decode_throughput.py [--new-tokens 128] [--reps 3] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import load

from safety_decoding.decode import GenerationRequest
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import build_chat_prompt
from safety_decoding.sampling import SamplingParams

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "Give me a packing list for a three-day hiking trip in the mountains.",
    "What are the main differences between Python lists and tuples?",
]
CONFIGS = {"plain": SafetyParams(enabled=False), "ess": SafetyParams(schedule="each", action="refuse")}


def timed_run(decoder, prompt, sampling, safety) -> dict:
    t0 = time.perf_counter()
    first = None
    n = 0
    for step in decoder.generate([GenerationRequest(prompt, sampling, safety)]):
        for e in step:
            n += len(e.tokens)
            if first is None and e.tokens:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"tokens": n, "ttft": first - t0, "decode_seconds": end - first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="benchmarks/results/decode_throughput.json")
    args = ap.parse_args()
    decoder, tok = load()
    sampling = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    prompts = [build_chat_prompt(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    timed_run(decoder, prompts[0], SamplingParams(max_new_tokens=8), CONFIGS["ess"])  # warm-up
    runs = {k: [] for k in CONFIGS}
    for _ in range(args.reps):
        for p in prompts:
            for name, safety in CONFIGS.items():
                runs[name].append(timed_run(decoder, p, sampling, safety))
    results = []
    for name, rs in runs.items():
        tps = sum(r["tokens"] - 1 for r in rs) / sum(r["decode_seconds"] for r in rs)
        results.append({"system": name, "schedule": "each" if name == "ess" else None,
                        "action": "refuse" if name == "ess" else None,
                        "tokens_per_second": round(tps, 2),
                        "ttft_seconds": round(statistics.median(r["ttft"] for r in rs), 4),
                        "runs": len(rs)})
    plain = results[0]["tokens_per_second"]
    for r in results:
        r["overhead_ratio"] = round(plain / r["tokens_per_second"], 4)
    print("\n| system | schedule | tokens/s | overhead ratio (time vs plain) | TTFT p50 (s) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['system']} | {r['schedule'] or '-'} | {r['tokens_per_second']:.1f} | "
              f"{r['overhead_ratio']:.3f} | {r['ttft_seconds']:.3f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"new_tokens": args.new_tokens, "batch_size": 1,
                                           "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
