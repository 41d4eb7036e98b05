"""Train, validation and held-out sets (the generalisation checks of a retrain).

A random validation tenth only shows that the head fits the sources it trained on. To see
whether it judges intent rather than topic words, three sets are kept out of training
entirely (our choice of checks):

- source-held-out: every example of the sources in ``holdout_sources`` (an unseen source);
- category-held-out: every example of the contrast categories in ``holdout_categories``
  (unseen hazards, both sides of each pair);
- calibration: both sides of the contrast pairs in the ``calibration_percent`` share (stable
  hash of the pair id, `data.in_split`), and the ShareGPT turns the builder kept for it
  (`data.SHAREGPT_CALIBRATION`); its benign side fixes the threshold at a target
  false-positive rate (`metrics.threshold_at_fpr`), never a threshold tuned on evaluation files
  (docs/method.md, "Data: what may train and what only evaluates").

A warm start has seen its predecessors' data: queries in ``seen`` (what the runs before
trained on, `recipe.seen_queries`) are dropped from the three sets, so they stay unseen by
every checkpoint in the chain.

The rest is split as the shipped run splits it: the first ``validation_fraction`` of the list
validates, the remainder trains (the builder already shuffled it). With nothing held out the
sets are the shipped run's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .data import SHAREGPT_CALIBRATION, Example, in_split


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
                   holdout_sources=(), holdout_categories=(), calibration_percent: int = 0,
                   holdout_source_shares: dict[str, int] | None = None,
                   seen: frozenset[str] = frozenset()) -> Splits:
    """Split ``examples`` (order kept within each set). An example goes to the first set that
    claims it: source-held-out (a source of ``holdout_sources``, or the share of a source in
    ``holdout_source_shares`` given by a hash of the query: ``{source: percent}``, so a source
    can train and still be measured on queries it never saw), category-held-out, calibration
    (pair share or `SHAREGPT_CALIBRATION`); the rest to validation (the first
    ``int(len(rest) * validation_fraction)``) and train. A held-out example whose query is in
    ``seen`` is dropped (neither held out nor trained on).

    Raises:
        ValueError: a held-out source or category that no example has (a typo would silently
            hold nothing out); the message names the config key.
    """
    shares = holdout_source_shares or {}
    for key, wanted, have in (("holdout_sources", [*holdout_sources, *shares], {e.source for e in examples}),
                              ("contrast_holdout_categories", holdout_categories,
                               {e.category for e in examples if e.category})):
        missing = sorted(set(wanted) - have)
        if missing:
            raise ValueError(f"{key}: no example has {missing}; known: {sorted(have)}")
    sources, categories = set(holdout_sources), set(holdout_categories)
    by_source, by_category, calibration, rest = [], [], [], []
    for e in examples:
        if e.source in sources or in_split("holdout:" + e.query, shares.get(e.source, 0)):
            held = by_source
        elif e.category in categories:
            held = by_category
        elif e.source == SHAREGPT_CALIBRATION or in_calibration(e.pair, calibration_percent):
            held = calibration
        else:
            rest.append(e)
            continue
        if e.query not in seen:
            held.append(e)
    n_val = int(len(rest) * validation_fraction)
    return Splits(rest[n_val:], rest[:n_val], by_source, by_category, calibration)
