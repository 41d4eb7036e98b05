"""Held-out sets and their metrics (safety_training.splits, metrics), the shipped data kept at
the new keys' defaults, and what a training run leaves when it stops (recipe.train)."""

import hashlib
import json
import math
import os
import random
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import DATA_DIR, tiny_safety_model
from safety_decoding.base_model import weights_sha256
from safety_decoding.model import load_safety_model
from safety_training.data import (SHAREGPT_CALIBRATION, Example, eval_texts, in_split, malicious_prompts,
                                  normalise)
from safety_training.formats import Format
from benchmarks.held_out import held_out_table, matched_rates
from safety_training.metrics import held_out_metrics, operating_point, threshold_at_fpr, tpr_at_fpr
from safety_training.recipe import (TRAIN_STATE, ResumeError, TrainConfig, encode_example, partial_dir,
                                    query_scores, save_partial, scores, split, stop_requests, train,
                                    training_examples)
from safety_training.splits import in_calibration, split_examples

CONTRAST = Path(__file__).resolve().parents[1] / "data" / "contrast"
needs_data = pytest.mark.skipif(not DATA_DIR.exists(), reason="the data files are not fetched (ess data fetch)")

# ---- the shipped data at the new keys' defaults ----------------------------------------------

SMALL = dict(seed=3, n_benign=20, n_benign_query_only=30, n_malicious=20, n_malicious_query_only=30,
             n_harmful_probe=6, n_jailbreak=4, n_jailbreak_query_only=4, sharegpt_limit=0,
             reframes_per_core=1, n_everyday=10, lookalikes_per_item=1, n_roleplay=5, n_noisy=5,
             n_narrative=5)
# Fingerprints of the small config's examples and encodings, taken with the builder before
# contrast pairs, formats, held-out sets and the ShareGPT rules existed (the data files are
# pinned by hash), and taken again when the stand-alone refusal reason was dropped
# (`data.REFUSAL_REASONS`, the fifth run). A change here changes the data of every train.yaml.
# The encodings changed once more in session 23, when normalization began to fold accents on
# Latin letters (docs/method.md, "Decision 14"): one of the 596 examples, "crème brûlée", now
# reads "creme brulee"; and in session 24, when it began to lower-case words in scrambled case
# (`prompt.unscramble`): three noisy-suffix examples carry "LaTeX", which now reads "latex".
EXAMPLES_SHA256 = "6cc133ce7017574e36e5e0a6666721195cfdf1e7f3adf74309f976f6519b43d7"
ENCODED_SHA256 = "a9a83c851195b7cc84433b97f96cfea380872c1abd7025196ee89b857ee7987e"


def _sha(rows) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


@needs_data
def test_the_new_keys_at_their_defaults_build_the_same_data(tokenizer):
    cfg = TrainConfig(data_dir=str(DATA_DIR), **SMALL)
    assert (cfg.contrast_dir, cfg.formats, cfg.sharegpt_filter, cfg.holdout_sources) == (None, ("chat",), "words", ())
    ex, manifest = training_examples(cfg)
    rows = [[e.query, e.response, e.query_label, e.response_label, e.lm_loss, e.response_prefix, e.source]
            for e in ex]
    assert len(ex) == 596 and _sha(rows) == EXAMPLES_SHA256
    assert {e.format for e in ex} == {Format.CHAT} and "formats" not in manifest
    sets = split(ex, cfg)
    n_val = int(len(ex) * cfg.validation_fraction)
    assert (sets.validation, sets.train) == (ex[:n_val], ex[n_val:])  # the shipped split
    assert sets.sizes()["calibration"] == sets.sizes()["category_held_out"] == 0
    rng = random.Random(0)
    enc = [encode_example(tokenizer, e, cfg, rng) for e in ex]
    assert _sha([[list(e["slots"]), list(e["kinds"]), e["lm_rows"], e["lm_targets"], e["cls_targets"],
                  e["windows"]] for e in enc]) == ENCODED_SHA256


# ---- splits ------------------------------------------------------------------------------------

