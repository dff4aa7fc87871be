import numpy as np
import pytest
import torch

from docl_flower.core.evaluation.analysis import (
    adversary_matrix,
    alpha_sweep,
    roc_curve,
    scalability,
    swap_in,
)
from docl_flower.core.evaluation.metrics import per_class_accuracy
from docl_flower.core.filter.global_filter import (
    ArgminGuard,
    GlobalFilter,
    Registration,
    StrictGuard,
)

from .conftest import random_registration


def _setup(n: int = 4, per_class: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    regs = [random_registration(rng, u, u) for u in range(n)]
    flt = GlobalFilter(regs)
    x = torch.from_numpy(rng.random((n * per_class, 20), dtype=np.float32))
    labels = torch.arange(n).repeat_interleave(per_class)
    scores = flt.scores(x)
    # Centre each interval on its autoencoder's median error so the Guard has work to do.
    med = scores.median(dim=0).values
    regs = [
        Registration(r.user_id, r.label, r.params, float(med[i]), float(med[i]) / 4, 10)
        for i, r in enumerate(regs)
    ]
    return regs, GlobalFilter(regs), x, labels


def test_alpha_sweep_trades_acceptance_for_blocking():
    _, flt, x, labels = _setup()
    harmless = flt.scores(torch.rand(50, 20))
    rows = alpha_sweep(flt, ArgminGuard, flt.scores(x), labels, harmless, [0.5, 1, 2, 4, 100])
    guarded = [r["guarded_accuracy"] for r in rows]
    accept = [r["acceptance_rate"] for r in rows]
    assert guarded == sorted(guarded) and accept == sorted(accept, reverse=True)
    assert accept[-1] == 0.0  # a huge interval blocks every harmless image


def test_roc_curve_is_monotone_with_matching_auroc():
    rng = np.random.default_rng(0)
    roc = roc_curve(rng.normal(0, 1, 300), rng.normal(2, 1, 300))
    assert roc["fpr"] == sorted(roc["fpr"]) and roc["tpr"] == sorted(roc["tpr"])
    area = np.trapezoid(roc["tpr"], roc["fpr"])
    assert area == pytest.approx(roc["auroc"], abs=0.02)


def test_adversary_with_the_victims_autoencoder_evades_argmin_but_not_strict():
    # Prepare: adversary 0's registered autoencoder is a copy of victim 2's.
    regs, _, x, labels = _setup()
    stolen = Registration(0, 0, regs[2].params, regs[2].err_mean, regs[2].err_std, 10)
    adv = {(0, 2): stolen}
    # Execute
    argmin = adversary_matrix(regs, adv, x, labels, ArgminGuard(1e6))
    strict = adversary_matrix(regs, adv, x, labels, StrictGuard(1e6))
    # Assert: when the victim's autoencoder is the best one, the tie goes to the first column
    # (the adversary's copy) and argmin shares; the strict rule blocks all (the victim's own
    # autoencoder accepts every image).
    scores = GlobalFilter(regs).scores(x[labels == 2])
    scores[:, 0] = scores[:, 2]
    expected = float((scores.argmin(dim=1) != 0).double().mean())
    assert argmin[0, 2] == pytest.approx(expected) and expected < 1.0
    assert strict[0, 2] == 1.0
    assert np.isnan(argmin[0, 0]) and np.isnan(argmin[1, 2])


def test_scalability_limits():
    _, flt, x, labels = _setup(n=5)
    scores = flt.scores(x)
    result = scalability(flt, scores, labels, ks=[1, 5], subsets_per_k=5, seed=0)
    assert result[1] == {c: 1.0 for c in range(5)}
    assert result[5] == pytest.approx(per_class_accuracy(flt, scores, labels))
    with pytest.raises(ValueError):
        scalability(flt, scores, labels, ks=[6], subsets_per_k=1, seed=0)


def test_swap_in_replaces_by_label():
    regs, *_ = _setup()
    new = Registration(9, 2, regs[0].params, 1.0, 1.0, 1)
    swapped = swap_in(regs, [new])
    assert swapped[2] is new and swapped[:2] == regs[:2]
