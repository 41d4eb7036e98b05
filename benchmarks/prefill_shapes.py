"""What a prompt length never seen before costs a prefill, with and without bucketing.

On CPU, oneDNN (the products) and the attention kernel build a primitive for each new shape and
cache it, so the first prefill of a length runs slower than the next one of the same length. The
decoder left-pads a prefill to a multiple of `decode.Decoder.prefill_bucket` columns
(`decode.PREFILL_BUCKET`), so that a few dozen shapes cover every prompt. This benchmark times
``DecodeBatch.add`` (the prefill with the query verdict and the first token, as a request at
concurrency 1 runs it) over ShareGPT prompts of many lengths: each prompt first when its shape
may be new, then again when it is not, for each ``--buckets`` value. Each value runs in its own
process (a fresh primitive cache), the values alternating over ``--rounds``.

Run: ``python -m benchmarks.prefill_shapes [--buckets 1 16] [--prompts 48] [--json PATH]``
(about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from benchmarks.common import markdown_table, write_json


def worker(bucket: int, prompts: int, seed: int, dtype: str) -> dict:
    """Prefill seconds of each prompt, first and repeated, with ``bucket`` (in this process)."""
    from benchmarks.common import load
    from benchmarks.serving import workload
    from safety_decoding.decode import GenerationRequest
    from safety_decoding.layout import round_up
    from safety_decoding.policy import SafetyParams
    from safety_decoding.prompt import build_chat_prompt
    from safety_decoding.sampling import SamplingParams

    decoder, tok = load(dtype=dtype)
    decoder.prefill_bucket = bucket
    safety = SafetyParams.from_config(decoder.model.config)
    texts = ["Hello"] + [p for p, _ in workload(tok, prompts, 512, 2, seed)]
    requests = [GenerationRequest(build_chat_prompt(tok, [{"role": "user", "content": t}]),
                                  SamplingParams(max_new_tokens=1), safety) for t in texts]

    def timed(req) -> float:
        batch = decoder.new_batch()
        t = time.perf_counter()
        batch.add([req])
        return time.perf_counter() - t

    first = [timed(r) for r in requests][1:]  # the first prompt is a warm-up
    again = [timed(r) for r in requests][1:]
    lengths = [1 + len(r.prompt.ids) for r in requests[1:]]  # [CLS] and the prompt
    return {"bucket": bucket, "first": first, "again": again, "distinct_lengths": len(set(lengths)),
            "padding": statistics.mean(round_up(n, bucket) - n for n in lengths)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prefill_shapes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--buckets", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1, help="workload seed (ess bench peer uses 0)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", default="benchmarks/results/prefill_shapes.json")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.prompts, args.seed, args.dtype)))
        return {}

    runs = {b: [] for b in args.buckets}
    for round_ in range(args.rounds):
        for b in args.buckets if round_ % 2 == 0 else args.buckets[::-1]:
            cmd = [sys.executable, "-m", "benchmarks.prefill_shapes", "--worker", str(b), "--prompts",
                   str(args.prompts), "--seed", str(args.seed), "--dtype", args.dtype]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[b].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  bucket {b}: round {round_ + 1} done", file=sys.stderr)
    results = []
    for b, rs in runs.items():
        first = statistics.median(t for r in rs for t in r["first"])
        again = statistics.median(t for r in rs for t in r["again"])
        results.append({"bucket": b, "prefill_first_p50_ms": round(first * 1e3, 1),
                        "prefill_again_p50_ms": round(again * 1e3, 1), "first_over_again": round(first / again, 2),
                        "distinct_lengths": rs[0]["distinct_lengths"], "mean_padding_columns": round(rs[0]["padding"], 1)})
    base = next((r for r in results if r["bucket"] == 1), None)
    for r in results:
        r["first_x_no_bucket"] = round(base["prefill_first_p50_ms"] / r["prefill_first_p50_ms"], 2) if base else None
    out = {"prompts": args.prompts, "rounds": args.rounds, "seed": args.seed, "dtype": args.dtype, "results": results}
    print(markdown_table(["bucket", "prefill p50, length first seen (ms)", "p50, seen before (ms)", "first / seen",
                          "speed first seen x bucket 1", "distinct lengths", "mean padding columns"],
                         [[r["bucket"], r["prefill_first_p50_ms"], r["prefill_again_p50_ms"], r["first_over_again"],
                           r["first_x_no_bucket"], r["distinct_lengths"], r["mean_padding_columns"]] for r in results]))
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
