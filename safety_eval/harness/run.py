"""``ess eval``: attack success rates, over-refusal and utility of every system, with the
refusal judge's measured error next to each rate.

Writes into ``--output``: ``results.json`` (``results``: one row per system and attack or
benign set; ``refusal_by_type``: XSTest over-refusal per prompt type; ``operating_points``: the
``refuse`` systems re-judged at other thresholds of the safety head, `report.operating_points`),
``results.md``, ``asr_by_attack.png``, ``over_refusal_vs_asr.png``, ``operating_points.png`` and
``generations.jsonl`` (the cache: a rerun with the same output folder only generates what is
missing). ``--quick`` runs the documented subset `plan.QUICK` on `systems.QUICK_SYSTEMS`;
``--url`` sends the same requests to a running server's ``/generate`` instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

from safety_eval.harness import plan as P
from safety_eval.harness.backends import HttpBackend, LocalBackend, Models, apply_guard, batches
from safety_eval.harness.cache import Cache, record_key
from safety_eval.harness.report import markdown, operating_points, plots, refusal_by_category, set_row
from safety_eval.harness.systems import BY_NAME, GUARD_EVERY, NOT_AVAILABLE, select
from safety_decoding.device import DTYPE_NAMES
from safety_decoding.types import Action
from safety_training.datasets import default_data_dir

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "checkpoints" / "smollm2-135m-ess"
GUARD_DIR = REPO / "checkpoints" / "smollm2-135m-guard"
JUDGE_SPLIT = "held_out"
"""Judge error quoted next to every rate: the validation split no phrase was chosen on."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="documented subset (safety_eval/harness/plan.py QUICK), under 10 min on 2 CPU cores")
    p.add_argument("--output", type=Path, help="output folder (default benchmarks/results/eval[-quick])")
    p.add_argument("--systems", nargs="+", metavar="NAME", help="systems to run (default: all, or "
                   "the quick set); names: " + ", ".join(BY_NAME))
    p.add_argument("--attacks", nargs="+", metavar="NAME", help="attack and benign sets to run; "
                   "names: " + ", ".join(P.ATTACKS + list(P.BENIGN_SETS)))
    p.add_argument("--limit", type=int, default=0, help="cap every set at N requests")
    p.add_argument("--url", help="evaluate a running server (TGI /generate) instead of local models")
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    p.add_argument("--base-model", type=Path, help="prepared base-model folder (default: the cache)")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help="the safety data (default: where `ess data fetch` puts it)")
    p.add_argument("--no-utility", action="store_true", help="skip the perplexity measurement")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                   help="model precision, as the server's ESS_DTYPE (default auto)")


def load_models(checkpoint: Path, base_dir: Path | None, dtype: str = "auto") -> Models:
    """Decoders of the plain base model and of the checkpoint, and the guard sharing the base
    weights (tests replace this function with tiny random models), on the CPU in ``dtype``
    (`safety_decoding.device.resolve_dtype`: what ``ess serve`` runs here).

    The model ids (part of every cache key) name the weights by hash and precision, so records
    of other weights or another precision are never reused.

    Raises:
        PrepareError: the base model cannot be prepared.
        CheckpointError: the checkpoint is missing, corrupt or for another base model.
    """
    import torch
    from transformers import AutoTokenizer

    from safety_decoding.base_model import prepare_base_model
    from safety_decoding.decode import Decoder
    from safety_training.guard import load_guard
    from safety_decoding.device import dtype_name, resolve_dtype
    from safety_decoding.model import load_plain_model, load_safety_model

    base = base_dir or prepare_base_model(log=lambda m: print(m, file=sys.stderr))
    tok = AutoTokenizer.from_pretrained(str(base))
    dt = resolve_dtype(dtype, torch.device("cpu"))
    plain = Decoder(load_plain_model(base, dtype=dt), tok)
    ckpt = Decoder(load_safety_model(checkpoint, base, dtype=dt), tok)
    guard = load_guard(GUARD_DIR, base, body=plain.model.decoder) if GUARD_DIR.exists() else None
    c = ckpt.model.config
    precision = dtype_name(dt)
    plain_id = f"base@{c.base_model_sha256[:12]}/{precision}"  # checked by load_safety_model
    ids = {"plain": plain_id,
           "checkpoint": f"{Path(checkpoint).name}@{files_digest(checkpoint)}/{precision}",
           "guard": f"{plain_id}+guard@{files_digest(GUARD_DIR)}"}
    return Models(tok, plain, ckpt, guard, ids)


