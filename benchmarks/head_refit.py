"""Is the query verdict's weakness in the head or in the features? ``python -m benchmarks.head_refit``

Why does the shipped signal judge topic words rather than intent? The safety head is
one linear layer over the final hidden state of ``[CLS]`` (and of the response probes); the
LoRA adapter shapes what that state holds. This benchmark keeps the checkpoint's weights frozen,
computes those states once (bfloat16, as ``ess serve`` runs on CPUs with native bf16), fits a new
head by class-balanced logistic regression on the states of a training config's train split (the
query rows and the probe rows, as the recipe trains the head), and scores the new heads and the
checkpoint's own head on the config's held-out sets at the threshold each gets on the calibration
split (`safety_training.metrics.held_out_metrics`, the recipe's rule). If a refit head
generalises better, a cheap head-only retrain is a path; if not, the features must change, which
needs the full recipe (the result: docs/method.md, "Decision 19"). Only the config's own splits
are read; no evaluation file.

Usage: ``python -m benchmarks.head_refit [--config CONFIG] [--checkpoint DIR] [--l2 1e-3 ...]
[--json PATH]``
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from benchmarks.common import CHECKPOINT, markdown_table, write_json

HELD_OUT = ("validation", "calibration", "source_held_out", "category_held_out")


@torch.inference_mode()
def head_features(model, tok, cfg, examples, seed: int, batch_size: int = 16):
    """``(X (N, H) float32, labels (N,), is_probe (N,) bool)``: the final hidden states the head
    reads, one query row per example plus its response probes (`recipe.encode_example`)."""
    from safety_training.recipe import collate, encode_example

    rng = random.Random(seed)
    enc = [encode_example(tok, e, cfg, rng) for e in examples]
    xs, labels, probes = [], [], []
    for i in range(0, len(enc), batch_size):
        b = collate(enc[i:i + batch_size])
        hidden, _ = model.hidden_states(b.ids, b.kinds, b.positions, b.mask)
        xs.append(hidden[b.cls_rows[:, 0], b.cls_rows[:, 1]].float())
        labels += [int(t) for t in b.cls_targets.tolist()]
        probes += b.cls_is_probe.tolist()
    return torch.cat(xs).clone(), torch.tensor(labels), torch.tensor(probes)


def fit_head(x: torch.Tensor, y: torch.Tensor, l2: float, init: tuple[torch.Tensor, torch.Tensor]):
    """Class-balanced logistic regression ``sigmoid(x @ w + b)`` with an L2 penalty on ``w``
    (LBFGS from ``init``; the recipe balances its batches by class). ``x (N, H)``, ``y (N,)`` in
    {0, 1}. Returns ``(w (H,), b ())``."""
    w, b = (t.detach().float().clone().requires_grad_(True) for t in init)
    pos = y.float().mean()
    weight = torch.where(y == 1, 0.5 / pos, 0.5 / (1 - pos))
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(x @ w + b, y.float(), reduction="none") * weight).mean()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def head_report(held: dict, w: torch.Tensor, b: torch.Tensor, fpr: float) -> dict:
    """`held_out_metrics` of the query rows of ``held`` (``{set: (X, labels, is_probe)}``) under
    the head ``(w, b)``, thresholded on ``held["calibration"]`` at ``fpr``."""
    from safety_training.metrics import held_out_metrics

    def scored(name):
        x, y, probe = held[name]
        return y[~probe].tolist(), torch.sigmoid(x[~probe] @ w + b).tolist()

    return held_out_metrics(scored("calibration"), {n: scored(n) for n in HELD_OUT if n != "calibration"}, fpr)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.head_refit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="checkpoints/candidates/train-run13.yaml",
                    help="training config whose splits train and score the heads (default: the "
                         "thirteenth run's, the largest benign mix)")
    ap.add_argument("--checkpoint", default=str(CHECKPOINT))
    ap.add_argument("--l2", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    ap.add_argument("--json", default="benchmarks/results/head_refit.json")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from safety_decoding.base_model import prepare_base_model
    from safety_decoding.model import load_safety_model
    from safety_training.recipe import load_train_config, seen_queries, split, training_examples

    cfg = load_train_config(args.config)
    base = prepare_base_model()
    tok = AutoTokenizer.from_pretrained(str(base))
    model = load_safety_model(args.checkpoint, base, dtype=torch.bfloat16).eval()
    sets = split(training_examples(cfg)[0], cfg, seen_queries(cfg.seen_configs))
    x, y, _ = head_features(model, tok, cfg, sets.train, cfg.seed)
    held = {name: head_features(model, tok, cfg, getattr(sets, name), cfg.seed + 1) for name in HELD_OUT}
    shipped = (model.head.weight.detach().float()[0], model.head.bias.detach().float()[0])
    heads = {"checkpoint's head": shipped}
    heads |= {f"refit, l2 {l2:g}": fit_head(x, y, l2, shipped) for l2 in args.l2}
    reports = {name: head_report(held, w, b, cfg.calibration_fpr) for name, (w, b) in heads.items()}
    rows = [[name, f"{r['threshold']:.3f}", *(f"{r[s]['auroc']:.3f} / {100 * r[s]['fpr']:.1f} / "
                                              f"{100 * r[s]['tpr']:.1f}" for s in HELD_OUT)]
            for name, r in reports.items()]
    print(markdown_table(["head", "threshold", *(f"{s}: AUROC / FPR % / TPR %" for s in HELD_OUT)], rows))
    out = {"checkpoint": args.checkpoint, "config": args.config, "train_rows": len(y),
           "sizes": sets.sizes(), "heads": reports}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
