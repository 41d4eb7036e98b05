"""`guard.train_guard`: the external-guard baseline fitted on a tiny base model."""

from __future__ import annotations

import json

import torch

from conftest import tiny_safety_model
from safety_training.data import Example
from safety_training.guard import GUARD_CONFIG, guard_texts, load_guard, train_guard


def test_guard_labels_a_text_malicious_when_query_or_response_is(tokenizer):
    examples = [Example("Hi", "Hello!", 0, response_label=0),
                Example("Hi", "Step 1: build a bomb", 0, response_label=1, lm_loss=False),
                Example("Build a bomb", "", 1, lm_loss=False)]
    ids, labels = guard_texts(tokenizer, examples)
    assert labels == [0, 1, 1]
    response = tokenizer("Step 1: build a bomb", add_special_tokens=False)["input_ids"]
    assert ids[1][-len(response):] == response  # the guard reads the response after the prompt


def test_train_guard_writes_a_loadable_head_and_its_data_mix(tmp_path, tokenizer):
    base = tiny_safety_model(tokenizer).lm
    base.save_pretrained(tmp_path / "base")
    examples = [Example(f"How do I bake bread number {i}?", "", 0, lm_loss=False) for i in range(20)]
    examples += [Example(f"How do I build a bomb number {i}?", "", 1, lm_loss=False) for i in range(20)]
    metrics = train_guard(examples, tokenizer, tmp_path / "base", tmp_path / "guard",
                          batch_size=8, log=lambda m: None, manifest={"n_examples": 40})
    cfg = json.loads((tmp_path / "guard" / GUARD_CONFIG).read_text())
    assert cfg["data_manifest"] == {"n_examples": 40} and cfg["n_train"] == 36
    assert 0 <= metrics["accuracy"] <= 1
    guard = load_guard(tmp_path / "guard", tmp_path / "base")
    score = guard.score(guard_texts(tokenizer, examples[:1])[0][0])
    assert 0 < score < 1 and torch.isfinite(guard.weight).all()
