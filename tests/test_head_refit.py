"""The head-refit benchmark's arithmetic (benchmarks/head_refit.py): the fit and the report."""

import torch

from benchmarks.head_refit import fit_head, head_report
from safety_training.metrics import threshold_at_fpr


def _blobs(n_pos: int, n_neg: int, shift: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n_pos, 1, generator=g) + shift, torch.randn(n_neg, 1, generator=g) - shift])
    return x, torch.tensor([1] * n_pos + [0] * n_neg)


def test_the_fit_balances_the_classes_and_the_penalty_shrinks_the_weights():
    x, y = _blobs(40, 400, shift=1.0)  # overlapping classes, ten to one
    w, b = fit_head(x, y, 1e-4, (torch.zeros(1), torch.zeros(())))
    boundary = float(-b / w[0])
    assert w[0] > 0 and abs(boundary) < 0.3  # unbalanced, it would sit near +1.1
    w_strong, _ = fit_head(x, y, 10.0, (torch.zeros(1), torch.zeros(())))
    assert w_strong.norm() < w.norm() / 5


def test_the_report_thresholds_on_the_calibration_benigns_and_ignores_probe_rows():
    none = torch.zeros(200, dtype=torch.bool)
    calibration = _blobs(100, 100, shift=0.5, seed=1)
    validation = _blobs(100, 100, shift=3.0, seed=2)
    flipped = (validation[0], 1 - validation[1], torch.ones(200, dtype=torch.bool))  # probes: not counted
    held = {"calibration": (*calibration, none), "validation": (*validation, none),
            "source_held_out": (torch.cat([validation[0], flipped[0]]), torch.cat([validation[1], flipped[1]]),
                                torch.cat([none, flipped[2]])),
            "category_held_out": (*validation, none)}
    w, b = torch.ones(1), torch.zeros(())
    report = head_report(held, w, b, fpr=0.1)
    benign = torch.sigmoid(calibration[0][calibration[1] == 0] @ w + b).tolist()
    assert report["threshold"] == round(float(threshold_at_fpr(benign, 0.1)), 6)
    assert report["source_held_out"]["n"] == 200 and report["source_held_out"]["auroc"] > 0.99
