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
