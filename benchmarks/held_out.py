"""Query-verdict generalisation of any checkpoint on a training config's held-out sets.

The recipe reports these sets for the run it trains (`safety_training.recipe.held_out_report`);
this script scores another checkpoint (e.g. the one shipped before) on the same sets, so two
checkpoints are compared on data neither trained on: the source-held-out and
category-held-out sets, the validation split by request format, and the threshold chosen on
the calibration split's benign side at the config's ``calibration_fpr``
(docs/method.md, "Data: what may train and what only evaluates"). A checkpoint that trained on
some of these examples reads optimistic: ``--seen-config`` names the configs of its own chain
of runs, whose queries then leave every held-out set (with the config's ``seen_configs``).

Each checkpoint is read at its own calibration threshold, as it would ship. ``--match-fpr`` takes
another checkpoint's JSON from this script on the same config and adds, for every set with
both classes, this checkpoint's TPR at that checkpoint's false-positive rate on the same set
(`metrics.tpr_at_fpr`): the two rankings compared at one operating point. The JSON keeps every
set's labels and scores.

Usage: ``python -m benchmarks.held_out --config checkpoints/smollm2-135m-ess/train.yaml
[--checkpoint DIR] [--seen-config CONFIG ...] [--match-fpr OTHER.json] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import CHECKPOINT, markdown_table, write_json


def held_out_table(report: dict) -> str:
    """A Markdown table of `metrics.held_out_metrics` output: one row per set, with the TPR at
    the reference's FPR where `matched_rates` added it."""
    sets = {name: m for name, m in report.items() if isinstance(m, dict) and "auroc" in m}
    head = ["set", "n", "AUROC", f"FPR @ {report['threshold']:.4f}", "TPR"]
    rows = [[name, m["n"], m["auroc"], m["fpr"], m["tpr"]] for name, m in sets.items()]
    if any("at_reference_fpr" in m for m in sets.values()):
        head.append("TPR at the reference's FPR")
        rows = [r + [f"{m['at_reference_fpr']['tpr']} (FPR {m['at_reference_fpr']['fpr']})"
                     if "at_reference_fpr" in m else "-"] for r, m in zip(rows, sets.values())]
    return markdown_table(head, rows)


def matched_rates(report: dict, reference: dict) -> dict:
    """``report`` with ``at_reference_fpr`` (`metrics.tpr_at_fpr`) on every set that both
    reports hold with both classes, at the reference's FPR on that set.

    Raises:
        ValueError: ``report`` has no ``scores`` (`held_out_report` with ``with_scores``), or a
            set's size differs from the reference's (other splits: not comparable).
    """
    from safety_training.metrics import tpr_at_fpr

    if "scores" not in report:
        raise ValueError("matched_rates: the report has no per-set scores")
    out = dict(report)
    for name, sc in report["scores"].items():
        ref = reference.get(name)
        if not isinstance(ref, dict) or not {0, 1} <= set(sc["labels"]):
            continue
        if ref["n"] != len(sc["labels"]):
            raise ValueError(f"--match-fpr: set {name!r} has {len(sc['labels'])} examples here and "
                             f"{ref['n']} in the reference: not the same splits")
        out[name] = {**report[name], "at_reference_fpr": tpr_at_fpr(sc["labels"], sc["scores"], ref["fpr"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="training config whose splits are scored")
    ap.add_argument("--checkpoint", default=str(CHECKPOINT))
    ap.add_argument("--seen-config", nargs="*", default=None,
                    help="configs of the checkpoint's own chain of runs: their queries leave every "
                         "held-out set (default: the config's seen_configs)")
    ap.add_argument("--match-fpr", metavar="OTHER.json",
                    help="this script's JSON for another checkpoint on the same config: add each "
                         "set's TPR at that checkpoint's FPR")
    ap.add_argument("--json", default="benchmarks/results/held_out.json")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from safety_decoding.base_model import prepare_base_model
    from safety_decoding.model import load_safety_model
    from safety_training.recipe import (held_out_report, load_train_config, query_scores, seen_queries,
                                        split, training_examples)

    cfg = load_train_config(args.config)
    base = prepare_base_model()
    tok = AutoTokenizer.from_pretrained(str(base))
    model = load_safety_model(args.checkpoint, base)
    seen = seen_queries((*cfg.seen_configs, *(args.seen_config or ())))
    sets = split(training_examples(cfg)[0], cfg, seen)
    report = held_out_report(model, tok, cfg, sets, sets.validation,
                             query_scores(model, tok, cfg, sets.validation), with_scores=True)
    if args.match_fpr:
        report = matched_rates(report, json.loads(Path(args.match_fpr).read_text()))
    print(held_out_table(report))
    write_json(args.json, {"checkpoint": args.checkpoint, "config": args.config, **report})


if __name__ == "__main__":
    main()