def files_digest(folder: Path) -> str:
    """Hash of a folder's files, README files excepted ("" for a missing folder)."""
    files = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix != ".md"):
        files.update(f.read_bytes())
    return files.hexdigest()[:12] if Path(folder).exists() else ""


class GuardBackend:
    """The ``guard`` system: base-model records (cached under the base system) checked by the
    external guard (`backends.apply_guard`)."""

    def __init__(self, local: LocalBackend, cache: Cache, base_spec, on_new):
        self.local, self.cache, self.base_spec, self.on_new = local, cache, base_spec, on_new

    def generate(self, spec, cases, max_new_tokens):
        if not cases:
            return
        models = self.local.models
        if models.guard is None:
            raise FileNotFoundError(f"no external guard in {GUARD_DIR}; run `ess train-guard`")
        digest = self.base_spec.digest(models.id_for(self.base_spec))
        base, missing = {}, []
        for c in cases:
            rec = self.cache.get(record_key(digest, c.key, max_new_tokens))
            if rec is None:
                missing.append(c)
            else:  # the same request may have been cached under another set's name
                base[(c.attack, c.case_id)] = {**rec, "attack": c.attack, "case_id": c.case_id}
        by_id = {(c.attack, c.case_id): c for c in missing}
        for batch in self.local.generate(self.base_spec, missing, max_new_tokens):
            recs = [{**r, "system": self.base_spec.name,
                     "key": record_key(digest, by_id[(r["attack"], r["case_id"])].key, max_new_tokens)}
                    for r in batch]
            self.cache.add(recs)
            self.on_new(len(recs))
            base.update(((r["attack"], r["case_id"]), r) for r in recs)
        recs = [base[(c.attack, c.case_id)] for c in cases]
        prompts = [self.local.prompt(self.base_spec, c).ids for c in cases]
        yield apply_guard(models.guard, models.tok, prompts, recs, GUARD_EVERY)


def run_system(backend, spec, sets: list, cache: Cache, model_id: str, max_new_tokens: int,
               counter: dict) -> dict[str, dict[str, dict]]:
    """Records of ``spec`` on every set, ``{set name: {case id: record}}``, from the cache or
    generated (and cached batch by batch). Rounds of a set (decoding settings) run in order,
    each only for groups that no earlier round broke."""
    from tqdm import tqdm

    from safety_training.refusals import is_refusal

    digest = spec.digest(model_id)
    got: dict[str, dict[str, dict]] = {s.name: {} for s in sets}
    bar = tqdm(total=sum(len(s.cases) for s in sets), desc=spec.name, file=sys.stderr,
               mininterval=5, leave=True)
    for rnd in range(max(len(s.rounds) for s in sets)):
        todo = []
        for s in sets:
            if rnd >= len(s.rounds):
                continue
            broken = {c.group for c in s.cases if c.case_id in got[s.name]
                      and s.kind == "attack" and not is_refusal(got[s.name][c.case_id]["text"])}
            for c in s.rounds[rnd]:
                if c.group in broken:
                    bar.total -= 1
                    continue
                rec = cache.get(record_key(digest, c.key, max_new_tokens))
                if rec is not None:
                    got[s.name][c.case_id] = rec
                    counter["cached"] += 1
                    bar.update(1)
                else:
                    todo.append(c)
        by_id = {(c.attack, c.case_id): c for c in todo}
        for batch in backend.generate(spec, todo, max_new_tokens):
            recs = [{**r, "system": spec.name,
                     "key": record_key(digest, by_id[(r["attack"], r["case_id"])].key, max_new_tokens)}
                    for r in batch]
            cache.add(recs)
            if not spec.guard:  # the guard's generations are counted by `GuardBackend`
                counter["new"] += len(recs)
            for r in recs:
                got[r["attack"]][r["case_id"]] = r
            bar.update(len(recs))
    bar.close()
    return got


