"""Classification metrics of the safety head (validation splits, the guard baseline, evaluation)."""

from __future__ import annotations


def classification_metrics(labels, scores, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1 at ``threshold`` and AUROC of probabilities."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    pred = [int(s > threshold) for s in scores]
    out = {"n": len(labels), "accuracy": accuracy_score(labels, pred),
           "precision": precision_score(labels, pred, zero_division=0),
           "recall": recall_score(labels, pred, zero_division=0),
           "f1": f1_score(labels, pred, zero_division=0)}
    out["auroc"] = roc_auc_score(labels, scores) if len(set(labels)) == 2 else float("nan")
    return {k: round(float(v), 4) for k, v in out.items()}


def threshold_at_fpr(scores_benign, fpr: float) -> float:
    """The lowest threshold at which at most ``fpr`` of the benign scores are flagged.

    A score is flagged when ``score > threshold`` (the server's rule, `policy.SafetyParams`):
    with the scores sorted high to low and ``k = floor(fpr * n)`` false positives allowed, the
    threshold is the ``k+1``-th highest score (ties flag none of the tied scores, so the rate
    may fall below ``fpr``).

    Args:
        scores_benign: probabilities of benign examples (the calibration split's, never an
            evaluation file's).
        fpr: the target false-positive rate, in ``[0, 1)``, e.g. 0.01.

    Raises:
        ValueError: no score, or ``fpr`` outside ``[0, 1)``.
    """
    scores = sorted((float(s) for s in scores_benign), reverse=True)
    if not scores:
        raise ValueError("threshold_at_fpr: no benign score")
    if not 0 <= fpr < 1:
        raise ValueError(f"threshold_at_fpr: fpr must be in [0, 1), got {fpr}")
    return scores[int(fpr * len(scores))]


def operating_point(labels, scores, threshold: float) -> dict:
    """``{"n", "auroc", "threshold", "fpr", "tpr"}`` of probabilities at ``threshold``
    (flagged: ``score > threshold``); a rate or AUROC without its class is NaN."""
    from sklearn.metrics import roc_auc_score

    neg = [s for y, s in zip(labels, scores) if y == 0]
    pos = [s for y, s in zip(labels, scores) if y == 1]

    def rate(xs):
        return sum(s > threshold for s in xs) / len(xs) if xs else float("nan")

    auroc = roc_auc_score(labels, scores) if neg and pos else float("nan")
    return {"n": len(labels), "auroc": round(float(auroc), 4), "threshold": round(float(threshold), 6),
            "fpr": round(rate(neg), 4), "tpr": round(rate(pos), 4)}


def tpr_at_fpr(labels, scores, fpr: float) -> dict:
    """``{"fpr", "tpr", "threshold"}`` at the threshold that flags ``round(fpr * n)`` of the ``n``
    benign scores of this set (`threshold_at_fpr`'s tie rule), e.g. a candidate's TPR at the
    shipped checkpoint's false-positive rate on the same set, so two checkpoints' rankings are
    compared at one operating point rather than each at its own calibration threshold (our
    choice: rates in reports are rounded to 4 places, so the count is rounded, not floored).

    Raises:
        ValueError: the set lacks a class, or ``fpr`` outside ``[0, 1)``.
    """
    neg = sorted((float(s) for y, s in zip(labels, scores) if y == 0), reverse=True)
    pos = [float(s) for y, s in zip(labels, scores) if y == 1]
    if not neg or not pos:
        raise ValueError("tpr_at_fpr: the set needs benign and harmful scores")
    if not 0 <= fpr < 1:
        raise ValueError(f"tpr_at_fpr: fpr must be in [0, 1), got {fpr}")
    point = operating_point(labels, scores, neg[min(round(fpr * len(neg)), len(neg) - 1)])
    return {k: point[k] for k in ("fpr", "tpr", "threshold")}


def held_out_metrics(calibration: tuple[list[int], list[float]], sets: dict, fpr: float = 0.01,
                     default_threshold: float = 0.5) -> dict:
    """AUROC, false- and true-positive rates of every set at one threshold chosen on the benign
    side of ``calibration`` for a target ``fpr`` (`threshold_at_fpr`).

    Args:
        calibration: ``(labels, scores)`` of the calibration split; when it has no benign
            score, ``default_threshold`` (the server's) is used and reported.
        sets: ``{name: (labels, scores)}``, e.g. validation, source- and category-held-out.

    Returns:
        ``{"threshold", "target_fpr", "calibration": operating_point, name: operating_point}``.
    """
    labels, scores = calibration
    benign = [s for y, s in zip(labels, scores) if y == 0]
    threshold = threshold_at_fpr(benign, fpr) if benign else default_threshold
    out = {"threshold": round(float(threshold), 6), "target_fpr": fpr}
    if labels:
        out["calibration"] = operating_point(labels, scores, threshold)
    for name, (ls, ss) in sets.items():
        if ls:
            out[name] = operating_point(ls, ss, threshold)
    return out
