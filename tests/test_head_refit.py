"""The head-refit benchmark's arithmetic (benchmarks/head_refit.py): the fit and the report."""

import torch

from benchmarks.head_refit import fit_head, head_report


def _blobs(n_pos: int, n_neg: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n_pos, 4, generator=g) + 2, torch.randn(n_neg, 4, generator=g) - 2])
    return x, torch.tensor([1] * n_pos + [0] * n_neg)


def test_the_fit_separates_imbalanced_classes_and_the_penalty_shrinks_the_weights():
    x, y = _blobs(20, 200)
    init = (torch.zeros(4), torch.zeros(()))
    w, b = fit_head(x, y, 1e-4, init)
    assert ((x @ w + b > 0).long() == y).float().mean() == 1.0
    w_strong, _ = fit_head(x, y, 10.0, init)
    assert w_strong.norm() < w.norm() / 5


def test_the_report_thresholds_on_the_calibration_benigns_and_ignores_probe_rows():
    x, y = _blobs(50, 50, seed=1)
    probe = torch.zeros(100, dtype=torch.bool)
    flipped = (x, 1 - y, torch.ones(100, dtype=torch.bool))  # probe rows only: must not count
    held = {"calibration": (x, y, probe), "validation": (x, y, probe),
            "source_held_out": (torch.cat([x, flipped[0]]), torch.cat([y, flipped[1]]), torch.cat([probe, flipped[2]])),
            "category_held_out": (x, y, probe)}
    report = head_report(held, torch.ones(4), torch.zeros(()), fpr=0.1)
    assert report["target_fpr"] == 0.1 and report["calibration"]["fpr"] <= 0.1
    assert report["source_held_out"]["n"] == 100 and report["source_held_out"]["auroc"] == 1.0
