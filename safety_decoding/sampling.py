"""Sampling parameters and next-token selection through transformers logits processors.

Numerically safe on every route (the rules are here, so the TGI and OpenAI routes and the
library behave alike):

- a temperature below `SAMPLING_EPS` means greedy decoding (vLLM's rule and its epsilon):
  dividing logits by a tiny temperature overflows to inf, and the softmax of inf is NaN;
- ``temperature`` and ``repetition_penalty`` must be finite and > 0 (`ParameterError`), as
  vLLM and TGI validate them; a positive ``repetition_penalty`` below `MIN_REPETITION_PENALTY`
  is applied as that floor (our choice: TGI and vLLM accept any positive value, so the API
  does too, but dividing logits by a value near zero overflows float32; at the floor a
  penalised token's logit is already a million times larger or smaller, so the choice is the
  same); likewise it is applied at most as `MAX_REPETITION_PENALTY`, and ``temperature`` at
  most as `MAX_TEMPERATURE` (both overflow float32 to inf past 3.4e38, and a penalised
  ``-inf`` divided by an infinite temperature is NaN; at the ceilings the choice is the same:
  penalised a million times, or a near-uniform distribution);
- NaN or inf never reach ``torch.multinomial``: a distribution that is not finite raises
  `SamplingError`, which fails that request alone (`decode`).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from .types import ParameterError

MAX_STOP_STRINGS = 8
SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``)."""
MIN_REPETITION_PENALTY = 1e-6
"""Smallest ``repetition_penalty`` applied; smaller positive values are raised to it."""
MAX_REPETITION_PENALTY = 1e6
"""Largest ``repetition_penalty`` applied; larger values are lowered to it."""
MAX_TEMPERATURE = 1e6
"""Largest ``temperature`` applied; larger values are lowered to it."""


class SamplingError(RuntimeError):
    """The next-token distribution of one request is not finite (NaN or inf)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop (names follow TGI / vLLM)."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens (refusal text included), 1..4096."""
    do_sample: bool = False
    """False: greedy (argmax after repetition penalty)."""
    temperature: float = 1.0
    """> 0, finite; only used when sampling; below `SAMPLING_EPS` sampling is greedy; applied
    at most as `MAX_TEMPERATURE`."""
    top_p: float = 1.0
    """(0, 1]; nucleus sampling."""
    top_k: int = 0
    """0 disables top-k."""
    repetition_penalty: float = 1.0
    """> 0, finite; 1.0 disables (CTRL-style, as transformers); applied within
    [`MIN_REPETITION_PENALTY`, `MAX_REPETITION_PENALTY`]."""
    seed: int | None = None
    """Per-request generator seed: the same seed gives the same text."""
    stop: tuple[str, ...] = ()
    """Stop strings; generation ends before the first match, which is never returned."""
    ignore_eos: bool = False
    """Keep generating past EOS (vLLM's flag; benchmarks use it for fixed lengths)."""

    def __post_init__(self):
        if not 1 <= self.max_new_tokens <= 4096:
            raise ParameterError("max_new_tokens", "must be between 1 and 4096")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ParameterError("temperature", "must be a finite number > 0")
        if not 0 < self.top_p <= 1:
            raise ParameterError("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise ParameterError("top_k", "must be >= 0")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ParameterError("repetition_penalty", "must be a finite number > 0")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ParameterError("seed", "must be in [0, 2**63)")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise ParameterError("stop", f"at most {MAX_STOP_STRINGS} non-empty strings")

    @property
    def greedy(self) -> bool:
        """Argmax decoding: sampling is off, or the temperature is below `SAMPLING_EPS`."""
        return not self.do_sample or self.temperature < SAMPLING_EPS


def logits_processors(p: SamplingParams) -> LogitsProcessorList:
    """The transformers processors for one request, in ``generate()``'s order."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(
            min(max(p.repetition_penalty, MIN_REPETITION_PENALTY), MAX_REPETITION_PENALTY)))
    if not p.greedy:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(min(p.temperature, MAX_TEMPERATURE)))
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

    Raises:
        SamplingError: the processed distribution has NaN or inf in it (checked before
            ``torch.multinomial``, which would fail with a less clear message, and before
            argmax, which would pick a NaN).
    """
    scores = logits.float()
    if procs:
        scores = procs(history.unsqueeze(0), scores.unsqueeze(0))[0]
    logprobs = torch.log_softmax(scores, -1)
    probs = logprobs.exp()
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        raise SamplingError(
            f"the next-token distribution is not finite (NaN or inf; temperature="
            f"{p.temperature:g}, repetition_penalty={p.repetition_penalty:g})")
    if p.greedy:
        token = int(scores.argmax())
    else:
        token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logprobs[token])
