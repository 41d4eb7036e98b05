"""Shared fixtures: a tiny random Llama with the SmolLM2 tokenizer (milliseconds per step)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"
REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ASSETS / "smollm2-tokenizer"))


def tiny_safety_model(tokenizer, seed: int = 0):
    """A 2-layer random Llama (hidden 64) wrapped as a `SafetyModel` with a random head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safety_decoding.model import SafetyConfig, SafetyModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    lm = LlamaForCausalLM(cfg).eval()
    model = SafetyModel(lm, SafetyConfig("tiny-random-llama", "none", 64, len(tokenizer)))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return tiny_safety_model(tokenizer)