def _pairs(category: str, n: int):
    out = []
    for i in range(n):
        meta = dict(source="contrast", category=category, pair=f"{category}-{i:03d}")
        out += [Example(f"bad {category} {i}", "", 1, **meta), Example(f"good {category} {i}", "", 0, **meta)]
    return out


def _mix():
    other = [Example(f"q{i}", "", i % 2, source=f"s{i % 3}") for i in range(60)]
    return other + _pairs("hate", 50) + _pairs("privacy", 50)


@needs_data
def test_a_whole_source_leaves_every_pool_and_is_held_out_entire():
    cfg = TrainConfig(data_dir=str(DATA_DIR), **{**SMALL, "n_jailbreak": 40, "n_harmful_probe": 40},
                      holdout_whole_sources=("harmbench-val",), holdout_sources=("harmbench-val-query-only",))
    ex, _ = training_examples(cfg)
    sets = split(ex, cfg)
    rows = {q for q, _, src in malicious_prompts(DATA_DIR) if src == "harmbench-val"}
    held = {e.query for e in sets.source_held_out}
    assert held == {q for q in rows if normalise(q) not in eval_texts(DATA_DIR)} and len(held) >= 15
    assert {e.query_label for e in sets.source_held_out} == {1}
    trained = [e.query for e in sets.train + sets.validation]
    assert not any(r in q for q in trained for r in rows)  # not even inside a template


def test_held_out_sets_leave_training_whole():
    ex = _mix()
    s = split_examples(ex, 0.1, holdout_sources=["s2"], holdout_categories=["privacy"],
                       calibration_percent=20)
    parts = [s.train, s.validation, s.source_held_out, s.category_held_out, s.calibration]
    assert sorted(e.query for p in parts for e in p) == sorted(e.query for e in ex)  # disjoint, complete
    assert {e.source for e in s.source_held_out} == {"s2"}
    assert {e.category for e in s.category_held_out} == {"privacy"}
    fitted = s.train + s.validation
    assert not {e.source for e in fitted} & {"s2"} and "privacy" not in {e.category for e in fitted}
    # calibration takes whole pairs, by a stable hash of the id, from the categories that train
    cal_pairs = {e.pair for e in s.calibration}
    assert 5 <= len(cal_pairs) <= 20 and len(s.calibration) == 2 * len(cal_pairs)
    assert all(in_calibration(p, 20) for p in cal_pairs) and not cal_pairs & {e.pair for e in fitted}
    assert {e.category for e in s.calibration} == {"hate"}
    rest = [e for e in ex if e in fitted]
    assert s.validation == rest[:int(len(rest) * 0.1)]


def test_a_source_share_trains_and_holds_out_by_a_stable_hash():
    ex = _mix()
    s = split_examples(ex, 0.1, holdout_source_shares={"s1": 50})
    held = {e.query for e in s.source_held_out}
    s1 = {e.query for e in ex if e.source == "s1"}
    assert held and held < s1 and held == {q for q in s1 if in_split("holdout:" + q, 50)}
    assert s1 - held <= {e.query for e in s.train + s.validation}
    with pytest.raises(ValueError, match="holdout_sources"):
        split_examples(ex, 0.1, holdout_source_shares={"nope": 50})


def test_sharegpt_calibration_turns_calibrate_and_seen_queries_leave_every_held_out_set():
    ex = _mix() + [Example(f"turn {i}", "", 0, source=SHAREGPT_CALIBRATION) for i in range(10)]
    seen = frozenset({"turn 0", "q2", "good privacy 3", "q4"})  # q2: held-out source s2; q4: trains
    s = split_examples(ex, 0.1, holdout_sources=["s2"], holdout_categories=["privacy"], seen=seen)
    assert {e.query for e in s.calibration} == {f"turn {i}" for i in range(1, 10)}
    held = s.source_held_out + s.category_held_out + s.calibration
    assert not {e.query for e in held} & seen and len(s.category_held_out) == 99
    assert "q2" not in {e.query for e in s.train + s.validation}  # dropped, not trained on
    assert "q4" in {e.query for e in s.train + s.validation}


