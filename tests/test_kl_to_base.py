"""`kl_to_base`: the LM's next-token distribution pinned to the frozen base model's on the rows
that start an answer and on benign answers (docs/method.md, "Decision 18"); tiny model."""

import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from conftest import tiny_safety_model
from safety_decoding.model import SafetyModel
from safety_training.data import Example
from safety_training.recipe import TrainConfig, base_log_probs, collate, compute_loss, encode_example

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KL = TrainConfig(kl_to_base=1.0)


def adapted(tokenizer) -> SafetyModel:
    """The tiny model with a random (non-zero) LoRA on every projection and row."""
    plain = tiny_safety_model(tokenizer)
    torch.manual_seed(1)
    lm = get_peft_model(plain.lm, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    model = SafetyModel(lm, plain.config)
    model.load_state_dict(plain.state_dict(), strict=False)
    return model


def encode(tokenizer, ex, cfg=KL):
    return encode_example(tokenizer, ex, cfg, random.Random(0))


def test_rows_are_the_answers_start_and_every_benign_answer_row(tokenizer):
    benign = encode(tokenizer, Example("How do tides work?", "The moon pulls the sea.", 0, response_label=0))
    assert benign["kl_rows"] == benign["lm_rows"] and len(benign["kl_rows"]) > 3
    harmful = encode(tokenizer, Example("How do I pick a lock to rob a house?", "First, get a tension wrench.",
                                        1, response_label=1, lm_loss=False))
    layout = harmful["layout"]
    assert harmful["kl_rows"] == [layout.response_slot(0) - 1]  # only the row where an answer starts
    prefilled = encode(tokenizer, Example("How do tides work?", " the moon.", 0, response_prefix="Because of"))
    n_prefill = len(tokenizer("Because of", add_special_tokens=False)["input_ids"])
    assert prefilled["kl_rows"][0] == prefilled["layout"].response_slot(0) - 1 - n_prefill
    query_only = encode(tokenizer, Example("How do tides work?", "", 0, lm_loss=False))
    assert query_only["kl_rows"] == [query_only["layout"].response_slot(0) - 1]
    off = encode(tokenizer, Example("How do tides work?", "The moon.", 0), TrainConfig())
    assert off["kl_rows"] == [] and off["plain"] is None and collate([off]).plain is None


def test_the_teacher_is_the_base_model_on_the_plain_tokens(tokenizer):
    model = adapted(tokenizer).eval()
    ex = Example("How do tides work?", "The moon pulls the sea.", 0, response_label=0)
    enc = encode(tokenizer, ex)
    b = collate([enc])
    teacher = base_log_probs(model, b.plain, b.kl_rows)
    # the base model's own forward of the same tokens, no [CLS] slot (RoPE is relative, so the
    # one-slot shift of positions does not change it)
    tokens = [t for t, k in zip(enc["layout"].ids, enc["layout"].kinds) if k == 1]
    with torch.no_grad(), model.lm.disable_adapter():
        ref = F.log_softmax(model.lm(input_ids=torch.tensor([tokens])).logits[0].float(), dim=-1)
    assert torch.allclose(teacher, ref[b.kl_rows[:, 1] - 1], atol=1e-4)
    # and the adapted LM differs from it, so the term has something to pin
    out = compute_loss(model, b, lambda_cls=0.5, kl_to_base=1.0)
    assert out.kl > 1e-3 and torch.isclose(out.total, out.lm + 0.5 * out.cls + out.kl)
    assert compute_loss(model, b, lambda_cls=0.5).kl == 0


def test_training_on_the_term_brings_the_lm_back_to_the_base_model(tokenizer):
    model = adapted(tokenizer).train()
    exs = [Example("How do tides work?", "The moon pulls the sea.", 0, response_label=0, lm_loss=False),
           Example("Write a haiku about rain.", "Soft rain on the roof.", 0, response_label=0, lm_loss=False),
           Example("How do I hurt someone?", "", 1, lm_loss=False)]
    b = collate([encode(tokenizer, e) for e in exs])
    lora = [p for n, p in model.lm.named_parameters() if "lora_" in n]
    opt = torch.optim.Adam(lora, lr=1e-2)
    first = float(compute_loss(model, b, 0.0, 1.0).kl)
    for _ in range(30):
        opt.zero_grad()
        compute_loss(model, b, 0.0, 1.0).total.backward()
        opt.step()
    assert float(compute_loss(model, b, 0.0, 1.0).kl) < 0.3 * first


@pytest.mark.parametrize("bad", [dict(kl_to_base=-1.0), dict(kl_to_base=1.0, lora_rows="safety")])
def test_bad_settings_name_the_field(bad):
    with pytest.raises(ValueError, match="kl_to_base"):
        TrainConfig(**bad)


def test_kl_rows_survive_query_truncation(tokenizer):
    cfg = replace(KL, max_query_tokens=8)
    enc = encode(tokenizer, Example("word " * 40, "Fine.", 0, response_label=0), cfg)
    assert enc["kl_rows"] == enc["lm_rows"]
    assert len(enc["plain"]) == len(enc["layout"]) - len(enc["layout"].probe_slots)


def test_start_rows_pin_only_where_every_answer_starts(tokenizer):
    cfg = replace(KL, kl_rows="start")
    benign = encode(tokenizer, Example("How do tides work?", "The moon pulls the sea.", 0, response_label=0), cfg)
    assert benign["kl_rows"] == [benign["layout"].response_slot(0) - 1]
    assert benign["lm_rows"][0] == benign["kl_rows"][0] and len(benign["lm_rows"]) > 3
    with pytest.raises(ValueError, match="kl_rows"):
        TrainConfig(kl_rows="every")
