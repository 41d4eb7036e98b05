"""What a `lora_rows: safety` checkpoint's adapter costs a decode step (`fused.RowAdapter`).

``python -m benchmarks.adapter_cost --checkpoint DIR [--reps 4] [--json PATH]``

Loads the shipped checkpoint (adapter merged) and ``DIR`` (adapter on the safety rows only), in
float32 and int8, and times decode steps of ``batch`` identical requests (a prompt of about 300
tokens, greedy, ``ignore_eos``), safety ``each`` with the action ``monitor`` (every check runs,
none acts) and safety off; the runs are interleaved ``--reps`` times. Prints the median step
milliseconds and the ratio of ``DIR``'s ``each`` step to the shipped one's, and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.common import CHECKPOINT, load, markdown_table, timed_batch, write_json


def step_ms(decoder, batch: int, safety_on: bool, steps: int = 12) -> float:
    from safety_decoding.policy import SafetyParams

    safety = SafetyParams.from_config(decoder.model.config, enabled=safety_on, action="monitor")
    return timed_batch(decoder, batch, 300, safety, steps)[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a lora_rows: safety checkpoint")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--json", default="benchmarks/results/adapter_cost.json")
    args = ap.parse_args(argv)
    times: dict[tuple, list[float]] = {}
    for quant in ("none", "int8"):
        decoders = {"shipped": load(CHECKPOINT, dtype="float32", quantization=quant)[0],
                    "rows": load(Path(args.checkpoint), dtype="float32", quantization=quant)[0]}
        for _ in range(args.reps):
            for name, decoder in decoders.items():
                for batch in args.batch:
                    for on in (True, False):
                        times.setdefault((quant, batch, name, on), []).append(step_ms(decoder, batch, on))
    med = {k: round(statistics.median(v), 1) for k, v in times.items()}
    rows = [[q, b, med[q, b, "shipped", True], med[q, b, "rows", True], med[q, b, "shipped", False],
             med[q, b, "rows", False], round(med[q, b, "rows", True] / med[q, b, "shipped", True], 2)]
            for q in ("none", "int8") for b in args.batch]
    print(markdown_table(["quantization", "batch", "shipped each ms", "rows each ms", "shipped off ms",
                          "rows off ms", "each ratio"], rows))
    out = {"checkpoint": args.checkpoint, "reps": args.reps,
           "median_step_ms": [{"quantization": q, "batch": b, "checkpoint": n, "safety": "each" if on else "off",
                               "ms": v} for (q, b, n, on), v in med.items()]}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
