"""Classifier and refusal-rate figures on evaluation-only files (nothing the model trained on;
docs/method.md, "Data: what may train and what only evaluates").

- Query classifier (the prefill ``[CLS]`` verdict): accuracy, F1 and AUROC on AdvBench
  harmful_behaviors + HarmBench test (malicious) vs XSTest safe + safety-tuned-llamas
  I-Alpaca (benign).
- Refusal rates with greedy decoding: AdvBench direct, AdvBench prefill (``target`` as the
  response prefix), XSTest safe (over-refusal); for the checkpoint with ``refuse``, with
  ``reweight``, and without the safety signal (no ``[CLS]``, same LoRA weights). A response
  counts as refused when the policy intervened or the string-matching judge
  (`safety_eval.judge`) finds a refusal in it.

Usage: ``python -m benchmarks.safety_eval [--limit N] [--max-new-tokens 32] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import DATA_DIR, load, run_batches

from safety_training.data import advbench_behaviors, harmbench_test, stl_eval, xstest
from safety_decoding.decode import GenerationRequest
from safety_training.refusals import is_refusal
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import build_chat_prompt
from safety_decoding.sampling import SamplingParams
from safety_decoding.types import Action
from safety_training.metrics import classification_metrics


def prompt_of(tok, text, prefix=""):
    return build_chat_prompt(tok, [{"role": "user", "content": text}], prefix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=0, help="first N prompts of each set (0: all)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--json", default="benchmarks/results/safety_eval.json")
    args = ap.parse_args()
    lim = (lambda xs: xs[:args.limit]) if args.limit else (lambda xs: xs)
    decoder, tok = load()
    cfg = decoder.model.config
    t0 = time.time()

    adv = lim(advbench_behaviors(DATA_DIR))
    malicious = [r["goal"] for r in adv] + lim(harmbench_test(DATA_DIR))
    benign = lim(xstest(DATA_DIR, "safe")) + lim(stl_eval(DATA_DIR, "I-Alpaca"))
    one = SamplingParams(max_new_tokens=1)
    reqs = [GenerationRequest(prompt_of(tok, t), one, SafetyParams.from_config(cfg))
            for t in malicious + benign]
    scores = [e.safety["query_score"] for _, e in run_batches(decoder, reqs, desc="classifier")]
    labels = [1] * len(malicious) + [0] * len(benign)
    clf = classification_metrics(labels, scores, cfg.threshold)
    clf["n_malicious"], clf["n_benign"] = len(malicious), len(benign)

    sets = {
        "advbench_direct": [prompt_of(tok, r["goal"]) for r in adv],
        "advbench_prefill": [prompt_of(tok, r["goal"], r["target"]) for r in adv],
        "xstest_safe": [prompt_of(tok, t) for t in lim(xstest(DATA_DIR, "safe"))],
    }
    gen = SamplingParams(max_new_tokens=args.max_new_tokens)
    systems = {"ess_refuse": SafetyParams.from_config(cfg, action=Action.REFUSE),
               "ess_reweight": SafetyParams.from_config(cfg, action=Action.REWEIGHT),
               "no_safety_signal": SafetyParams.from_config(cfg, enabled=False)}
    rows = []
    for system, safety in systems.items():
        for name, prompts in sets.items():
            res = run_batches(decoder, [GenerationRequest(p, gen, safety) for p in prompts],
                              desc=f"{name} {system}")
            refused = [e.safety["intervened"] or is_refusal(text) for text, e in res]
            rows.append({"system": system, "set": name, "n": len(res),
                         "refusal_rate": round(sum(refused) / len(res), 4),
                         "intervention_rate": round(sum(e.safety["intervened"] for _, e in res) / len(res), 4),
                         "example": res[0][0][:160]})
    out = {"classifier": clf, "refusal": rows, "max_new_tokens": args.max_new_tokens,
           "seconds": round(time.time() - t0, 1)}
    print("\nQuery classifier (threshold %.2f): " % cfg.threshold + json.dumps(clf))
    print("\n| system | set | n | refusal rate | intervention rate |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['set']} | {r['n']} | {r['refusal_rate']:.3f} | {r['intervention_rate']:.3f} |")
    from pathlib import Path

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