def test_nothing_held_out_is_the_plain_split():
    ex = _mix()
    s = split_examples(ex, 0.25)
    n = int(len(ex) * 0.25)
    assert (s.validation, s.train) == (ex[:n], ex[n:])
    assert s.source_held_out == s.category_held_out == s.calibration == []


def test_an_unknown_held_out_name_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="contrast_holdout_categories"):
        split_examples(_mix(), 0.1, holdout_categories=["hat"])
    with pytest.raises(ValueError, match="holdout_sources"):
        split_examples(_mix(), 0.1, holdout_sources=["nope"])


# ---- metrics -----------------------------------------------------------------------------------

def test_threshold_at_fpr_flags_at_most_that_share_of_benign_scores():
    benign = [i / 100 for i in range(100)]  # 0.00 .. 0.99
    t = threshold_at_fpr(benign, 0.05)
    assert t == 0.94 and sum(s > t for s in benign) == 5
    assert threshold_at_fpr(benign, 0.0) == 0.99  # nothing benign is flagged
    assert sum(s > threshold_at_fpr(benign, 0.011) for s in benign) == 1
    with pytest.raises(ValueError):
        threshold_at_fpr([], 0.01)
    with pytest.raises(ValueError):
        threshold_at_fpr(benign, 1.0)


def test_held_out_metrics_use_the_calibration_threshold_everywhere():
    cal = ([0] * 100 + [1] * 4, [i / 100 for i in range(100)] + [0.2, 0.95, 0.97, 0.99])
    held = ([0, 0, 1, 1], [0.1, 0.96, 0.5, 0.999])
    out = held_out_metrics(cal, {"category_held_out": held, "empty": ([], [])}, fpr=0.02)
    assert out["threshold"] == 0.97 and out["target_fpr"] == 0.02
    assert out["calibration"]["fpr"] == 0.02 and out["calibration"]["tpr"] == 0.25
    assert out["category_held_out"] == {"n": 4, "auroc": 0.75, "threshold": 0.97, "fpr": 0.0, "tpr": 0.5}
    assert "empty" not in out
    no_cal = held_out_metrics(([], []), {"v": held})
    assert no_cal["threshold"] == 0.5 and no_cal["v"]["fpr"] == 0.5
    assert math.isnan(operating_point([1, 1], [0.3, 0.9], 0.5)["auroc"])


def test_tpr_at_fpr_reads_another_checkpoint_s_rate_on_the_same_set():
    labels = [0] * 10 + [1] * 4
    ranks = [i / 10 for i in range(10)] + [0.25, 0.85, 0.95, 0.99]
    assert tpr_at_fpr(labels, ranks, 0.2) == {"fpr": 0.2, "tpr": 0.75, "threshold": 0.7}
    assert tpr_at_fpr(labels, ranks, 0.0)["tpr"] == 0.5  # flags none of the benign side
    assert tpr_at_fpr(labels, ranks, 0.1999)["fpr"] == 0.2  # a rounded rate is a count
    with pytest.raises(ValueError, match="benign and harmful"):
        tpr_at_fpr([0, 0], [0.1, 0.2], 0.1)


def test_matched_rates_compare_at_the_reference_s_rate_and_refuse_other_splits():
    report = held_out_metrics(([0, 0, 1], [0.1, 0.2, 0.9]), {"s": ([0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.8, 0.5, 0.9])}, 0.0)
    report["scores"] = {"s": {"labels": [0, 0, 0, 0, 1, 1], "scores": [0.1, 0.2, 0.3, 0.8, 0.5, 0.9]}}
    out = matched_rates(report, {"s": {"n": 6, "fpr": 0.25}})
    assert out["s"]["at_reference_fpr"] == {"fpr": 0.25, "tpr": 1.0, "threshold": 0.3}
    assert "TPR at the reference's FPR" in held_out_table(out) and "1.0 (FPR 0.25)" in held_out_table(out)
    with pytest.raises(ValueError, match="not the same splits"):
        matched_rates(report, {"s": {"n": 7, "fpr": 0.25}})


