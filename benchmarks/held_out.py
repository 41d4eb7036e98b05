"""Query-verdict generalisation of any checkpoint on a training config's held-out sets.

The recipe reports these sets for the run it trains (`safety_training.recipe.held_out_report`);
this script scores another checkpoint (e.g. the one shipped before) on the same sets, so two
checkpoints are compared on data neither trained on: the source-held-out and
category-held-out sets, the validation split by request format, and the threshold chosen on
the calibration split's benign side at the config's ``calibration_fpr``
(docs/method.md, "Data: what may train and what only evaluates"). A checkpoint that trained on
some of these examples reads optimistic: ``--seen-config`` names the configs of its own chain
of runs, whose queries then leave every held-out set (with the config's ``seen_configs``).

Usage: ``python -m benchmarks.held_out --config checkpoints/smollm2-135m-ess/train.yaml
[--checkpoint DIR] [--seen-config CONFIG ...] [--json PATH]``
"""

from __future__ import annotations

import argparse
import random

from benchmarks.common import CHECKPOINT, markdown_table, write_json


def held_out_table(report: dict) -> str:
    """A Markdown table of `metrics.held_out_metrics` output: one row per set."""
    rows = [[name, m["n"], m["auroc"], m["fpr"], m["tpr"]] for name, m in report.items()
            if isinstance(m, dict)]
    return markdown_table(["set", "n", "AUROC", f"FPR @ {report['threshold']:.4f}", "TPR"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="training config whose splits are scored")
    ap.add_argument("--checkpoint", default=str(CHECKPOINT))
    ap.add_argument("--seen-config", nargs="*", default=None,
                    help="configs of the checkpoint's own chain of runs: their queries leave every "
                         "held-out set (default: the config's seen_configs)")
    ap.add_argument("--json", default="benchmarks/results/held_out.json")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from safety_decoding.base_model import prepare_base_model
    from safety_decoding.model import load_safety_model
    from safety_training.recipe import (encode_example, held_out_report, load_train_config, scores,
                                        seen_queries, split, training_examples)

    cfg = load_train_config(args.config)
    base = prepare_base_model()
    tok = AutoTokenizer.from_pretrained(str(base))
    model = load_safety_model(args.checkpoint, base)
    seen = seen_queries((*cfg.seen_configs, *(args.seen_config or ())))
    sets = split(training_examples(cfg)[0], cfg, seen)
    enc = [encode_example(tok, e, cfg, random.Random(cfg.seed)) for e in sets.validation]
    report = held_out_report(model, tok, cfg, sets, sets.validation,
                             scores(model, enc, cfg.batch_size, cfg.lambda_cls))
    print(held_out_table(report))
    write_json(args.json, {"checkpoint": args.checkpoint, "config": args.config, **report})


if __name__ == "__main__":
    main()
