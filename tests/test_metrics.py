import numpy as np
import pytest
import torch

from docl_flower.core.evaluation.metrics import (
    acceptance_rate,
    auroc,
    guarded_accuracy,
    overall_accuracy,
    per_class_accuracy,
)
from docl_flower.core.filter.global_filter import ArgminGuard, GlobalFilter, Registration

from .conftest import random_registration


def _flt() -> GlobalFilter:
    rng = np.random.default_rng(0)
    regs = [
        Registration(u, u, random_registration(rng, u, u).params, 10.0, 1.0, 5) for u in range(3)
    ]
    return GlobalFilter(regs)


def test_accuracy_metrics_on_known_scores():
    flt = _flt()
    scores = torch.tensor(
        [[10.0, 50, 50], [50, 10, 50], [10, 50, 50], [50, 50, 13], [1, 2, 3]]
    )  # rows 0,1,3 right; row 2 wrong (class 2 predicted 0); row 4 class 7 unregistered
    labels = torch.tensor([0, 1, 2, 2, 7])
    assert overall_accuracy(flt, scores, labels) == pytest.approx(3 / 4)
    assert per_class_accuracy(flt, scores, labels) == {0: 1.0, 1: 1.0, 2: 0.5}
    # Guarded: right i* and inside [8.5, 11.5]: rows 0 and 1 (row 3 is right but outside).
    assert guarded_accuracy(flt, ArgminGuard(1.5), scores, labels) == pytest.approx(2 / 4)


def test_acceptance_rate_counts_shared_harmless_images():
    flt = _flt()
    harmless = torch.tensor([[30.0, 40, 50], [10.0, 40, 50], [9.0, 9.5, 50], [100, 100, 100]])
    assert acceptance_rate(flt, ArgminGuard(1.5), harmless) == pytest.approx(2 / 4)


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    neg = rng.normal(0, 1, 200).round(1)
    pos = rng.normal(1, 1, 150).round(1)
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auroc(neg, pos) == pytest.approx(pairs)
    assert auroc(np.zeros(3), np.ones(3)) == 1.0
    with pytest.raises(ValueError):
        auroc(np.array([]), np.ones(2))
