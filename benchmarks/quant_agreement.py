"""How much int8 weights (``ESS_QUANTIZATION=int8``) change the head's query verdicts.

Scores both sides of every contrast pair of a folder (chat and raw form, `pair_scores`) with
the fused forward in float32 and in int8 (`safety_decoding.fused`), on the same checkpoint, and
reports per form: `pair_scores.pair_metrics` of each, the share of prompts whose verdict
(flagged at the checkpoint's threshold) is the same, and the mean and largest change of
p(malicious). Use pairs that the checkpoint never trained on.

Usage: ``python -m benchmarks.quant_agreement [--pairs data/contrast_words] [--checkpoint DIR]
[--json PATH]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import CHECKPOINT, load, markdown_table, write_json
from benchmarks.pair_scores import FORMS, pair_metrics, score_pairs
from safety_decoding.types import Quantization


def compare(ref: list[tuple[float, bool]], other: list[tuple[float, bool]]) -> dict:
    """Verdict agreement and score change between two lists of ``(score, flagged)``."""
    diffs = [abs(a - b) for (a, _), (b, _) in zip(ref, other)]
    return {"n": len(ref),
            "verdict_agreement": round(sum(fa == fb for (_, fa), (_, fb) in zip(ref, other)) / len(ref), 4),
            "mean_abs_score_change": round(sum(diffs) / len(diffs), 4),
            "max_abs_score_change": round(max(diffs), 4)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="data/contrast_words", help="folder or file of contrast pairs")
    ap.add_argument("--checkpoint", default=str(CHECKPOINT))
    ap.add_argument("--json", default="benchmarks/results/quant_agreement.json")
    args = ap.parse_args(argv)

    from safety_training.contrast import load_pairs

    pairs = load_pairs(args.pairs)
    decoder, _ = load(Path(args.checkpoint), dtype="float32")
    results, rows = {}, []
    for form in FORMS:
        verdicts = {}
        for q in Quantization:
            decoder.model.use_fused_forward(True, q)
            harmful, benign = score_pairs(decoder, pairs, form)
            verdicts[q.value] = harmful + benign
            results.setdefault(form, {})[q.value] = pair_metrics(harmful, benign)
            m = results[form][q.value]
            rows.append([form, q.value, m["auroc"], m["tpr"], m["fpr"], m["pair_accuracy"], "", ""])
        results[form]["agreement"] = c = compare(verdicts["none"], verdicts["int8"])
        rows[-1][-2:] = [c["verdict_agreement"], f'{c["mean_abs_score_change"]} / {c["max_abs_score_change"]}']
    print(markdown_table(["form", "weights", "AUROC", "TPR", "FPR", "pair accuracy",
                          "verdicts same as float", "score change mean / max"], rows))
    write_json(args.json, {"pairs": args.pairs, "checkpoint": args.checkpoint,
                           "threshold": decoder.model.config.threshold, "results": results})


if __name__ == "__main__":
    main()