def utility_rows(models: Models, specs: list, plan: P.Plan, data_dir: Path, cache: Cache,
                 held_out_percent: int) -> list[dict]:
    """Perplexity of held-out AlpacaEval reference answers under each system, and its ratio to
    the base model's (teacher-forced, response tokens only, the first ``plan.utility_tokens``).

    Systems that share weights, prompt and attention layout share the measurement (the guard's
    is the base model's: it changes nothing until it trips; ESS schedules and actions act only
    while decoding). Per-answer sums are cached like generations.
    """

    from safety_training.data import alpaca_eval_held_out
    from safety_eval.cases import Case, response_nll, seeded_subset

    rows = alpaca_eval_held_out(data_dir, held_out_percent)
    rows = [rows[i] for i in seeded_subset(len(rows), plan.n_utility, plan.seed)]
    answers = [models.tok(r["output"], add_special_tokens=False)["input_ids"][:plan.utility_tokens] for r in rows]
    layout = lambda s: (s.model, s.enabled, s.system_prompt)  # noqa: E731
    base_spec = BY_NAME["base"]
    cache_of: dict = {}
    for spec in [base_spec] + specs:
        key = layout(spec)
        if key in cache_of:
            continue
        digest = hashlib.sha256(repr((key, models.id_for(spec))).encode()).hexdigest()[:12]
        keys = [f"nll:{digest}:{hashlib.sha256(r['output'].encode()).hexdigest()[:16]}:{plan.utility_tokens}"
                for r in rows]
        todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
        model = (models.plain if spec.model == "plain" else models.checkpoint).model
        backend = LocalBackend(models)
        prompts = {i: backend.prompt(spec, Case("utility", f"alpaca:{i}", rows[i]["instruction"])) for i in todo}
        for idx in batches([len(prompts[i].ids) + len(answers[i]) for i in todo], 0, max_batch=8, budget=8192):
            chunk = [todo[j] for j in idx]
            res = response_nll(model, [prompts[i] for i in chunk], [answers[i] for i in chunk], spec.enabled)
            cache.add([{"key": keys[i], "system": f"utility:{spec.name}", "nll": nll, "tokens": n}
                       for i, (nll, n) in zip(chunk, res)])
        recs = [cache.get(k) for k in keys]
        nll, n = sum(r["nll"] for r in recs), sum(r["tokens"] for r in recs)
        cache_of[key] = (math.exp(nll / n) if n else math.nan, len(recs), n)
    base_ppl = cache_of[layout(base_spec)][0]
    return [{"system": s.name, "perplexity": round(cache_of[layout(s)][0], 4),
             "perplexity_ratio_vs_base": round(cache_of[layout(s)][0] / base_ppl, 4),
             "n_answers": cache_of[layout(s)][1], "n_tokens": cache_of[layout(s)][2],
             "source": f"alpaca_eval held-out {held_out_percent}% split, {len(rows)} answers (seed {plan.seed})"}
            for s in specs]


