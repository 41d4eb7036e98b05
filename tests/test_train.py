"""The training recipe end to end on a tiny model: loss, masks, checkpoint, validation metrics."""

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import DATA_DIR, tiny_safety_model
from safety_decoding.base_model import weights_sha256
from safety_training.data import Example
from safety_decoding.masks import PROBE
from safety_decoding.model import load_safety_model
from safety_training.recipe import (TrainConfig, balanced_batches, collate, encode_example,
                                   load_train_config, self_answers, train, with_self_answers)

REPO = Path(__file__).resolve().parent.parent


def test_encode_marks_lm_targets_and_probe_window(tokenizer):
    cfg = TrainConfig(probe_window=(3, 3))
    ex = Example("How do I bake bread?", "Mix flour and water.", 0, response_label=0,
                 response_prefix="Sure,")
    enc = encode_example(tokenizer, ex, cfg, random.Random(0))
    resp = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert enc["lm_targets"] == resp  # the prefill text gets no LM loss
    assert [enc["slots"][r + 1] for r in enc["lm_rows"]] == resp
    assert enc["kinds"][-1] == PROBE and enc["cls_targets"] == [0.0, 0.0]
    (lo, hi), = enc["windows"]
    assert hi - lo == 3 and lo >= len(enc["slots"]) - 1 - len(resp) - 2  # inside the response


def test_harmful_text_never_gets_lm_loss(tokenizer):
    ex = Example("q", "harmful text here", 1, response_label=1, lm_loss=False)
    enc = encode_example(tokenizer, ex, TrainConfig(), random.Random(0))
    assert enc["lm_targets"] == [] and enc["cls_targets"] == [1.0, 1.0]


def test_balanced_batches_mix_classes(tokenizer):
    encoded = [{"slots": [0] * (5 + i)} for i in range(20)]
    labels = [i % 2 for i in range(20)]
    batches = balanced_batches(encoded, labels, 4)
    assert len(batches) == 5 and sorted(i for b in batches for i in b) == list(range(20))
    for b in batches:
        assert sorted(labels[i] for i in b) == [0, 0, 1, 1]


def test_balanced_batches_keep_the_global_mix_when_classes_differ(tokenizer):
    encoded = [{"slots": [0] * (40 - i)} for i in range(40)]
    labels = [int(i % 4 == 0) for i in range(40)]  # 30 benign, 10 malicious
    batches = balanced_batches(encoded, labels, 4)
    assert sorted(i for b in batches for i in b) == list(range(40))
    assert [sorted(labels[i] for i in b) for b in batches] == [[0, 0, 0, 1]] * 10
    lengths = [sorted(len(encoded[i]["slots"]) for i in b if labels[i] == 0) for b in batches]
    assert lengths == sorted(lengths)  # still grouped by length


def test_collate_mask_hides_probe_from_tokens(tokenizer):
    encs = [encode_example(tokenizer, Example(q, "Answer.", 0, response_label=0), TrainConfig(),
                           random.Random(0)) for q in ("Hi", "A much longer question here?")]
    b = collate(encs)
    probe = (b.kinds == PROBE).nonzero()
    for bi, slot in probe.tolist():
        assert not b.mask[bi, 0, :slot, slot].any()


def tiny_base_dir(tmp_path, tokenizer):
    """A prepared-base-model folder holding the tiny random Llama and the tokenizer."""
    base = tiny_safety_model(tokenizer).lm
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    (base_dir / "WEIGHTS_SHA256").write_text(weights_sha256(base.state_dict()))
    return base_dir


@pytest.mark.skipif(not DATA_DIR.exists(), reason="the data files are not fetched (ess data fetch)")
def test_train_writes_a_loadable_checkpoint(tmp_path, tokenizer):
    base_dir = tiny_base_dir(tmp_path, tokenizer)
    cfg_file = tmp_path / "t.yaml"
    cfg_file.write_text(
        f"data_dir: {DATA_DIR}\noutput_dir: {tmp_path / 'ckpt'}\nn_benign: 12\n"
        "n_benign_query_only: 8\nn_malicious: 12\nn_malicious_query_only: 8\nn_harmful_probe: 4\n"
        "n_jailbreak: 2\nsharegpt_limit: 0\nvalidation_fraction: 0.3\nbatch_size: 4\nlora_r: 2\n"
        "self_answers_per_class: 2\nmax_response_tokens: 6\n")
    summary = train(load_train_config(cfg_file), base_dir, log=lambda m: None)
    assert summary["steps"] > 0 and 0 <= summary["validation"]["query"]["accuracy"] <= 1
    assert "auroc" in summary["validation"]["query"]
    model = load_safety_model(tmp_path / "ckpt", base_dir)
    saved = json.loads((tmp_path / "ckpt" / "ess_config.json").read_text())
    assert saved["data_manifest"]["n_train"] > 0
    assert sum(saved["data_manifest"]["self_answers"].values()) == 4
    assert model.head.weight.abs().sum() > 0 and torch.isfinite(model.cls_embedding).all()


