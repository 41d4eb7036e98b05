"""Shared fixtures: a tiny random Llama with the SmolLM2 tokenizer (milliseconds per step)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Servers the tests start (in process or as `ess serve`) run the eager forward: compiling adds
# 100-150 s to each start on 2 cores. tests/test_compiled.py tests the compiled step.
os.environ.setdefault("ESS_COMPILE", "false")

ASSETS = Path(__file__).parent / "assets"
REPO = Path(__file__).resolve().parent.parent


def _data_dir() -> Path:
    """The fetched data (`ess data fetch`, scripts/test.sh runs it) when complete, else the
    shared copy beside the checkout; tests that need data skip when this does not exist."""
    from safety_training.datasets import default_data_dir, missing_files

    fetched = default_data_dir()
    return fetched if not missing_files(fetched) else REPO.parent / "shared" / "data"


DATA_DIR = _data_dir()


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


class ScriptedHead(torch.nn.Module):
    """Stands in for the safety head: the query score, then one score per re-check.

    ``hidden: (B, H) -> (B, 1)`` logits; the first call after construction or `reset` is the
    prefill verdict.
    """

    def __init__(self, query: float, checks: list[float]):
        super().__init__()
        self.query, self.checks, self.calls = query, list(checks), 0

    def reset(self) -> None:
        self.calls = 0

    def forward(self, hidden):
        i = self.calls
        self.calls += 1
        score = self.query if i == 0 else self.checks[min(i - 1, len(self.checks) - 1)]
        return torch.full(hidden.shape[:1] + (1,), float(score))


def scripted_model(tokenizer, query: float, checks: list[float]):
    """A tiny model whose safety verdicts follow a script (no training needed)."""
    model = tiny_safety_model(tokenizer)
    model.head = ScriptedHead(query, checks)
    return model
