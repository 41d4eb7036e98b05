"""Our contrast pairs (``data/contrast/*.jsonl``) as training examples.

A pair is a harmful request and a benign twin that shares its topic words and style; only the
intent differs (``data/contrast/README.md``), so a head that judges topic words cannot fit both
(docs/method.md, "Training data mix"). Both sides are query-only examples, as `data` treats
query-only malicious and benign prompts: the harmful one label 1, the benign one label 0, no
response, no LM loss. ``refusal_percent`` of the harmful ones (by a stable hash of the pair id)
instead get the inserted refusal as `data.build_examples` gives its malicious prompts.

Every example carries its pair's ``category`` and id (``pair``), so `splits` can hold whole
categories or whole pairs out of training.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .data import Example, in_split, refused

SOURCE = "contrast"
"""The `Example.source` of both sides of every pair."""


@dataclass(frozen=True)
class ContrastPair:
    """One line of a ``data/contrast`` file."""

    id: str
    category: str
    style: str
    harmful: str
    benign: str
    benign_kind: str


def load_pairs(contrast_dir: str | Path) -> list[ContrastPair]:
    """Every pair of every ``*.jsonl`` file in the folder ``contrast_dir``, files in name
    order, or of that one file.

    Raises:
        FileNotFoundError: no ``.jsonl`` file in ``contrast_dir``.
        ValueError: a line that is not a pair (missing or extra keys; the message names the
            file and line).
    """
    path = Path(contrast_dir)
    files = [path] if path.suffix == ".jsonl" and path.is_file() else sorted(path.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"contrast_dir: no .jsonl file in {contrast_dir}")
    out = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(ContrastPair(**json.loads(line)))
            except (TypeError, json.JSONDecodeError) as exc:
                raise ValueError(f"contrast_dir: {f.name}:{n} is not a contrast pair ({exc})") from None
    return out


def contrast_examples(pairs: list[ContrastPair], seed: int, refusal_percent: int = 0) -> list[Example]:
    """Two examples a pair, harmful (label 1) then benign (label 0), query-only; the harmful
    request of a pair in the ``refusal_percent`` share (`data.in_split` of its id) gets the
    inserted refusal instead (reasons drawn with an RNG seeded by ``seed``)."""
    rng = random.Random(f"{seed}:{SOURCE}")
    out = []
    for p in pairs:
        meta = dict(source=SOURCE, category=p.category, pair=p.id)
        if in_split("refusal:" + p.id, refusal_percent):
            out.append(refused(p.harmful, rng, after_opener=False, **meta))
        else:
            out.append(Example(p.harmful, "", 1, lm_loss=False, **meta))
        out.append(Example(p.benign, "", 0, lm_loss=False, **meta))
    return out
