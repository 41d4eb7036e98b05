"""Contrast pairs as training examples (safety_training.contrast) and in the built mix."""

from collections import Counter
from pathlib import Path

import pytest

from conftest import DATA_DIR
from safety_decoding.model import REFUSAL_PREFIX
from safety_training.contrast import SOURCE, contrast_examples, load_pairs
from safety_training.data import eval_texts, normalise
from safety_training.recipe import TrainConfig, training_examples

CONTRAST = Path(__file__).resolve().parents[1] / "data" / "contrast"


@pytest.fixture(scope="module")
def pairs():
    return load_pairs(CONTRAST)


def test_every_pair_of_the_twelve_files_is_loaded(pairs):
    assert len(pairs) == 2040
    assert Counter(p.category for p in pairs) == {c: 170 for c in {p.category for p in pairs}}
    assert len({p.category for p in pairs}) == 12


def test_each_pair_gives_a_harmful_and_a_benign_query_only_example(pairs):
    ex = contrast_examples(pairs, seed=0)
    assert len(ex) == 2 * len(pairs)
    for p, harmful, benign in zip(pairs, ex[0::2], ex[1::2]):
        assert (harmful.query, harmful.query_label, benign.query, benign.query_label) == (p.harmful, 1, p.benign, 0)
        for e in (harmful, benign):
            assert e.response == "" and e.response_label is None and not e.lm_loss
            assert (e.source, e.category, e.pair) == (SOURCE, p.category, p.id)


def test_a_share_of_harmful_requests_gets_the_inserted_refusal(pairs):
    ex = contrast_examples(pairs, seed=0, refusal_percent=30)
    refused = [e for e in ex if e.response]
    assert 0.25 < len(refused) / len(pairs) < 0.35
    for e in refused:
        assert e.query_label == 1 and e.response_label == 0 and e.lm_loss
        assert e.response_prefix.endswith(REFUSAL_PREFIX)  # no LM loss on the prefix itself
    assert [e.query for e in ex if e.query_label == 0 and e.response] == []
    assert contrast_examples(pairs, seed=0, refusal_percent=30) == ex  # stable
    assert len([e for e in contrast_examples(pairs, 0, 100) if e.response]) == len(pairs)


def test_a_malformed_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="contrast_dir"):
        load_pairs(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"id": "x-1", "category": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_pairs(tmp_path)


def _small(**kw) -> TrainConfig:
    return TrainConfig(data_dir=str(DATA_DIR), seed=3, n_benign=20, n_benign_query_only=30,
                       n_malicious=20, n_malicious_query_only=30, n_harmful_probe=6, n_jailbreak=4,
                       sharegpt_limit=0, reframes_per_core=0, **kw)


@pytest.mark.skipif(not DATA_DIR.exists(), reason="the data files are not fetched (ess data fetch)")
def test_contrast_dir_adds_the_pairs_to_the_mix_without_evaluation_text(pairs):
    base, _ = training_examples(_small())
    ex, manifest = training_examples(_small(contrast_dir=str(CONTRAST)))
    contrast = [e for e in ex if e.source == SOURCE]
    assert len(contrast) == 2 * len(pairs) - manifest["dropped_eval_overlap"]["extra"]
    assert len(ex) == len(base) + len(contrast)
    assert Counter(e.query_label for e in contrast) == {0: len(pairs), 1: len(pairs)}
    banned = eval_texts(DATA_DIR)
    assert [e.query for e in contrast if normalise(e.query) in banned] == []
    assert ex[:len(contrast)] != contrast  # shuffled in, so validation gets its share


@pytest.mark.skipif(not DATA_DIR.exists(), reason="the data files are not fetched (ess data fetch)")
def test_contrast_dir_takes_a_list_of_folders_and_files(pairs):
    long_file = CONTRAST.parent / "contrast_long" / "hate.jsonl"
    assert [p.id for p in load_pairs(long_file)] == [f"hate-long-{i:03d}" for i in range(1, 21)]
    ex, _ = training_examples(_small(contrast_dir=[str(CONTRAST), str(long_file)]))
    queries = {e.query for e in ex if e.source == SOURCE}
    assert {t for p in load_pairs(long_file) for t in (p.harmful, p.benign)} <= queries
    assert {p.benign for p in pairs} & queries  # and the folder's pairs
