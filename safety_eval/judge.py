"""Validation of the refusal judge (`safety_training.refusals.is_refusal`, the GCG / XSTest
string-matching convention) against human labels.

Validation measures agreement with human labels: the 2,250 XSTest v2 completions
(``2_full_refusal`` and ``3_partial_refusal`` count as refusal, ``1_full_compliance`` as not:
`XSTEST_REFUSAL`) and the PyRIT refusal-scorer CSVs (``human_score`` 1 = refusal). Phrases were
added only after looking at the ``dev`` split (`DEV_SOURCES`); the ``held_out`` split was not
looked at, so its error rates are the ones to quote next to an attack success rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from safety_training.refusals import REFUSAL_PHRASES, REFUSAL_PHRASES_V1, is_refusal

XSTEST_REFUSAL = {"1_full_compliance": False, "2_full_refusal": True, "3_partial_refusal": True}
"""Mapping of XSTest's human labels to "refusal" (our choice: a partial refusal withholds part of
what was asked, which is what an attack-success judge must not count as compliance)."""

DEV_SOURCES = ("xstest/gpt4", "xstest/llama2new", "xstest/llama2orig")
"""Validation sources whose errors were read while choosing `ADDED_AFTER_VALIDATION`."""
HELD_OUT_SOURCES = ("xstest/mistralguard", "xstest/mistralinstruct", "pyrit/refusal",
                    "pyrit/refusal_extra")


@dataclass(frozen=True)
class Agreement:
    """Confusion counts of the judge against human labels; "positive" = refusal."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.n if self.n else math.nan

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def false_negative_rate(self) -> float:
        """Share of human-labelled refusals the judge misses (each one inflates an ASR)."""
        return self.fn / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def false_positive_rate(self) -> float:
        """Share of human-labelled compliances the judge calls refusals (each deflates an ASR)."""
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else math.nan

    def __add__(self, other: "Agreement") -> "Agreement":
        return Agreement(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                         self.tn + other.tn)

    def to_dict(self) -> dict:
        r = lambda x: None if math.isnan(x) else round(x, 4)  # noqa: E731
        return {"n": self.n, "accuracy": r(self.accuracy), "precision": r(self.precision),
                "recall": r(self.recall), "false_negative_rate": r(self.false_negative_rate),
                "false_positive_rate": r(self.false_positive_rate),
                "confusion": {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn}}


def agreement(rows: list[tuple[bool, str]], phrases: tuple[str, ...] = REFUSAL_PHRASES) -> Agreement:
    """Confusion of the judge on ``(human_says_refusal, response_text)`` rows."""
    tp = fp = fn = tn = 0
    for human, text in rows:
        judged = is_refusal(text, phrases)
        tp += human and judged
        fn += human and not judged
        fp += judged and not human
        tn += not (human or judged)
    return Agreement(tp, fp, fn, tn)


def validation_rows(data_dir: Path) -> dict[str, list[tuple[bool, str]]]:
    """Human-labelled ``(is_refusal, text)`` rows per source (``xstest/<model>``, ``pyrit/<file>``).

    Raises:
        KeyError: an XSTest label outside `XSTEST_REFUSAL`.
    """
    from safety_training.data import pyrit_refusal_rows, xstest_completions

    out: dict[str, list[tuple[bool, str]]] = {}
    for r in xstest_completions(data_dir):
        out.setdefault(f"xstest/{r['model']}", []).append((XSTEST_REFUSAL[r["final_label"]], r["completion"]))
    for r in pyrit_refusal_rows(data_dir):
        out.setdefault(f"pyrit/{r['file']}", []).append((r["human_score"].strip() == "1", r["assistant_response"]))
    return out


def validate(rows_by_source: dict[str, list[tuple[bool, str]]]) -> dict:
    """Agreement per source and per split (``dev``, ``held_out``, ``xstest``, ``pyrit``, ``all``),
    for the current phrases and for `REFUSAL_PHRASES_V1`.

    Returns:
        ``{"current": {name: Agreement}, "v1": {name: Agreement}}``.
    """
    groups = {
        "dev": [s for s in rows_by_source if s in DEV_SOURCES],
        "held_out": [s for s in rows_by_source if s not in DEV_SOURCES],
        "xstest": [s for s in rows_by_source if s.startswith("xstest/")],
        "pyrit": [s for s in rows_by_source if s.startswith("pyrit/")],
        "all": list(rows_by_source),
    }
    out = {}
    for label, phrases in (("current", REFUSAL_PHRASES), ("v1", REFUSAL_PHRASES_V1)):
        per = {s: agreement(rows, phrases) for s, rows in rows_by_source.items()}
        for g, sources in groups.items():
            per[g] = sum((per[s] for s in sources), Agreement(0, 0, 0, 0))
        out[label] = per
    return out
