"""Benign self-refusal: how often the checkpoint's LM refuses a benign prompt by itself.

Only the safety signal may start a refusal (docs/method.md, "Decision 10: refusals start only
by insertion"), so with the signal off the LM should answer every benign prompt. The prompts are
the benign side of a training config's calibration split (held-back contrast twins; never
trained on, `safety_training.splits`). Greedy decoding, the checkpoint's LoRA with the safety
signal off (the ``sft_only`` system of ``ess eval``); a response is a refusal when
`safety_training.refusals.is_refusal` reads one.

Usage: ``python -m benchmarks.self_refusal [--config checkpoints/smollm2-135m-ess/train.yaml]
[--max-new-tokens 48] [--json PATH]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import CHECKPOINT, load, markdown_table, run_batches, write_json


def calibration_benign(config: str | Path) -> list[str]:
    """The benign queries of ``config``'s calibration split (empty when it holds none back).

    Raises:
        ValueError: as `recipe.load_train_config`.
    """
    from safety_training.recipe import load_train_config, split, training_examples

    cfg = load_train_config(config)
    examples, _ = training_examples(cfg)
    return [e.query for e in split(examples, cfg).calibration if e.query_label == 0]


def self_refusals(decoder, queries: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy answers of ``decoder``'s LM with the safety signal off, one record per query:
    ``{"query", "text", "refused"}``."""
    from safety_decoding.decode import GenerationRequest
    from safety_decoding.policy import SafetyParams
    from safety_decoding.prompt import build_chat_prompt
    from safety_decoding.sampling import SamplingParams
    from safety_training.refusals import is_refusal

    off = SafetyParams.from_config(decoder.model.config, enabled=False)
    reqs = [GenerationRequest(build_chat_prompt(decoder.tok, [{"role": "user", "content": q}]),
                              SamplingParams(max_new_tokens=max_new_tokens), off) for q in queries]
    out = run_batches(decoder, reqs, desc="self-refusal")
    return [{"query": q, "text": text, "refused": is_refusal(text)} for q, (text, _) in zip(queries, out)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", default=str(CHECKPOINT))
    ap.add_argument("--config", default=str(CHECKPOINT / "train.yaml"),
                    help="training config whose calibration split gives the prompts")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", default="benchmarks/results/self_refusal.json")
    args = ap.parse_args()
    queries = calibration_benign(args.config)
    if not queries:
        raise SystemExit(f"--config: {args.config} holds no calibration split back "
                         "(contrast_calibration_percent is 0)")
    decoder, _ = load(Path(args.checkpoint))
    t0 = time.time()
    records = self_refusals(decoder, queries, args.max_new_tokens)
    refused = [r for r in records if r["refused"]]
    rate = len(refused) / len(records)
    print(markdown_table(["set", "n", "self-refused", "rate"],
                         [["calibration benign", len(records), len(refused), f"{rate:.1%}"]]))
    for r in refused:
        print(f"- {r['query'][:90]!r} -> {r['text'][:90]!r}")
    write_json(args.json, {"checkpoint": args.checkpoint, "config": args.config,
                           "max_new_tokens": args.max_new_tokens, "n": len(records),
                           "self_refused": len(refused), "rate": rate,
                           "seconds": round(time.time() - t0, 1), "refused": refused})


if __name__ == "__main__":
    main()
