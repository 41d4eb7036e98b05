"""`LoraRows.SAFETY`: the adapter runs on the [CLS] and probe rows only, so the language model
is exactly the base model (docs/method.md, "Decision 17"); tiny model."""

import random
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_safety_model
from safety_decoding.base_model import weights_sha256
from safety_decoding.decode import Decoder, GenerationRequest
from safety_decoding.layout import sequence_layout, stack_layouts
from safety_decoding.masks import CLS
from safety_decoding.model import SafetyModel, load_safety_model, read_safety_config
from safety_decoding.policy import SafetyParams
from safety_decoding.prompt import build_chat_prompt
from safety_decoding.sampling import SamplingParams
from safety_decoding.types import LoraRows
from safety_training.data import Example
from safety_training.recipe import TrainConfig, encode_example

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted(tokenizer, rows: LoraRows) -> SafetyModel:
    """The tiny model with a random (non-zero) LoRA on every projection."""
    plain = tiny_safety_model(tokenizer)
    torch.manual_seed(1)
    lm = get_peft_model(plain.lm, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    model = SafetyModel(lm, replace(plain.config, lora_rows=rows.value))
    model.load_state_dict(plain.state_dict(), strict=False)  # the same [CLS] row and head
    return model.eval()


def forward(model, tokenizer, tokens_read_cls: bool):
    """Hidden states ``(L, H)`` of [CLS] + prompt + a short response, one sequence."""
    prompt = build_chat_prompt(tokenizer, QUESTION)
    resp = tokenizer("Paris is the capital.", add_special_tokens=False)["input_ids"]
    slots = stack_layouts([sequence_layout(prompt.ids, prompt.query_mask, resp,
                                           tokens_read_cls=tokens_read_cls).with_probes(1)])
    with torch.no_grad():
        hidden, _ = model.hidden_states(slots.ids, slots.kinds, slots.positions, slots.mask())
    return hidden[0], slots.kinds[0]


def test_token_rows_are_the_base_model_and_safety_rows_are_adapted(tokenizer):
    model = adapted(tokenizer, LoraRows.SAFETY)
    hidden, kinds = forward(model, tokenizer, tokens_read_cls=False)
    with model.lm.disable_adapter():
        base, _ = forward(model, tokenizer, tokens_read_cls=False)
    tokens = kinds == 1
    assert torch.allclose(hidden[tokens], base[tokens], atol=1e-6)
    assert not torch.allclose(hidden[~tokens], base[~tokens], atol=1e-3)  # [CLS] and the probe
    # the same adapter on every row changes the token rows: the test can fail
    everywhere, _ = forward(adapted(tokenizer, LoraRows.ALL), tokenizer, tokens_read_cls=False)
    assert not torch.allclose(everywhere[tokens], base[tokens], atol=1e-3)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_decoding_with_checks_writes_the_base_models_tokens(tokenizer, fused):
    model = adapted(tokenizer, LoraRows.SAFETY)
    safety = SafetyParams.from_config(model.config, threshold=0.99, action="monitor")
    assert not safety.tokens_read_cls
    prompt = build_chat_prompt(tokenizer, QUESTION)

    def ids(m, params):
        steps = Decoder(m, tokenizer, fused=fused).generate([GenerationRequest(prompt, SamplingParams(max_new_tokens=16), params)])
        return [t.id for step in steps for e in step for t in e.tokens]

    checked = ids(model, safety)
    with model.lm.disable_adapter():
        plain = ids(model, SafetyParams(enabled=False))
    assert checked == plain and len(plain) == 16


@pytest.mark.parametrize("rows, merged", [(LoraRows.SAFETY, False), (LoraRows.ALL, True)])
def test_checkpoint_keeps_the_rows_and_merges_only_an_every_row_adapter(tmp_path, tokenizer, rows, merged):
    model = adapted(tokenizer, rows)
    base_dir, plain = tmp_path / "base", tiny_safety_model(tokenizer).lm  # the same base weights
    plain.save_pretrained(base_dir)
    sha = weights_sha256(plain.state_dict())
    (base_dir / "WEIGHTS_SHA256").write_text(sha + "\n")
    model.save_checkpoint(tmp_path / "ckpt", replace(model.config, base_model_sha256=sha))
    loaded = load_safety_model(tmp_path / "ckpt", base_dir)
    assert read_safety_config(tmp_path / "ckpt").lora_rows == rows.value
    assert hasattr(loaded.lm, "peft_config") != merged
    a, _ = forward(model, tokenizer, tokens_read_cls=rows == LoraRows.ALL)
    b, _ = forward(loaded, tokenizer, tokens_read_cls=rows == LoraRows.ALL)
    assert torch.allclose(a, b, atol=1e-2)  # the adapter is stored in float16


def test_training_examples_for_safety_rows_have_no_lm_loss_and_no_cls_readers(tokenizer):
    ex = Example("How do I bake bread?", "Mix flour and water.", 0, response_label=0)
    every = encode_example(tokenizer, ex, TrainConfig(), random.Random(0))
    safety = encode_example(tokenizer, ex, TrainConfig(lora_rows="safety"), random.Random(0))
    assert every["lm_targets"] and any(every["layout"].reads_cls)
    assert safety["lm_targets"] == [] and not any(safety["layout"].reads_cls)
    assert safety["kinds"][0] == CLS and safety["cls_targets"] == every["cls_targets"]
    with pytest.raises(ValueError, match="lora_rows"):
        TrainConfig(lora_rows="tokens")


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_fused_forward_runs_the_adapter_on_the_safety_rows_only(tokenizer, quantization):
    model = adapted(tokenizer, LoraRows.SAFETY)
    eager, kinds = forward(model, tokenizer, tokens_read_cls=False)
    assert model.use_fused_forward(True, quantization)
    try:
        fused, _ = forward(model, tokenizer, tokens_read_cls=False)
    finally:
        model.use_fused_forward(False)
    if quantization == "none":
        assert torch.allclose(fused, eager, atol=1e-4)
    else:  # int8 rounds every product: each row (the probe's too) stays close
        assert torch.nn.functional.cosine_similarity(fused, eager).min() > 0.99
    assert not adapted(tokenizer, LoraRows.ALL).use_fused_forward(True)  # an every-row adapter must merge first
