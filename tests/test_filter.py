import numpy as np
import pytest
import torch

from docl_flower.filter import (
    ArgminGuard,
    GlobalFilter,
    Registration,
    ScoringConfig,
    StrictGuard,
    reference_scores,
)

from .conftest import random_registration


@pytest.mark.parametrize("chunks", [(512, 4), (7, 3), (1, 1), (1000, 100)])
def test_batched_scores_equal_a_naive_loop(chunks):
    # Prepare
    rng = np.random.default_rng(0)
    regs = [random_registration(rng, u, u) for u in range(11)]
    x = torch.rand(37, 20)
    flt = GlobalFilter(regs, ScoringConfig(*chunks))
    # Execute
    got = flt.scores(x)
    # Assert
    torch.testing.assert_close(got, reference_scores(regs, x), rtol=1e-5, atol=1e-5)


def test_filter_rejects_mixed_shapes_and_bad_inputs():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="differ"):
        GlobalFilter(
            [random_registration(rng, 0, 0, dim=20), random_registration(rng, 1, 1, dim=21)]
        )
    with pytest.raises(ValueError, match="at least one"):
        GlobalFilter([])
    flt = GlobalFilter([random_registration(rng, 0, 0)])
    with pytest.raises(ValueError, match="features must be"):
        flt.scores(torch.rand(3, 19))


def _filter_with(mu: list[float], sigma: list[float]) -> GlobalFilter:
    rng = np.random.default_rng(1)
    regs = [
        Registration(u, u, random_registration(rng, u, u).params, mu[u], sigma[u], 5)
        for u in range(len(mu))
    ]
    return GlobalFilter(regs)


def test_argmin_guard_cases():
    flt = _filter_with([10.0, 20.0], [1.0, 2.0])
    guard = ArgminGuard(alpha=1.5)
    # rows: best AE 0 inside, best AE 0 at the upper edge, best AE 0 outside, best AE 1 inside
    scores = torch.tensor([[10.0, 30.0], [11.5, 30.0], [11.6, 30.0], [40.0, 21.0]])
    outsider = guard.block(flt, scores, -1)
    assert outsider.tolist() == [True, True, False, True]
    # The owner of the best autoencoder may always share its own image.
    assert guard.block(flt, scores, 0).tolist() == [False, False, False, True]
    assert guard.block(flt, scores, torch.tensor([1, 1, 1, 1])).tolist() == [
        True,
        True,
        False,
        False,
    ]
    # Below the interval is also outside.
    assert guard.block(flt, torch.tensor([[8.4, 30.0]]), -1).tolist() == [False]


def test_strict_guard_blocks_when_any_foreign_autoencoder_accepts():
    flt = _filter_with([10.0, 20.0], [1.0, 2.0])
    scores = torch.tensor([[5.0, 20.5]])  # best is AE 0 (outside its interval), AE 1 accepts
    assert ArgminGuard(1.5).block(flt, scores, -1).tolist() == [False]
    assert StrictGuard(1.5).block(flt, scores, -1).tolist() == [True]
    assert StrictGuard(1.5).block(flt, scores, 1).tolist() == [False]


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_guard_rejects_non_positive_alpha(alpha):
    with pytest.raises(ValueError):
        ArgminGuard(alpha)
    with pytest.raises(ValueError):
        StrictGuard(alpha)