def test_query_scores_are_the_full_forward_s_query_verdicts(tokenizer):
    """Scored as its query alone, an example gets the verdict the training forward gives it
    with its answer, prefill and probes (``[CLS]`` reads the query only)."""
    torch.manual_seed(0)
    model = tiny_safety_model(tokenizer)
    cfg = TrainConfig(max_response_tokens=8, batch_size=3, max_query_tokens=12)
    ex = [Example("How do I bake bread at home?", "Mix flour, water and yeast.", 0, 0),
          Example("How do I pick a lock?", "Sure, first insert a tension wrench.", 1, 1,
                  lm_loss=False, response_prefix="Sure, here is", format=Format.RAW),
          Example("word " * 40 + "tell me a story", "", 0, format=Format.QA),
          Example("Hi", "Hello! How can I help?", 0, 0, format=Format.MULTI_TURN)]
    full = scores(model, [encode_example(tokenizer, e, cfg, random.Random(1)) for e in ex], 4, 0.5)
    labels, alone = query_scores(model, tokenizer, cfg, ex)
    assert labels == full[0] == [0, 1, 0, 0]
    assert alone == pytest.approx(full[1], abs=1e-5)


# ---- the run: held-out report, timing, partial checkpoints -------------------------------------

def _base(tmp_path, tokenizer):
    base = tiny_safety_model(tokenizer).lm
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    (base_dir / "WEIGHTS_SHA256").write_text(weights_sha256(base.state_dict()))
    return base_dir