def test_self_answers_become_probed_responses_with_the_query_label():
    examples = [Example(f"benign {i}", "", 0, lm_loss=False, source="b") for i in range(3)]
    examples += [Example(f"harmful {i}", "", 1, lm_loss=False, source="m") for i in range(3)]
    examples.append(Example("answered", "An answer.", 0, response_label=0, source="a"))
    answer = {"benign": "Here you go.", "harmful": "I cannot help with that."}
    out, counts = with_self_answers(
        examples, lambda qs: [answer["harmful"] if q.startswith("harmful 0") else "Step 1: ..."
                              if q.startswith("harmful") else answer["benign"] for q in qs],
        n_per_class=3, rng=random.Random(0))
    assert counts == {"benign": 3, "malicious": 2, "skipped": 1}
    by_query = {e.query: e for e in out}
    assert by_query["harmful 0"] == examples[3]  # a refusal is not harmful text: left query-only
    for q, label in (("benign 1", 0), ("harmful 2", 1)):
        e = by_query[q]
        assert e.response and e.response_label == label and not e.lm_loss
        assert e.source.endswith("-self-answer")
    assert by_query["answered"] == examples[-1]  # only query-only examples are picked


def test_preferred_sources_fill_the_quota_first():
    examples = [Example(f"easy {i}", "", 0, lm_loss=False, source="easy") for i in range(6)]
    examples += [Example(f"hard {i}", "", 0, lm_loss=False, source="lookalike") for i in range(2)]
    examples += [Example(f"bad {i}", "", 1, lm_loss=False, source="bad") for i in range(3)]
    out, counts = with_self_answers(examples, lambda qs: ["An answer."] * len(qs), n_per_class=3,
                                    rng=random.Random(0), prefer=("lookalike",))
    answered = [e.query for e in out if e.response]
    assert counts == {"benign": 3, "malicious": 3, "skipped": 0}
    assert {"hard 0", "hard 1"} <= set(answered)  # both preferred, plus one drawn at random
    assert sum(q.startswith("easy") for q in answered) == 1


def test_self_answers_keep_input_order(tokenizer, tiny_model):
    queries = ["Hi", "A much longer question about bread and butter?", "Why?"]
    got = self_answers(tiny_model.lm, tokenizer, queries, max_new_tokens=4, batch_size=1)
    assert got == self_answers(tiny_model.lm, tokenizer, queries[::-1], 4, batch_size=1)[::-1]
    assert len(got) == 3 and all(isinstance(a, str) for a in got)


