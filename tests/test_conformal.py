"""The calibrated Guard: blocking alphas agree with the Guards, and the coverage holds."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from docl_flower.core.filter.conformal import (
    CalibrationError,
    blocking_alpha,
    calibrate,
    conformal_alpha,
    finite_sample_slack,
    split_harmless,
)
from docl_flower.core.filter.global_filter import OUTSIDER, ScoredFilter, make_guard


class ScoresAsFeatures(ScoredFilter):
    """A filter whose 'features' are already its score rows (synthetic scores)."""

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _filter(n_models: int = 6, seed: int = 0) -> ScoredFilter:
    g = torch.Generator().manual_seed(seed)
    return ScoresAsFeatures(
        labels=torch.arange(n_models),
        owners=torch.arange(n_models) % 3,
        mu=torch.rand(n_models, generator=g, dtype=torch.float64) * 10 + 5,
        sigma=torch.rand(n_models, generator=g, dtype=torch.float64) * 3 + 0.5,
    )


def _harmless(
    n: int, n_models: int, g: torch.Generator, flt: ScoredFilter | None = None
) -> torch.Tensor:
    # Harmless images: errors above each autoencoder's mu by 0.2-8 sigma (what a wider
    # interval blocks more of), or spread over 3..33 without a filter.
    u = torch.rand(n, n_models, generator=g, dtype=torch.float64)
    if flt is None:
        return u * 30 + 3
    return flt.mu + flt.sigma * (0.2 + 7.8 * u**2)


@pytest.mark.parametrize("name", ["paper", "strict"])
@pytest.mark.parametrize("sided", ["one", "two"])
def test_an_image_is_blocked_exactly_when_its_blocking_alpha_is_reached(name, sided):
    flt = _filter()
    g = torch.Generator().manual_seed(1)
    scores = _harmless(500, 6, g)
    scores[::17, 2] = float("nan")
    for uploader in (OUTSIDER, 1, torch.randint(0, 3, (500,), generator=g)):
        blocking = blocking_alpha(make_guard(name, 1.0, sided), flt, scores, uploader)
        for alpha in (0.05, 0.5, 1.0, 1.7, 3.0, 9.0):
            guard = make_guard(name, alpha, sided)
            assert torch.equal(guard.block(flt, scores, uploader), blocking <= alpha)


def test_the_calibrated_guard_blocks_at_most_the_stated_share_of_new_harmless_images():
    # Over many calibration draws, a large fresh harmless set: blocked share <= 1 - target on
    # average (the marginal guarantee) and within the stated slack in every draw.
    flt = _filter()
    guard = make_guard("paper", 1.5, "one")
    target, n_cal, n_test = 0.95, 199, 5000
    shares = []
    for seed in range(60):
        g = torch.Generator().manual_seed(100 + seed)
        cal = calibrate(guard, flt, _harmless(n_cal, 6, g, flt), target, max_alpha=50.0)
        test = _harmless(n_test, 6, g, flt)
        blocked = dataclasses.replace(guard, alpha=cal.alpha).block(flt, test, OUTSIDER)
        share = blocked.double().mean().item()
        shares.append(share)
        assert share <= (1 - target) + finite_sample_slack(n_cal, n_test)
        assert cal.blocked_bound == cal.rank / (n_cal + 1) <= 1 - target
    assert np.mean(shares) <= 1 - target + 0.005
    # ... and it is not a loose bound: the calibration blocks close to the stated share.
    assert np.mean(shares) >= 1 - target - 0.02


def test_the_alpha_is_just_below_the_kth_blocking_alpha_and_capped_by_max_alpha():
    blocking = torch.tensor(
        [4.0, 1.0, 3.0, 2.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], dtype=torch.float64
    )
    # n = 10, target 0.8: k = floor(0.2 * 11) = 2 -> just below the 2nd smallest (2.0).
    alpha, conformal, k = conformal_alpha(blocking, 0.8, max_alpha=100.0)
    assert k == 2 and conformal == alpha == np.nextafter(2.0, -math.inf)
    assert int((blocking <= alpha).sum()) == 1
    alpha, conformal, _ = conformal_alpha(blocking, 0.8, max_alpha=1.5)
    assert alpha == 1.5 and conformal > 1.9


@pytest.mark.parametrize(
    ("blocking", "target", "message"),
    [
        (torch.ones(10), 0.99, "at least 99 are needed"),
        (torch.zeros(100), 0.9, "no alpha > 0"),
        (torch.ones(100), 1.0, "below 1"),
        (torch.ones(100), float("nan"), "target_acceptance"),
        (torch.ones(100), 0.0, "target_acceptance"),
    ],
)
def test_a_target_the_calibration_set_cannot_hold_is_refused(blocking, target, message):
    with pytest.raises(ValueError, match=message):
        conformal_alpha(blocking.to(torch.float64), target, max_alpha=2.0)
    assert issubclass(CalibrationError, ValueError)


def test_images_never_blocked_leave_the_alpha_at_max_alpha():
    alpha, conformal, _ = conformal_alpha(torch.full((50,), math.inf), 0.9, max_alpha=2.0)
    assert alpha == 2.0 and math.isinf(conformal)


def test_the_harmless_split_is_seeded_disjoint_and_complete():
    x = torch.arange(101, dtype=torch.float32)[:, None]
    cal, test = split_harmless(x, 0.5, seed=3)
    again, _ = split_harmless(x, 0.5, seed=3)
    assert torch.equal(cal, again) and len(cal) == 50 and len(test) == 51
    assert sorted(torch.cat([cal, test])[:, 0].tolist()) == list(range(101))
    with pytest.raises(ValueError, match="calibration_share"):
        split_harmless(x, 0.0, seed=3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("guard.target_acceptance=1.0", r"guard\.target_acceptance must be in \(0, 1\)"),
        ("guard.target_acceptance=0", r"guard\.target_acceptance must be"),
        ("guard.target_acceptance=nan", r"guard\.target_acceptance must be"),
        ("guard.target_acceptance=high", r"guard\.target_acceptance must be"),
        ("guard.calibration_share=1.0", r"guard\.calibration_share must be in \(0, 1\)"),
        ("+guard.calibration_typo=0.5", "unknown keys"),
    ],
)
def test_the_calibration_settings_are_checked_where_the_config_is_built(override, message):
    from docl_flower.core.pipeline.config import compose_config
    from docl_flower.federation.components import build_experiment

    overrides = [override]
    if "target_acceptance" not in override:
        overrides.append("guard.target_acceptance=0.99")
    with pytest.raises(ValueError, match=message):
        build_experiment(compose_config(overrides), check_recipe=False)


def test_a_calibrated_guard_needs_harmless_images():
    from docl_flower.core.pipeline.config import compose_config
    from docl_flower.federation.components import build_experiment

    cfg = compose_config(["guard.target_acceptance=0.99", "dataset.harmless=null"])
    with pytest.raises(ValueError, match="needs harmless images"):
        build_experiment(cfg, check_recipe=False)
    exp = build_experiment(compose_config(["guard.target_acceptance=0.99"]), check_recipe=False)
    assert exp.calibration is not None and exp.calibration.target_acceptance == 0.99


def test_a_split_by_person_keeps_each_person_on_one_side():
    x = torch.arange(40, dtype=torch.float32)[:, None]
    people = torch.arange(40) // 10  # 4 people, 10 photos each
    cal, test = split_harmless(x, 0.5, seed=1, groups=people)
    cal_people = set((cal[:, 0] // 10).long().tolist())
    test_people = set((test[:, 0] // 10).long().tolist())
    assert len(cal_people) == 2 and not cal_people & test_people and len(cal) + len(test) == 40
    with pytest.raises(ValueError, match="two people"):
        split_harmless(x, 0.5, seed=1, groups=torch.zeros(40, dtype=torch.long))
