"""Checkpoint format: save, load against the right base, clear errors otherwise."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_safety_model
from safety_decoding.base_model import weights_sha256
from safety_decoding.model import (CHECKPOINT_CONFIG, SAFETY_WEIGHTS, CheckpointError, SafetyConfig,
                                   SafetyModel, load_safety_model)


@pytest.fixture()
def saved(tmp_path, tokenizer):
    base = tiny_safety_model(tokenizer).lm
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    sha = weights_sha256(base.state_dict())
    (base_dir / "WEIGHTS_SHA256").write_text(sha + "\n")
    lm = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model = SafetyModel(lm, SafetyConfig("tiny", sha, 64, len(tokenizer)))
    torch.nn.init.normal_(model.head.weight)
    ckpt = tmp_path / "ckpt"
    model.save_checkpoint(ckpt)
    return model, base_dir, ckpt


def test_roundtrip_keeps_head_and_cls(saved):
    model, base_dir, ckpt = saved
    loaded = load_safety_model(ckpt, base_dir)
    assert torch.equal(loaded.head.weight, model.head.weight)
    assert torch.equal(loaded.cls_embedding, model.cls_embedding)
    assert (ckpt / "adapter" / "adapter_config.json").exists()


def test_wrong_base_model_is_named(saved):
    _, base_dir, ckpt = saved
    (base_dir / "WEIGHTS_SHA256").write_text("0" * 64 + "\n")
    with pytest.raises(CheckpointError, match="base model mismatch"):
        load_safety_model(ckpt, base_dir)


def test_corrupt_head_file_is_named(saved):
    _, base_dir, ckpt = saved
    (ckpt / SAFETY_WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=SAFETY_WEIGHTS):
        load_safety_model(ckpt, base_dir)


def test_corrupt_config_is_named(saved):
    _, base_dir, ckpt = saved
    (ckpt / CHECKPOINT_CONFIG).write_text("{ nope")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_safety_model(ckpt, base_dir)
    (ckpt / CHECKPOINT_CONFIG).write_text(json.dumps({"unexpected": 1}))
    with pytest.raises(CheckpointError):
        load_safety_model(ckpt, base_dir)