CAVEATS = [
    "PyRIT and DAN templates are in the training pool (the checkpoint's data manifest counts its "
    "template-wrapped training requests as jailbreak-template*); the AdvBench goals wrapped here "
    "are evaluation-only. AutoDAN templates were not used in training.",
    "sft_only is the checkpoint's LoRA with [CLS] off: the only available stand-in for the paper's "
    "implicit (SFT-only) baseline; it was trained with the signal, not without it.",
    "The judge is string matching: a response that complies and then apologises counts as a "
    "refusal, and a soft refusal without a listed phrase counts as success. Its held-out miss rate "
    "comes from long, hedged answers of larger chat models (Mistral, PyRIT examples); the "
    "successes of a quick run on the shipped checkpoint, read by hand, were plain compliance or "
    "off-topic text rather than soft refusals, so the estimate corrected at the measured rate "
    "(results.json) overstates refusals. The bounds let the judge's error range from zero to "
    "the measured rate.",
    "Generation stops once the response contains a refusal phrase (the verdict cannot change); "
    "intervention rates count interventions made before that point.",
    "The guard's outputs are the base model's generations checked after the fact at each "
    "checkpoint, which releases the same text an online guard would.",
    "Perplexity is teacher-forced with each system's attention layout (ESS: response tokens read "
    "the query's [CLS]); interventions happen only while decoding and show in over-refusal and "
    "unchanged-vs-base instead.",
]


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> dict:
    """Run the evaluation; returns the ``results.json`` object.

    Raises:
        ValueError: an unknown system or set name, or systems other than the server's with --url.
        PrepareError, CheckpointError, FileNotFoundError: models or data cannot be loaded.
    """
    if args is None:
        ap = argparse.ArgumentParser(prog="ess eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(ap)
        args = ap.parse_args(argv)
    t0 = time.time()
    plan = P.QUICK if args.quick else P.FULL
    plan = plan.limited(args.limit) if args.limit else plan
    out = args.output or REPO / "benchmarks" / "results" / ("eval-quick" if args.quick else "eval")
    out.mkdir(parents=True, exist_ok=True)

    from safety_eval.judge import (DEV_SOURCES, HELD_OUT_SOURCES, XSTEST_REFUSAL, validate,
                                       validation_rows)

    per_source = validation_rows(args.data_dir)
    judged = validate(per_source)
    judge = judged["current"][JUDGE_SPLIT]

    cache = Cache(out)
    counter = {"new": 0, "cached": 0, "seconds": 0.0}
    if args.url:
        if args.systems:
            raise ValueError("--systems does not apply with --url: the server's policy is the system")
        from transformers import AutoTokenizer

        from safety_decoding.base_model import prepare_base_model

        tok = AutoTokenizer.from_pretrained(str(args.base_model or prepare_base_model()))
        from safety_eval.harness.systems import SystemSpec

        specs = [SystemSpec("server", "server", safety=(("url", args.url),), note=f"server at {args.url}")]
        backend, model_ids = HttpBackend(args.url), {"server": args.url}
    else:
        specs = select(args.systems, args.quick)
        models = load_models(args.checkpoint, args.base_model, args.dtype)
        tok, model_ids = models.tok, models.model_ids
        backend = LocalBackend(models)
    sets = P.build_sets(args.data_dir, tok, plan, args.attacks)

    records: dict[str, dict] = {}
    for spec in specs:
        b = backend
        if spec.guard:
            b = GuardBackend(backend, cache, BY_NAME["base"], lambda n: counter.__setitem__("new", counter["new"] + n))
        t = time.time()
        model_id = args.url or models.id_for(spec)
        records[spec.name] = run_system(b, spec, sets, cache, model_id, plan.max_new_tokens, counter)
        counter["seconds"] += time.time() - t

    if args.url:  # name the server's policy as its responses report it
        from dataclasses import replace

        first = next((r for recs in records["server"].values() for r in recs.values()), {})
        specs = [replace(specs[0], safety=(("action", first.get("server_action") or "?"),
                                           ("schedule", first.get("server_schedule") or "?")))]
    rows = []
    base = records.get("base")
    for spec in specs:
        for s in sets:
            rows.append(set_row(spec, s, records[spec.name][s.name], judge,
                                base[s.name] if base is not None and s.kind == "benign" else None))
    by_type = [{"system": spec.name, "set": s.name, **r} for spec in specs for s in sets
               if s.kind == "benign" for r in refusal_by_category(s, records[spec.name][s.name])]
    # the sweep re-judges records; only `refuse` systems turn a verdict over the threshold into a refusal
    sweeps = [{"system": spec.name, "points": operating_points(sets, records[spec.name])}
              for spec in specs if spec.enabled and not spec.guard and spec.action == Action.REFUSE.value]
    utility = []
    if not args.url and not args.no_utility and plan.n_utility:
        held = models.checkpoint.model.config.data_manifest.get("alpaca_eval_held_out_percent", 20)
        utility = utility_rows(models, specs, plan, args.data_dir, cache, held)

    results = {
        "config": {"quick": args.quick, "max_new_tokens": plan.max_new_tokens, "seed": plan.seed,
                   "plan": asdict(plan), "systems": [s.name for s in specs],
                   "sets": [s.name for s in sets], "checkpoint": str(args.checkpoint),
                   "url": args.url, "model_ids": model_ids},
        "run": {"wall_seconds": round(time.time() - t0, 1), "new_generations": counter["new"],
                "cached_records": counter["cached"],
                "generation_seconds": round(counter["seconds"], 1),
                "seconds_per_new_generation": round(counter["seconds"] / counter["new"], 3) if counter["new"] else None},
        "judge_split": JUDGE_SPLIT,
        "judge_validation": {
            "mapping": "Refusal = XSTest final_label 2_full_refusal or 3_partial_refusal (not: "
                       "1_full_compliance); PyRIT human_score 1. Phrases were chosen on the dev split "
                       f"({', '.join(DEV_SOURCES)}); held_out = {', '.join(HELD_OUT_SOURCES)}.",
            "xstest_label_to_refusal": XSTEST_REFUSAL,
            "v1": {k: a.to_dict() for k, a in judged["v1"].items()},
            "current": {k: a.to_dict() for k, a in judged["current"].items()},
        },
        "results": rows,
        "utility": utility,
        "refusal_by_type": by_type,
        "operating_points": sweeps,
        "sets": [{"name": s.name, "kind": s.kind, "requests": s.n_groups, "source": s.source} for s in sets],
        "systems": [{"system": s.name, "schedule": s.schedule, "action": s.action, "note": s.note} for s in specs],
        "not_run": NOT_AVAILABLE,
        "caveats": CAVEATS,
    }
    results["plots"] = plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    print(f"ess eval: wrote {out / 'results.md'} ({results['run']['wall_seconds']:.0f} s, "
          f"{counter['new']} new generations)", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
