"""The safety policy: when to re-check, what ``[CLS]`` sees, and what a verdict does.

A small per-sequence state machine driven by scores, so it is unit-tested with scripted
scores and no model. Indices are generated-token indices ``g_0, g_1, ...`` of the current
response (forced refusal tokens included).

Decode step ``k >= 1`` feeds ``g_{k-1}`` and, when the schedule says so, a ``[CLS]`` probe whose
window ends at ``g_{k-1}``; its verdict covers every token up to ``g_{k-1}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from .model import tokens_read_cls
from .types import Action, ParameterError, Schedule

CONFIG_FIELDS = ("threshold", "tau", "r1", "r2", "r3")
"""`SafetyParams` fields a checkpoint records (`model.SafetyConfig`): `SafetyParams.from_config`."""
MAX_REWEIGHTS = 3
"""``reweight`` trips after which the policy falls back to ``refuse`` (our choice)."""


@lru_cache(maxsize=64)
def annealing_steps(dense: int, growth: float, horizon: int) -> frozenset[int]:
    """Check points (tokens generated when the check runs) of the ``annealing`` schedule.

    Every step for the first ``dense`` tokens; after that the gap between checks grows by
    ``growth`` each check (1, 1.25, 1.56, ... rounded up); no check once ``horizon`` tokens
    exist. Our choice (the paper does not publish its curve): prefill attacks and harmful
    pivots show up in the first sentence, while later text mostly continues what the checks
    already cleared, so density is spent early.
    """
    steps, n, gap = set(range(1, dense + 1)), dense, 1.0
    while True:
        gap *= growth
        n += max(1, round(gap))
        if n > horizon:
            return frozenset(steps)
        steps.add(n)


def is_check_step(p: "SafetyParams", n_generated: int) -> bool:
    """Whether the schedule re-checks when ``n_generated`` tokens exist (``n_generated >= 1``)."""
    if p.schedule == Schedule.EACH:
        return True
    if p.schedule == Schedule.PERIODIC:
        return n_generated % p.period == 0
    if p.schedule == Schedule.ANNEALING:
        return n_generated in annealing_steps(p.anneal_dense, p.anneal_growth, p.anneal_horizon)
    return False


def has_future_check(p: "SafetyParams", n_generated: int) -> bool:
    """Whether any check will still run after ``n_generated`` tokens."""
    if p.schedule in (Schedule.EACH, Schedule.PERIODIC):
        return True
    if p.schedule == Schedule.ANNEALING:
        return n_generated < max(annealing_steps(p.anneal_dense, p.anneal_growth, p.anneal_horizon))
    return False


@dataclass(frozen=True)
class SafetyParams:
    """Safety policy for one request (defaults: docs/method.md, "Probe windows and tau" and
    "Strategic decoding: schedules")."""

    enabled: bool = True
    """False: plain decoding, no ``[CLS]`` verdict at all."""
    threshold: float = 0.5
    """Malicious when ``p_malicious > threshold`` (docs/method.md, "The [CLS] token and the
    head")."""
    tau: int = 3
    """Consecutive malicious re-checks that trip a mid-response refusal (paper: tau <= 3)."""
    r1: int = 10
    """Rule 1 window: first ``r1`` generated tokens after a malicious query verdict."""
    r2: int = 10
    """Rule 2 window: the most recent ``r2`` generated tokens (benign query)."""
    r3: int = 10
    """Rule 3 look-ahead: during a malicious streak from S_t, the window is
    ``[S_t - r2, S_t + r3]``."""
    schedule: Schedule = Schedule.EACH
    """``each`` (every decode step), ``annealing``, ``periodic`` (every ``period`` tokens) or
    ``first`` (the query verdict only); a plain string is converted."""
    period: int = 10
    """Tokens between re-checks of the ``periodic`` schedule (paper: 10)."""
    anneal_dense: int = 16
    """``annealing``: tokens checked at every step before the gaps start growing."""
    anneal_growth: float = 1.25
    """``annealing``: factor by which the gap between checks grows after each check."""
    anneal_horizon: int = 256
    """``annealing``: no re-check once this many tokens were generated."""
    action: Action = Action.REFUSE
    """``refuse``: insert the refusal prefix (the paper's action); ``reweight``: bias the logits
    toward it (`SafetyState.steer_bias`); ``monitor``: report only; a plain string is converted
    (docs/method.md, "Actions: refuse, reweight, monitor")."""
    reweight_strength: float = 8.0
    """``reweight``: logit bias (nats) at ``p = 1`` on the first trip (`SafetyState.steer_bias`)."""
    update_cls: bool = False
    """Write each re-check's ``[CLS]`` K/V into the ``[CLS]`` slot, so later tokens read the
    updated state, as the paper does. Off by default (docs/method.md, "Decision 8"): the shipped
    checkpoint trained response tokens on the query-only ``[CLS]``; the switch exists to measure
    the ablation."""
    tokens_read_cls: bool = True
    """The response's token rows read ``[CLS]``; set from the checkpoint (`model.tokens_read_cls`),
    never by a request."""

    def __post_init__(self):
        if not 0 < self.threshold < 1:
            raise ParameterError("threshold", "must be in (0, 1)")
        if not 1 <= self.tau <= 64:
            raise ParameterError("tau", "must be between 1 and 64")
        for name in ("r1", "r2", "r3", "period", "anneal_dense", "anneal_horizon"):
            if not 1 <= getattr(self, name) <= 4096:
                raise ParameterError(name, "must be between 1 and 4096")
        if not 1.0 <= self.anneal_growth <= 4.0:
            raise ParameterError("anneal_growth", "must be between 1 and 4")
        for name, kind in (("schedule", Schedule), ("action", Action)):
            try:  # frozen: store the enum member for a plain string
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                raise ParameterError(name, f"must be one of {kind.values()}") from None
        if not 0 < self.reweight_strength <= 100:
            raise ParameterError("reweight_strength", "must be in (0, 100]")

    @classmethod
    def from_config(cls, cfg, **overrides) -> "SafetyParams":
        """The policy a checkpoint was trained for, with ``overrides``: the one constructor
        wherever a policy is built from a checkpoint (server, CLI, benchmarks, evaluation).

        Args:
            cfg: the checkpoint's `model.SafetyConfig` (its `CONFIG_FIELDS`: threshold, tau,
                r1, r2, r3).
            overrides: any `SafetyParams` field; a None value keeps the checkpoint's value (or
                the field's default), so unset settings can be passed as they are.

        Raises:
            ParameterError: a value out of range.
            TypeError: an unknown field.
        """
        fields = {name: getattr(cfg, name) for name in CONFIG_FIELDS} | {"tokens_read_cls": tokens_read_cls(cfg)}
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def stricter(self, threshold: float | None = None, schedule: str | None = None,
                 action: str | None = None) -> "SafetyParams":
        """Per-request overrides that can only make the policy stricter (docs/method.md,
        "Decision 9").

        Stricter means a lower threshold, a denser schedule (`Schedule` order) or a stronger
        action (`Action` order: refuse, reweight, monitor).

        Raises:
            ParameterError: an override that would weaken the server's policy.
        """
        from dataclasses import replace

        changes = {}
        if threshold is not None:
            if threshold > self.threshold:
                raise ParameterError("threshold", f"may only be lowered (server: {self.threshold})")
            changes["threshold"] = threshold
        for name, value, order in (("schedule", schedule, list(Schedule)),
                                   ("action", action, list(Action))):
            if value is None:
                continue
            current = getattr(self, name)
            if value not in order or order.index(value) > order.index(current):
                raise ParameterError(name, f"may only be stricter than the server's '{current}' "
                                           f"(strictest first: {', '.join(order)})")
            changes[name] = value
        return replace(self, **changes)


@dataclass(frozen=True)
class Trip:
    """A verdict that intervenes: truncate the response to ``truncate_to`` tokens, then insert."""

    stage: str
    """``query`` (prefill verdict) or ``response`` (tau consecutive re-checks)."""
    truncate_to: int
    """Generated tokens kept: ``g_0 .. g_{truncate_to - 1}`` (S_t for a response trip)."""


@dataclass
class SafetyState:
    """Per-sequence policy state."""

    params: SafetyParams
    prefill: int = 0
    """Response tokens the client supplied before ``g_0`` (a prefill), indexed ``-prefill .. -1``:
    the probe windows read them as they read generated tokens (training's windows cover the
    prefill too), so a harmful prefill after a benign query cannot pass unchecked."""
    query_score: float | None = None
    refused: bool = False
    streak: int = 0
    streak_start: int | None = None
    """S_t: the first token the failing checks cover that no passing check cleared."""
    checked_upto: int = 0
    """Tokens ``g_0 .. g_{checked_upto-1}`` are cleared by a passing check."""
    checks: int = 0
    trace: list = field(default_factory=list)
    """Every verdict as ``(tokens_generated, p_malicious)``; the query verdict at 0."""
    max_score: float = 0.0
    trip: Trip | None = None
    would_trip: list = field(default_factory=list)
    """Monitor mode: the trips that ``refuse`` would have made."""
    reweights: int = 0
    steer_bias: float = 0.0
    """``reweight``: logit bias (nats) added to the next refusal-prefix token while steering."""

    @property
    def active(self) -> bool:
        """Whether re-checks still run (our choice: none after a refusal was inserted)."""
        return self.params.enabled and not self.refused and self.params.schedule != Schedule.FIRST

    def on_query(self, score: float) -> Trip | None:
        """Prefill verdict; a malicious query inserts the refusal at the response start."""
        self.query_score = score
        self.max_score = max(self.max_score, score)
        self.trace.append((0, score))
        if score > self.params.threshold:
            return self._trip(Trip("query", 0), score)
        return None

    def needs_check(self, n_generated: int) -> bool:
        """Whether decode step with ``n_generated`` tokens so far runs a probe."""
        return self.active and n_generated >= 1 and is_check_step(self.params, n_generated)

    def window(self, n_generated: int) -> tuple[int, int]:
        """Response-index span ``[lo, hi)`` the probe reads besides the query (rules 1-3); a
        prefill's tokens have the indices ``-prefill .. -1`` before ``g_0``."""
        p, first = self.params, -self.prefill
        if self.query_score is not None and self.query_score > p.threshold:
            return first, min(first + p.r1, n_generated)  # rule 1 (reached in monitor and reweight modes)
        if self.streak:  # rule 3: around the transition S_t until the streak ends
            s = self.streak_start
            return max(first, s - p.r2), min(n_generated, s + p.r3 + 1)
        return max(first, n_generated - p.r2), n_generated  # rule 2

    def on_check(self, score: float, n_generated: int) -> Trip | None:
        """Re-check verdict covering ``g_0 .. g_{n_generated-1}``."""
        self.checks += 1
        self.max_score = max(self.max_score, score)
        self.trace.append((n_generated, score))
        if score <= self.params.threshold:
            self.streak, self.streak_start = 0, None
            self.checked_upto = n_generated
            return None
        if self.streak == 0:
            self.streak_start = self.checked_upto
        self.streak += 1
        if self.streak >= self.params.tau:
            trip = Trip("response", self.streak_start)
            self.streak, self.streak_start = 0, None
            return self._trip(trip, score)
        return None

    def on_finish(self) -> Trip | None:
        """Generation ends while a malicious streak is unresolved: its tokens never pass.

        Our choice: treat it as a trip at S_t, because the tokens the failed checks covered
        may not reach the caller and no later check can clear them.
        """
        if self.streak and self.params.enabled:
            trip = Trip("response", self.streak_start)
            self.streak, self.streak_start = 0, None
            return self._trip(trip, 1.0, insert=True)  # no later step could steer: insert
        return None

    def releasable(self, n_generated: int) -> int:
        """How many generated tokens may reach the caller now.

        Tokens wait for a passing check that covers them; a malicious streak holds everything
        from S_t on. When no check will run any more (``first``, a refusal already inserted,
        or past the annealing horizon) nothing is held, nor in ``monitor`` mode, which never
        changes the output.
        """
        if self.params.action == Action.MONITOR:
            return n_generated
        if self.streak:
            return self.streak_start
        if self.active and has_future_check(self.params, n_generated):
            return self.checked_upto
        return n_generated

    @property
    def steering(self) -> bool:
        """``reweight`` is biasing toward the refusal rather than inserting it."""
        return self.steer_bias > 0 and not self.refused

    def _trip(self, trip: Trip, score: float, insert: bool = False) -> Trip | None:
        """Record an intervention; the decoder truncates to ``trip.truncate_to`` and queues
        the refusal prefix, forced (``refuse``, or ``insert``) or as a logit bias
        (``reweight``)."""
        p = self.params
        if p.action == Action.MONITOR:
            self.would_trip.append(trip)
            return None
        self.trip = self.trip or trip
        if p.action == Action.REWEIGHT and self.reweights < MAX_REWEIGHTS and not insert:
            # Our design: bias = strength * trips so far * confidence margin above the
            # threshold, so a borderline verdict nudges and a confident or repeated one
            # all but forces; checks go on, and the trip after `MAX_REWEIGHTS` inserts.
            self.reweights += 1
            margin = max((score - p.threshold) / (1 - p.threshold), 0.1)
            self.steer_bias = p.reweight_strength * self.reweights * margin
            return trip
        self.refused = True
        self.steer_bias = 0.0
        return trip

    def summary(self, with_trace: bool = False) -> dict:
        """The ``safety`` object of responses; ``trace`` (every verdict) when asked."""
        out = {
            "query_score": None if self.query_score is None else round(self.query_score, 4),
            "max_score": round(self.max_score, 4),
            "checks": self.checks,
            "intervened": self.trip is not None,
            "stage": self.trip.stage if self.trip else None,
            "trip_token": self.trip.truncate_to if self.trip else None,
            "would_trip": [t.stage for t in self.would_trip],
            "reweights": self.reweights,
            "action": self.params.action,
            "schedule": self.params.schedule,
            "threshold": self.params.threshold,
        }
        if with_trace:
            out["trace"] = [{"tokens": n, "score": round(p, 4)} for n, p in self.trace]
        return out