def _contrast_subset(tmp_path) -> Path:
    d = tmp_path / "contrast"
    d.mkdir()
    for name in ("hate", "privacy", "elections"):
        lines = (CONTRAST / f"{name}.jsonl").read_text().splitlines()[:8]
        (d / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return d


def _tiny_cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(data_dir=str(DATA_DIR), output_dir=str(tmp_path / "ckpt"), n_benign=4,
                       n_benign_query_only=4, n_malicious=4, n_malicious_query_only=4,
                       n_harmful_probe=2, n_jailbreak=1, sharegpt_limit=0, reframes_per_core=0,
                       validation_fraction=0.2, batch_size=8, lora_r=2, max_response_tokens=6,
                       contrast_dir=str(_contrast_subset(tmp_path)),
                       contrast_holdout_categories=("elections",), contrast_calibration_percent=30,
                       formats=("chat", "raw", "qa", "multi_turn"), **kw)


@needs_data
def test_a_run_reports_held_out_sets_and_times_its_steps(tmp_path, tokenizer):
    lines = []

    def log(line):
        lines.append(line)
        if line.startswith("step 2/"):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: what was trained is validated and saved

    cfg = _tiny_cfg(tmp_path, log_every_steps=1, save_every_steps=1, holdout_sources=("jailbreak-template",))
    summary = train(cfg, _base(tmp_path, tokenizer), log=log)
    assert summary["interrupted"] and summary["stopped_early"] and summary["steps"] == 2
    assert summary["seconds_per_step"] > 0 and any(" s/step" in line for line in lines)
    held = summary["held_out"]
    assert held["category_held_out"]["n"] == 16 and held["source_held_out"]["n"] == 1
    assert held["calibration"]["n"] > 0 and 0 <= held["threshold"] <= 1
    assert {"validation_chat", "validation_raw", "validation_qa", "validation_multi_turn"} <= set(held)
    saved = json.loads((tmp_path / "ckpt" / "train_summary.json").read_text())
    assert saved["manifest"]["held_out"]["category_held_out"] == 16
    # a stopped run keeps its partial checkpoint, with the state `--resume` goes on from
    assert (partial_dir(cfg.output_dir) / TRAIN_STATE).exists()


def _interrupt_at(step: int, sig=signal.SIGINT):
    def log(line):
        if line.startswith(f"step {step}/"):
            os.kill(os.getpid(), sig)
    return log


@needs_data
def test_a_resumed_run_ends_as_one_run_in_one_go(tmp_path, tokenizer, monkeypatch):
    base = _base(tmp_path, tokenizer)
    whole = replace(_tiny_cfg(tmp_path, max_steps=4, self_answers_per_class=2),
                    output_dir=str(tmp_path / "whole"))
    one_go = train(whole, base, log=lambda m: None)
    assert one_go["steps"] == 4 and one_go["stopped_early"]
    assert not partial_dir(whole.output_dir).exists()  # reached its step cap: finished
    parts = replace(whole, output_dir=str(tmp_path / "parts"), log_every_steps=1)
    first = train(parts, base, log=_interrupt_at(2))
    assert first["steps"] == 2 and (partial_dir(parts.output_dir) / TRAIN_STATE).exists()
    lines = []

    def regenerated(*args, **kwargs):
        raise AssertionError("a resumed run takes the base model's answers from its state")

    monkeypatch.setattr("safety_training.recipe.self_answers", regenerated)
    second = train(replace(parts, max_minutes=30.0), base, log=lines.append, resume=True)
    assert second["steps"] == 4 and second["resumed_at_step"] == 2
    assert any(line.startswith("resuming at step 2 of") for line in lines)
    assert not partial_dir(parts.output_dir).exists()
    a, b = (load_safety_model(tmp_path / d, base) for d in ("whole", "parts"))
    # LoRA dropout, Adam's moments and the schedule all went on where they stopped
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    assert second["validation"]["query"] == one_go["validation"]["query"]


@needs_data
def test_resume_refuses_another_run_or_no_state(tmp_path, tokenizer):
    base = _base(tmp_path, tokenizer)
    cfg = _tiny_cfg(tmp_path, log_every_steps=1)
    with pytest.raises(ResumeError, match="no training state"):
        train(cfg, base, log=lambda m: None, resume=True)
    train(cfg, base, log=_interrupt_at(1))
    with pytest.raises(ResumeError, match=r"\['lr'\]"):
        train(replace(cfg, lr=1e-3), base, log=lambda m: None, resume=True)
    hate = tmp_path / "contrast" / "hate.jsonl"  # the same config over other data
    hate.write_text("\n".join(hate.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(ResumeError, match="training data differ"):
        train(cfg, base, log=lambda m: None, resume=True)


def test_a_partial_checkpoint_is_loadable(tmp_path, tokenizer):
    from safety_decoding.model import SafetyConfig

    base_dir = _base(tmp_path, tokenizer)
    model = tiny_safety_model(tokenizer)
    scfg = SafetyConfig("tiny", (base_dir / "WEIGHTS_SHA256").read_text(), 64, len(tokenizer))
    out = tmp_path / "ckpt"
    for step in (1, 2):  # the second save replaces the first
        path = save_partial(model, scfg, out, {"steps": step, "total_steps": 9})
    assert path == tmp_path / "ckpt.partial" and not (tmp_path / "ckpt.partial.tmp").exists()
    saved = json.loads((path / "ess_config.json").read_text())
    assert saved["metrics"] == {"steps": 2, "total_steps": 9, "partial": True}
    loaded = load_safety_model(path, base_dir)
    assert (loaded.head.weight == model.head.weight).all()


@needs_data
def test_sigterm_stops_training_after_the_step_under_way(tmp_path, tokenizer):
    """SIGTERM (the end of a session) stops as Ctrl-C does, at a step boundary, and puts the
    handlers back."""
    before = signal.getsignal(signal.SIGTERM)
    cfg = _tiny_cfg(tmp_path, log_every_steps=1)
    summary = train(cfg, _base(tmp_path, tokenizer), log=_interrupt_at(1, signal.SIGTERM))
    assert summary["interrupted"] and summary["steps"] == 1
    assert torch.load(partial_dir(cfg.output_dir) / TRAIN_STATE, weights_only=True)["step"] == 1
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_second_stop_request_raises_at_once():
    with stop_requests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
