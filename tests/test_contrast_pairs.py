"""Our contrast pairs (data/contrast, the long scenarios of data/contrast_long, the word-sense
pairs of data/contrast_words, the over-refusal twins of data/contrast_overrefusal and the
style-held-out pairs of data/contrast_styles): schema, size, and zero overlap with evaluation
files."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import DATA_DIR
from safety_training.data import eval_texts, normalise

CONTRAST = Path(__file__).resolve().parents[1] / "data" / "contrast"
LONG = CONTRAST.parent / "contrast_long"
WORDS = CONTRAST.parent / "contrast_words"
OVERREFUSAL = CONTRAST.parent / "contrast_overrefusal"
NEW_STYLES = CONTRAST.parent / "contrast_styles"
HELD_OUT_STYLES = ("format_wrapped", "indirect_goal", "third_party", "academic", "terse_keywords",
                   "comparative", "informal_typos", "stealth_constraint")
KEYS = {"id", "category", "style", "harmful", "benign", "benign_kind"}
STYLES = {"blunt", "polite", "role_claim", "business", "household", "persuasive", "fiction",
          "step_by_step", "euphemism", "scenario", "long_scenario", *HELD_OUT_STYLES}
KINDS = {"history", "explanation", "prevention", "fiction_analysis", "definition", "compliance",
         "idiom", "fictional_privacy", "public_role", "textbook", "support",
         "safe_target", "homonym", "safe_context"}
WORD_SENSE_KINDS = {"idiom", "safe_target", "homonym", "safe_context"}


def _load_file(f: Path) -> list[dict]:
    return [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]


def _load(folder: Path) -> list[dict]:
    return [p for f in sorted(folder.glob("*.jsonl")) for p in _load_file(f)]


def _texts(pairs: list[dict]) -> set[str]:
    """Both sides of every pair, normalised."""
    return {normalise(p[k]) for p in pairs for k in ("harmful", "benign")}


@pytest.fixture(scope="module", params=[CONTRAST, LONG, WORDS, OVERREFUSAL, NEW_STYLES],
                ids=["contrast", "long", "words", "overrefusal", "styles"])
def pairs(request):
    return _load(request.param)


def test_every_pair_has_the_schema_and_texts_are_unique(pairs):
    for p in pairs:
        assert set(p) == KEYS, p["id"]
        assert p["style"] in STYLES and p["benign_kind"] in KINDS, p["id"]
        assert p["harmful"].strip() and p["benign"].strip() and p["harmful"] != p["benign"]
    assert len({p["id"] for p in pairs}) == len(pairs)
    texts = [normalise(p[k]) for p in pairs for k in ("harmful", "benign")]
    assert len(set(texts)) == len(texts)


def test_at_least_40_pairs_per_category_and_2000_in_all():
    pairs = _load(CONTRAST)
    per_category = Counter(p["category"] for p in pairs)
    assert len(per_category) >= 12 and min(per_category.values()) >= 40
    assert len(pairs) >= 2000


def test_long_scenarios_are_long_in_every_category_and_twins_match_in_length():
    pairs, short = _load(LONG), _load(CONTRAST)
    assert Counter(p["category"] for p in pairs) == {c: 20 for c in {p["category"] for p in short}}
    assert {p["style"] for p in pairs} == {"long_scenario"}
    for p in pairs:
        h, b = len(p["harmful"].split()), len(p["benign"].split())
        assert 100 <= h <= 280 and 100 <= b <= 280 and max(h, b) <= 1.45 * min(h, b), p["id"]
    assert not _texts(pairs) & _texts(short)


def test_word_sense_pairs_cover_every_category_and_kind_and_are_short():
    pairs, others = _load(WORDS), _load(CONTRAST) + _load(LONG)
    assert Counter(p["category"] for p in pairs) == {c: 30 for c in {p["category"] for p in others}}
    for category in {p["category"] for p in pairs}:
        kinds = Counter(p["benign_kind"] for p in pairs if p["category"] == category)
        assert set(kinds) == WORD_SENSE_KINDS and min(kinds.values()) >= 7, category
    for p in pairs:
        assert all(5 <= len(p[k].split()) <= 45 for k in ("harmful", "benign")), p["id"]
    assert not _texts(pairs) & _texts(others)


def test_overrefusal_pairs_have_60_per_kind_one_file_each_and_no_text_of_the_other_folders():
    files = sorted(OVERREFUSAL.glob("*.jsonl"))
    assert [f.stem for f in files] == ["fictional_privacy", "idiom", "public_role", "safe_target"]
    for f in files:
        pairs = _load_file(f)
        assert [p["id"] for p in pairs] == [f"{f.stem}-{i:03d}" for i in range(1, 61)]
        assert {p["benign_kind"] for p in pairs} == {f.stem}
    ours, others = _load(OVERREFUSAL), _load(CONTRAST) + _load(LONG) + _load(WORDS)
    assert not _texts(ours) & _texts(others)


def test_style_held_out_pairs_use_only_new_styles_three_each_per_category_and_no_text_of_the_others():
    categories = sorted(f.stem for f in CONTRAST.glob("*.jsonl"))
    assert sorted(f.stem for f in NEW_STYLES.glob("*.jsonl")) == categories
    for name in categories:
        pairs = _load_file(NEW_STYLES / f"{name}.jsonl")
        assert [p["id"] for p in pairs] == [f"{name}-style-{i:03d}" for i in range(1, 25)]
        assert {p["category"] for p in pairs} == {name}
        assert [p["style"] for p in pairs] == [s for s in HELD_OUT_STYLES for _ in range(3)]
    ours = _load(NEW_STYLES)
    others = _load(CONTRAST) + _load(LONG) + _load(WORDS) + _load(OVERREFUSAL)
    assert not {p["style"] for p in others} & set(HELD_OUT_STYLES)
    assert not _texts(ours) & _texts(others)
    assert _near_copies([p[k] for p in ours for k in ("harmful", "benign")], _texts(others)) == []


def _content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z0-9']+", text.lower()) if len(w) > 3)


def _near_copies(ours: list[str], theirs: set[str], threshold: float = 0.6) -> list[str]:
    """Texts of ours whose content words (longer than 3 letters) overlap one of theirs by
    Jaccard >= ``threshold``: what the 10-word test misses in prompts shorter than 10 words."""
    index: dict[str, list[frozenset[str]]] = {}
    for t in theirs:
        words = _content_words(t)
        for w in words:
            index.setdefault(w, []).append(words)
    hits = []
    for text in ours:
        mine = _content_words(text)
        candidates = {c for w in mine for c in index.get(w, ())}
        if any(len(mine & c) / len(mine | c) >= threshold for c in candidates):
            hits.append(text)
    return hits


def test_near_copy_check_catches_a_reworded_short_prompt():
    theirs = {"How can I kill a Python process that hangs?"}
    assert _near_copies(["how do i kill a python process"], theirs) == ["how do i kill a python process"]
    assert _near_copies(["how do i stop a frozen browser tab"], theirs) == []


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
    short = [t for t in ours if len(t.split()) <= 45]
    assert _near_copies(short, {b for b in banned if len(b.split()) <= 60}) == []
