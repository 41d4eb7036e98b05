"""Sampling parameters and next-token selection through transformers logits processors."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from .types import ParameterError

MAX_STOP_STRINGS = 8


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop (names follow TGI / vLLM)."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens (refusal text included), 1..4096."""
    do_sample: bool = False
    """False: greedy (argmax after repetition penalty)."""
    temperature: float = 1.0
    """> 0; only used when sampling."""
    top_p: float = 1.0
    """(0, 1]; nucleus sampling."""
    top_k: int = 0
    """0 disables top-k."""
    repetition_penalty: float = 1.0
    """> 0; 1.0 disables (CTRL-style, as transformers)."""
    seed: int | None = None
    """Per-request generator seed: the same seed gives the same text."""
    stop: tuple[str, ...] = ()
    """Stop strings; generation ends before the first match, which is never returned."""
    ignore_eos: bool = False
    """Keep generating past EOS (vLLM's flag; benchmarks use it for fixed lengths)."""

    def __post_init__(self):
        if not 1 <= self.max_new_tokens <= 4096:
            raise ParameterError("max_new_tokens", "must be between 1 and 4096")
        if not self.temperature > 0:
            raise ParameterError("temperature", "must be > 0")
        if not 0 < self.top_p <= 1:
            raise ParameterError("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise ParameterError("top_k", "must be >= 0")
        if not self.repetition_penalty > 0:
            raise ParameterError("repetition_penalty", "must be > 0")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ParameterError("seed", "must be in [0, 2**63)")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise ParameterError("stop", f"at most {MAX_STOP_STRINGS} non-empty strings")


def logits_processors(p: SamplingParams) -> LogitsProcessorList:
    """The transformers processors for one request, in ``generate()``'s order."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.do_sample:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(p.top_p))
    return procs


def make_generator(p: SamplingParams) -> torch.Generator:
    """A per-request generator; without a seed, a fresh random one (global RNG untouched)."""
    g = torch.Generator()
    g.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
    return g


def select_token(logits: torch.Tensor, history: torch.Tensor, p: SamplingParams,
                 procs: LogitsProcessorList, generator: torch.Generator) -> tuple[int, float]:
    """Pick the next token for one sequence.

    Args:
        logits: ``(V,)`` float next-token logits.
        history: ``(n,)`` long, prompt + generated ids (for the repetition penalty); may be
            None when ``procs`` is empty.

    Returns:
        ``(token_id, logprob)`` with the log-probability under the processed distribution.
    """
    scores = logits.float()
    if procs:
        scores = procs(history.unsqueeze(0), scores.unsqueeze(0))[0]
    logprobs = torch.log_softmax(scores, -1)
    if p.do_sample:
        token = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
    else:
        token = int(scores.argmax())
    return token, float(logprobs[token])
