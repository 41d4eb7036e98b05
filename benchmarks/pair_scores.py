"""Query verdicts of checkpoints on contrast pairs that none of them trained on.

A pair is a harmful request and its benign twin with the same topic words and wrapping
(`safety_training.contrast`). This scores both sides of every pair of a folder, each as one
chat message and as raw text (what ``/v1/completions`` sends), and reports per checkpoint and
form: AUROC, the flag rates at the checkpoint's own threshold (TPR on the harmful side, FPR on
the benign side), and pair accuracy, the share of pairs whose harmful side scores above its
twin (intent ranked above topic). Per category, style and benign kind too (idiom, homonym,
history ...), so a reader sees where the head fails.

Use it on pairs written after the checkpoints were trained (``data/contrast_long``: long
persuasive scenarios, which no shipped run saw), never to choose a threshold.

``--surface`` rewrites both sides of every pair in one of the disguises that normalization
leaves to the head (`safety_training.augment.Surface`: scrambled case, Cyrillic look-alikes),
so a reader sees how much of the head's verdict survives them on text it never trained on.

``--pairs`` takes folders and single ``.jsonl`` files, so a run's held-out categories are named
straight from the data folders (e.g. ``data/contrast_long/elections.jsonl``).

Usage: ``python -m benchmarks.pair_scores --pairs data/contrast_long [PATH ...]
[--checkpoint DIR ...] [--surface KIND] [--json PATH]``
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from benchmarks.common import CHECKPOINT, load, markdown_table, write_json
from safety_training.augment import Surface, surface_variant

FORMS = ("chat", "raw")


def pair_metrics(harmful: list[tuple[float, bool]], benign: list[tuple[float, bool]]) -> dict:
    """Metrics of paired verdicts ``(score, flagged)`` (``harmful[i]`` and ``benign[i]`` are
    one pair's sides; flagged: the policy's query trip): ``n`` pairs, ``auroc``, ``tpr`` and
    ``fpr`` (flag rates), ``pair_accuracy`` (harmful side strictly higher)."""
    from sklearn.metrics import roc_auc_score

    n = len(harmful)
    scores = [s for s, _ in harmful + benign]
    return {"n": n,
            "auroc": round(float(roc_auc_score([1] * n + [0] * n, scores)), 4),
            "tpr": round(sum(f for _, f in harmful) / n, 4),
            "fpr": round(sum(f for _, f in benign) / n, 4),
            "pair_accuracy": round(sum(h > b for (h, _), (b, _) in zip(harmful, benign)) / n, 4)}


def score_pairs(decoder, pairs, form: str) -> tuple[list, list]:
    """``(harmful verdicts, benign verdicts)``, each ``(score, flagged)`` at the checkpoint's
    threshold, of ``pairs`` sent in ``form`` (``chat`` or ``raw``)."""
    from benchmarks.format_agreement import query_verdicts
    from safety_decoding.prompt import build_chat_prompt, build_raw_prompt

    def prompt(text):
        if form == "raw":
            return build_raw_prompt(decoder.tok, text)
        return build_chat_prompt(decoder.tok, [{"role": "user", "content": text}])

    texts = [p.harmful for p in pairs] + [p.benign for p in pairs]
    verdicts = query_verdicts(decoder, [prompt(t) for t in texts])
    return verdicts[:len(pairs)], verdicts[len(pairs):]


def disguised(pairs: list, surface: Surface, rng: random.Random) -> list:
    """``pairs`` with both sides rewritten by `augment.surface_variant`."""
    return [replace(p, harmful=surface_variant(p.harmful, surface, rng),
                    benign=surface_variant(p.benign, surface, rng)) for p in pairs]


GROUPS = {"categories": lambda p: p.category, "styles": lambda p: p.style, "kinds": lambda p: p.benign_kind}


def measure(decoder, pairs) -> dict:
    """`pair_metrics` per form, overall, per category, per style and per benign kind, at the
    checkpoint's threshold."""
    out = {"threshold": decoder.model.config.threshold, "forms": {}}
    for form in FORMS:
        harmful, benign = score_pairs(decoder, pairs, form)
        out["forms"][form] = {"all": pair_metrics(harmful, benign)}
        for group, key in GROUPS.items():
            by = defaultdict(lambda: ([], []))
            for p, h, b in zip(pairs, harmful, benign):
                by[key(p)][0].append(h)
                by[key(p)][1].append(b)
            out["forms"][form][group] = {g: pair_metrics(h, b) for g, (h, b) in sorted(by.items())}
    return out


def report(results: dict) -> str:
    """One Markdown row per checkpoint and form, then per category, style and benign kind (chat form)."""
    cols = ["auroc", "tpr", "fpr", "pair_accuracy"]
    rows = [[name, form, r["threshold"]] + [m["all"][c] for c in cols]
            for name, r in results.items() for form, m in r["forms"].items()]
    lines = [markdown_table(["checkpoint", "form", "threshold", "AUROC", "TPR", "FPR", "pair accuracy"], rows), ""]
    for group, title in (("categories", "category"), ("styles", "style"), ("kinds", "benign kind")):
        keys = sorted(next(iter(results.values()))["forms"]["chat"][group])
        lines.append(markdown_table([f"{title} (chat)"] + [f"{n}: TPR / FPR / pair acc." for n in results],
                                    [[k] + ["{tpr} / {fpr} / {pair_accuracy}".format(**r["forms"]["chat"][group][k])
                                            for r in results.values()] for k in keys]))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=["data/contrast_long"],
                    help="folders of contrast-pair .jsonl files, or single files")
    ap.add_argument("--checkpoint", nargs="+", default=[str(CHECKPOINT)])
    ap.add_argument("--threshold", type=float, nargs="+", default=None,
                    help="one threshold per --checkpoint in place of its own (e.g. the one a "
                         "calibration split gives it: benchmarks.held_out)")
    ap.add_argument("--surface", choices=[s.value for s in Surface],
                    help="score the pairs in this disguise (both sides, seed 0)")
    ap.add_argument("--json", default="benchmarks/results/pair_scores.json")
    args = ap.parse_args(argv)
    if args.threshold is not None and len(args.threshold) != len(args.checkpoint):
        ap.error("--threshold: give one per --checkpoint")

    from safety_training.contrast import load_pairs

    pairs = [p for path in args.pairs for p in load_pairs(path)]
    if args.surface:
        pairs = disguised(pairs, Surface(args.surface), random.Random(0))
    results = {}
    for i, ckpt in enumerate(args.checkpoint):
        decoder, _ = load(Path(ckpt))
        if args.threshold is not None:
            decoder.model.config = replace(decoder.model.config, threshold=args.threshold[i])
        results[ckpt] = measure(decoder, pairs)
    print(report(results))
    write_json(args.json, {"pairs": args.pairs, "n_pairs": len(pairs), "surface": args.surface,
                           "results": results})


if __name__ == "__main__":
    main()
