"""The training recipe end to end on a tiny model: loss, masks, checkpoint, validation metrics."""

import json
import random

import pytest
import torch

from conftest import DATA_DIR, tiny_safety_model
from safety_decoding.base_model import weights_sha256
from safety_decoding.data import Example
from safety_decoding.masks import PROBE
from safety_decoding.model import load_safety_model
from safety_decoding.train import (TrainConfig, balanced_batches, collate, encode_example,
                                   load_train_config, train)


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
    for b in balanced_batches(encoded, labels, 4)[:5]:
        assert sorted(labels[i] for i in b) == [0, 0, 1, 1]


def test_collate_mask_hides_probe_from_tokens(tokenizer):
    encs = [encode_example(tokenizer, Example(q, "Answer.", 0, response_label=0), TrainConfig(),
                           random.Random(0)) for q in ("Hi", "A much longer question here?")]
    b = collate(encs)
    probe = (b.kinds == PROBE).nonzero()
    for bi, slot in probe.tolist():
        assert not b.mask[bi, 0, :slot, slot].any()


@pytest.mark.skipif(not DATA_DIR.exists(), reason="../shared/data not present")
def test_train_writes_a_loadable_checkpoint(tmp_path, tokenizer):
    base = tiny_safety_model(tokenizer).lm
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    (base_dir / "WEIGHTS_SHA256").write_text(weights_sha256(base.state_dict()))
    cfg_file = tmp_path / "t.yaml"
    cfg_file.write_text(
        f"data_dir: {DATA_DIR}\noutput_dir: {tmp_path / 'ckpt'}\nn_benign: 12\n"
        "n_benign_query_only: 8\nn_malicious: 12\nn_malicious_query_only: 8\nn_harmful_probe: 4\n"
        "n_jailbreak: 2\nsharegpt_limit: 0\nvalidation_fraction: 0.3\nbatch_size: 4\nlora_r: 2\n")
    summary = train(load_train_config(cfg_file), base_dir, log=lambda m: None)
    assert summary["steps"] > 0 and 0 <= summary["validation"]["query"]["accuracy"] <= 1
    assert "auroc" in summary["validation"]["query"]
    model = load_safety_model(tmp_path / "ckpt", base_dir)
    saved = json.loads((tmp_path / "ckpt" / "ess_config.json").read_text())
    assert saved["data_manifest"]["n_train"] > 0
    assert model.head.weight.abs().sum() > 0 and torch.isfinite(model.cls_embedding).all()


def test_unknown_config_key_is_rejected(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("n_benign: 3\nlearning_rate_typo: 1\n")
    with pytest.raises(ValueError, match="learning_rate_typo"):
        load_train_config(f)