def test_unknown_config_key_is_rejected(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("n_benign: 3\nlearning_rate_typo: 1\n")
    with pytest.raises(ValueError, match="learning_rate_typo"):
        load_train_config(f)


def test_benign_self_answers_get_lm_loss_when_asked_but_never_refusals_or_harm():
    examples = [Example("benign a", "", 0, lm_loss=False), Example("benign b", "", 0, lm_loss=False),
                Example("harmful", "", 1, lm_loss=False)]
    answers = {"benign a": "Here is a recipe.", "benign b": "I'm sorry, but I cannot help with that.",
               "harmful": "Step 1: ..."}
    out, _ = with_self_answers(examples, lambda qs: [answers[q] for q in qs], n_per_class=2,
                               rng=random.Random(0), benign_lm_loss=True)
    by_query = {e.query: e for e in out}
    assert by_query["benign a"].lm_loss and by_query["benign a"].response_label == 0
    assert not by_query["benign b"].lm_loss  # a refusal is never an LM target
    assert not by_query["harmful"].lm_loss


def tiny_run_config() -> str:
    """The YAML of a training run small enough for a test (a few steps on the tiny model)."""
    return (f"data_dir: {DATA_DIR}\nn_benign: 6\nn_benign_query_only: 4\nn_malicious: 6\n"
            "n_malicious_query_only: 4\nn_harmful_probe: 2\nn_jailbreak: 0\nsharegpt_limit: 0\n"
            "validation_fraction: 0.3\nbatch_size: 4\nlora_r: 2\nmax_response_tokens: 6\n")


@pytest.mark.skipif(not DATA_DIR.exists(), reason="the data files are not fetched (ess data fetch)")
def test_warm_start_and_calibrated_threshold(tmp_path, tokenizer):
    from safety_decoding.model import REFUSAL_COMPLETION, read_safety_config

    base_dir = tiny_base_dir(tmp_path, tokenizer)
    common = tiny_run_config()
    first = tmp_path / "first.yaml"
    first.write_text(common + f"output_dir: {tmp_path / 'first'}\n")
    train(load_train_config(first), base_dir, log=lambda m: None)
    second = tmp_path / "second.yaml"
    second.write_text(common + f"output_dir: {tmp_path / 'second'}\ninit_checkpoint: {tmp_path / 'first'}\n"
                      f"lr: 0.0\nhead_lr: 0.0\ncontrast_dir: {REPO / 'data' / 'contrast'}\n"
                      "contrast_calibration_percent: 3\nthreshold_from_calibration: true\n"
                      "calibration_fpr: 0.1\nrefusal_reasons: none\n")
    summary = train(load_train_config(second), base_dir, log=lambda m: None)
    one, two = (load_safety_model(tmp_path / d, base_dir) for d in ("first", "second"))
    # a zero learning rate keeps the warm start's weights: the head and [CLS] row are loaded
    assert torch.equal(one.head.weight, two.head.weight)
    assert torch.equal(one.cls_embedding, two.cls_embedding)
    cfg = read_safety_config(tmp_path / "second")
    assert cfg.threshold == summary["held_out"]["threshold"] != 0.5
    assert summary["held_out"]["calibration"]["fpr"] <= 0.1
    # a run that trains no refusal text has its server write the whole refusal
    assert cfg.refusal_completion == REFUSAL_COMPLETION
    assert read_safety_config(tmp_path / "first").refusal_completion == ""


@pytest.mark.skipif(not DATA_DIR.exists(), reason="the data files are not fetched (ess data fetch)")
def test_data_order_seed_changes_the_batch_order_not_the_splits(tmp_path, tokenizer):
    base_dir = tiny_base_dir(tmp_path, tokenizer)
    common = tiny_run_config()
    runs = {}
    for name, extra in (("a", ""), ("b", "data_order_seed: 3\n")):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(common + f"output_dir: {tmp_path / name}\n" + extra)
        train(load_train_config(cfg), base_dir, log=lambda m: None)
        saved = json.loads((tmp_path / name / "ess_config.json").read_text())
        runs[name] = (load_safety_model(tmp_path / name, base_dir), saved["data_manifest"])
    (one, manifest_a), (two, manifest_b) = runs["a"], runs["b"]
    assert manifest_a == manifest_b  # the same splits and examples
    # the same examples in another order: Adam's steps differ, so the head does
    assert not torch.equal(one.head.weight, two.head.weight)


def test_clause_reasons_drop_the_sentences_that_refuse_by_themselves():
    from safety_training.data import (REFUSAL_CLAUSES, REFUSAL_REASONS, ReasonStyle, refused,
                                      with_reason_style)
    from safety_training.refusals import is_refusal
    rng = random.Random(0)
    ex = [refused(f"harmful request {i}", rng, after_opener=i % 2 == 1) for i in range(40)]
    ex.append(Example("q", " " + REFUSAL_REASONS[0], 0))  # no inserted refusal: left alone
    assert with_reason_style(ex, ReasonStyle.SENTENCES) is ex
    out = with_reason_style(ex, ReasonStyle.CLAUSES)
    assert [e.response for e in out[:-1]] == [" " + REFUSAL_CLAUSES[e.response[1:]] for e in ex[:-1]]
    assert out[-1] is ex[-1]
    assert [(e.query, e.response_prefix, e.query_label, e.lm_loss) for e in out] == \
        [(e.query, e.response_prefix, e.query_label, e.lm_loss) for e in ex]
    assert set(REFUSAL_CLAUSES) == set(REFUSAL_REASONS)
    for clause in REFUSAL_CLAUSES.values():  # no sentence of a clause reads as a refusal alone
        assert not any(is_refusal(s) for s in clause.split(". ")), clause
    with pytest.raises(ValueError, match="refusal_reasons"):
        TrainConfig(refusal_reasons="short")


def test_no_reasons_leave_no_refusal_text_with_lm_loss():
    from safety_training.data import REFUSAL_REASONS, ReasonStyle, refused, with_reason_style
    rng = random.Random(0)
    ex = [refused(f"harmful request {i}", rng, after_opener=i % 2 == 1) for i in range(10)]
    ex += [Example("hi", "I'm sorry, but I cannot help with that.", 0, response_label=0),
           Example("capital of France?", "Paris.", 0, response_label=0),
           Example("q", " " + REFUSAL_REASONS[0], 0, lm_loss=False)]
    out = with_reason_style(ex, ReasonStyle.NONE)
    assert [e.lm_loss for e in out] == [False] * 11 + [True, False]
    # the text stays as context for the probe windows; only the LM targets go
    assert [(e.query, e.response, e.response_prefix, e.query_label, e.response_label) for e in out] == \
        [(e.query, e.response, e.response_prefix, e.query_label, e.response_label) for e in ex]
