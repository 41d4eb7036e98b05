"""Our contrast pairs (data/contrast): schema, size, and zero overlap with evaluation files."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import DATA_DIR
from safety_training.data import eval_texts, normalise

CONTRAST = Path(__file__).resolve().parents[1] / "data" / "contrast"
KEYS = {"id", "category", "style", "harmful", "benign", "benign_kind"}
STYLES = {"blunt", "polite", "role_claim", "business", "household", "persuasive", "fiction",
          "step_by_step", "euphemism", "scenario"}
KINDS = {"history", "explanation", "prevention", "fiction_analysis", "definition", "compliance",
         "idiom", "fictional_privacy", "public_role", "textbook", "support"}


@pytest.fixture(scope="module")
def pairs():
    return [json.loads(line) for f in sorted(CONTRAST.glob("*.jsonl"))
            for line in f.read_text(encoding="utf-8").splitlines()]


def test_every_pair_has_the_schema_and_texts_are_unique(pairs):
    for p in pairs:
        assert set(p) == KEYS, p["id"]
        assert p["style"] in STYLES and p["benign_kind"] in KINDS, p["id"]
        assert p["harmful"].strip() and p["benign"].strip() and p["harmful"] != p["benign"]
    assert len({p["id"] for p in pairs}) == len(pairs)
    texts = [normalise(p[k]) for p in pairs for k in ("harmful", "benign")]
    assert len(set(texts)) == len(texts)


def test_at_least_40_pairs_per_category_and_2000_in_all(pairs):
    per_category = Counter(p["category"] for p in pairs)
    assert len(per_category) >= 12 and min(per_category.values()) >= 40
    assert len(pairs) >= 2000


def _shingles(text: str, n: int = 10) -> set[str]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


@pytest.mark.skipif(not DATA_DIR.exists(), reason="the data files are not fetched")
def test_no_pair_copies_an_evaluation_text(pairs):
    banned = eval_texts(DATA_DIR)
    ours = [p[k] for p in pairs for k in ("harmful", "benign")]
    assert [t for t in ours if normalise(t) in banned] == []
    theirs = set().union(*(_shingles(b) for b in banned))
    assert [t for t in ours if _shingles(t) & theirs] == []
