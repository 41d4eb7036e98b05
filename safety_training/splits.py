"""Train, validation and held-out sets (the generalisation checks of a retrain).

A random validation tenth only shows that the head fits the sources it trained on. To see
whether it judges intent rather than topic words, three sets are kept out of training
entirely (our choice of checks):

- source-held-out: every example of the sources in ``holdout_sources`` (an unseen source);
- category-held-out: every example of the contrast categories in ``holdout_categories``
  (unseen hazards, both sides of each pair);
- calibration: both sides of the contrast pairs in the ``calibration_percent`` share (stable
  hash of the pair id, `data.in_split`); its benign side fixes the threshold at a target
  false-positive rate (`metrics.threshold_at_fpr`), never a threshold tuned on evaluation files
  (docs/method.md, "Data: what may train and what only evaluates").

The rest is split as the shipped run splits it: the first ``validation_fraction`` of the list
validates, the remainder trains (the builder already shuffled it). With nothing held out the
sets are the shipped run's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .data import Example, in_split


@dataclass(frozen=True)
class Splits:
    """Disjoint sets of examples; ``train + validation`` is what the recipe fits and validates."""

    train: list[Example]
    validation: list[Example]
    source_held_out: list[Example] = field(default_factory=list)
    category_held_out: list[Example] = field(default_factory=list)
    calibration: list[Example] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        """Examples in each set, by name (for the data manifest)."""
        return {"train": len(self.train), "validation": len(self.validation),
                "source_held_out": len(self.source_held_out),
                "category_held_out": len(self.category_held_out),
                "calibration": len(self.calibration)}


def in_calibration(pair_id: str, percent: int) -> bool:
    """Whether a contrast pair is held back for calibration (stable: sha256 of the id)."""
    return bool(pair_id) and in_split("calibration:" + pair_id, percent)


def split_examples(examples: list[Example], validation_fraction: float, *,
                   holdout_sources=(), holdout_categories=(), calibration_percent: int = 0) -> Splits:
    """Split ``examples`` (order kept within each set). An example goes to the first set that
    claims it: source-held-out, category-held-out, calibration; the rest to validation (the
    first ``int(len(rest) * validation_fraction)``) and train.

    Raises:
        ValueError: a held-out source or category that no example has (a typo would silently
            hold nothing out); the message names the config key.
    """
    for key, wanted, have in (("holdout_sources", holdout_sources, {e.source for e in examples}),
                              ("contrast_holdout_categories", holdout_categories,
                               {e.category for e in examples if e.category})):
        missing = sorted(set(wanted) - have)
        if missing:
            raise ValueError(f"{key}: no example has {missing}; known: {sorted(have)}")
    sources, categories = set(holdout_sources), set(holdout_categories)
    by_source, by_category, calibration, rest = [], [], [], []
    for e in examples:
        if e.source in sources:
            by_source.append(e)
        elif e.category in categories:
            by_category.append(e)
        elif in_calibration(e.pair, calibration_percent):
            calibration.append(e)
        else:
            rest.append(e)
    n_val = int(len(rest) * validation_fraction)
    return Splits(rest[n_val:], rest[:n_val], by_source, by_category, calibration)
