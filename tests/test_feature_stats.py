"""The feature-statistics baseline's core: fitting, likelihoods, sampling, checks and the Guard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from docl_flower.core.baselines.fedpft import (
    ClassStats,
    Density,
    LikelihoodFilter,
    SampledClassifierSpec,
    StatsError,
    StatsLimits,
    StatsSpec,
    checked_stats,
    class_accuracy,
    fit_class_stats,
    fit_density,
    ledoit_wolf,
    pack_symmetric,
    probe_problem,
    train_sampled_classifier,
    unpack_symmetric,
)
from docl_flower.core.evaluation.metrics import evaluate
from docl_flower.core.filter.global_filter import OUTSIDER, ArgminGuard, StrictGuard
from docl_flower.core.filter.probe import ProbeSet


def _cluster(rng: np.random.Generator, n: int, dim: int, centre: float, spread: float = 0.05):
    """``n`` features in [0, 1] around ``centre`` with correlated noise."""
    mix = rng.normal(size=(dim, dim)) / math.sqrt(dim)
    x = centre + spread * rng.normal(size=(n, dim)) @ mix
    return np.clip(x, 0.0, 1.0)


def _reference_ll(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """The Gaussian log-density by its textbook formula (slogdet and a linear solve)."""
    d = mean.shape[0]
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    diff = x - mean
    maha = np.einsum("ij,ij->i", diff, np.linalg.solve(cov, diff.T).T)
    return -0.5 * (d * math.log(2 * math.pi) + logdet + maha)


def _stats(user: int, label: int, x: np.ndarray, spec: StatsSpec, seed: int = 0) -> ClassStats:
    return fit_class_stats(x, spec, seed, user, label)


# ----------------------------------------------------------------------- fitting
def test_shrunk_covariance_is_positive_definite_with_7_samples_in_128_dimensions():
    # Prepare
    x = _cluster(np.random.default_rng(0), 7, 128, 0.5)
    spec = StatsSpec(covariance="shrunk", ridge=1e-3)
    # Execute
    _, _, cov = fit_density(x, spec, seed=0)
    # Assert
    eig = np.linalg.eigvalsh(cov)
    assert eig[0] >= 1e-3 * (1 - 1e-6)
    np.linalg.cholesky(cov)
    assert np.array_equal(cov, cov.T)


def test_ledoit_wolf_shrinkage_matches_its_definition():
    # Prepare: the estimator written from Ledoit and Wolf (2004), Lemma 3.2 / 3.3 (Frobenius
    # norms normalised by the dimension), on centred data.
    x = _cluster(np.random.default_rng(1), 40, 12, 0.4, spread=0.2)
    n, d = x.shape
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    m = np.trace(s) / d
    d2 = np.sum((s - m * np.eye(d)) ** 2) / d
    b_bar2 = sum(np.sum((np.outer(r, r) - s) ** 2) / d for r in xc) / n**2
    expected = min(b_bar2, d2) / d2
    # Execute
    emp, shrinkage = ledoit_wolf(x)
    # Assert
    np.testing.assert_allclose(emp, s, atol=1e-12)
    assert shrinkage == pytest.approx(expected, rel=1e-9)
    assert 0.0 < shrinkage < 1.0


def test_a_fixed_shrinkage_and_a_single_sample_still_give_a_positive_definite_covariance():
    x = np.full((1, 16), 0.3)
    for spec in (StatsSpec(shrinkage=0.5), StatsSpec(), StatsSpec(covariance="diag")):
        weights, means, cov = fit_density(x, spec, seed=0)
        Density.of(weights, means, cov, spec.covariance)  # does not raise
        assert float(np.min(cov if spec.covariance == "diag" else np.linalg.eigvalsh(cov))) > 0


def test_em_mixture_recovers_two_separated_clusters():
    # Prepare
    rng = np.random.default_rng(2)
    x = np.concatenate([_cluster(rng, 300, 4, 0.2, 0.02), _cluster(rng, 100, 4, 0.8, 0.02)])
    spec = StatsSpec(covariance="diag", components=2)
    # Execute
    weights, means, var = fit_density(x, spec, seed=3)
    # Assert
    order = np.argsort(means[:, 0])
    np.testing.assert_allclose(weights[order], [0.75, 0.25], atol=0.01)
    np.testing.assert_allclose(means[order, 0], [0.2, 0.8], atol=0.02)
    assert (var > 0).all()


def test_fitting_is_seeded_and_calibration_is_held_out():
    # Prepare
    x = _cluster(np.random.default_rng(4), 30, 10, 0.5)
    spec = StatsSpec(covariance="diag", components=2)
    # Execute
    a, b = _stats(0, 0, x, spec, seed=7), _stats(0, 0, x, spec, seed=7)
    train_ll = a.density().log_likelihood(x)
    # Assert: same seed, same upload; held-out images are less likely than the training ones.
    assert np.array_equal(a.means, b.means) and a.ll_mean == b.ll_mean
    assert a.ll_mean < float(train_ll.mean()) and a.ll_std > 0
    assert a.num_examples == 30


# ----------------------------------------------------------------------- likelihoods
@pytest.mark.parametrize("covariance", ["shrunk", "diag"])
def test_log_likelihood_matches_the_gaussian_formula(covariance):
    # Prepare
    rng = np.random.default_rng(5)
    x = _cluster(rng, 50, 8, 0.5, spread=0.1)
    weights, means, cov = fit_density(x, StatsSpec(covariance=covariance), seed=0)
    full = cov if covariance == "shrunk" else np.diag(cov[0])
    queries = rng.uniform(0, 1, size=(20, 8))
    # Execute
    ll = Density.of(weights, means, cov, covariance).log_likelihood(queries)
    # Assert
    np.testing.assert_allclose(ll, _reference_ll(queries, means[0], full), rtol=1e-10)


def test_mixture_log_likelihood_is_the_log_of_the_weighted_densities():
    rng = np.random.default_rng(6)
    weights = np.array([0.3, 0.7])
    means = rng.uniform(0.2, 0.8, size=(2, 5))
    var = rng.uniform(0.01, 0.05, size=(2, 5))
    x = rng.uniform(0, 1, size=(15, 5))
    ll = Density.of(weights, means, var, "diag").log_likelihood(x)
    dens = sum(
        w * np.exp(_reference_ll(x, m, np.diag(v)))
        for w, m, v in zip(weights, means, var, strict=True)
    )
    np.testing.assert_allclose(ll, np.log(dens), rtol=1e-10)


def test_the_likelihood_filter_scores_negative_log_likelihoods_per_registration():
    rng = np.random.default_rng(7)
    stats = [
        _stats(u, c, _cluster(rng, 20, 6, 0.2 + 0.3 * c), StatsSpec()) for u, c in [(0, 0), (1, 1)]
    ]
    x = torch.from_numpy(rng.uniform(0, 1, size=(9, 6))).float()
    scores = LikelihoodFilter(stats).scores(x)
    for i, s in enumerate(stats):
        expected = -_reference_ll(x.double().numpy(), s.means[0], s.covariance)
        np.testing.assert_allclose(scores[:, i].numpy(), expected, rtol=1e-9)


# ----------------------------------------------------------------------- sampling
@pytest.mark.parametrize("covariance", ["shrunk", "diag"])
def test_samples_have_the_statistics_mean_and_covariance(covariance):
    # Prepare
    x = _cluster(np.random.default_rng(8), 40, 5, 0.5, spread=0.1)
    weights, means, cov = fit_density(x, StatsSpec(covariance=covariance), seed=0)
    full = cov if covariance == "shrunk" else np.diag(cov[0])
    # Execute
    sample = Density.of(weights, means, cov, covariance).sample(200_000, np.random.default_rng(9))
    # Assert
    np.testing.assert_allclose(sample.mean(0), means[0], atol=3e-3)
    np.testing.assert_allclose(np.cov(sample.T), full, atol=3e-3 * float(np.abs(full).max()) + 1e-4)


def test_mixture_samples_follow_the_weights():
    weights = np.array([0.25, 0.75])
    means = np.array([[0.1, 0.1], [0.9, 0.9]])
    var = np.full((2, 2), 1e-4)
    sample = Density.of(weights, means, var, "diag").sample(40_000, np.random.default_rng(10))
    assert float((sample[:, 0] < 0.5).mean()) == pytest.approx(0.25, abs=0.01)


def test_the_classifier_of_sampled_features_separates_the_classes_and_is_seeded():
    # Prepare
    rng = np.random.default_rng(11)
    stats = [_stats(u, 10 + u, _cluster(rng, 30, 6, 0.2 + 0.3 * u), StatsSpec()) for u in range(3)]
    test = torch.from_numpy(
        np.concatenate([_cluster(rng, 20, 6, 0.2 + 0.3 * u) for u in range(3)])
    ).float()
    labels = torch.repeat_interleave(torch.tensor([10, 11, 12]), 20)
    spec = SampledClassifierSpec(samples_per_class=300, epochs=100)
    # Execute
    a = train_sampled_classifier(stats, spec, seed=0)
    b = train_sampled_classifier(stats, spec, seed=0)
    overall, per_class = class_accuracy(a.predict(test), labels, torch.tensor([10, 11, 12]))
    # Assert
    assert overall > 0.95 and set(per_class) == {10, 11, 12}
    assert torch.equal(a.predict(test), b.predict(test))


# ----------------------------------------------------------------------- the server's checks
DIM = 6
SHRUNK = StatsLimits(StatsSpec(), DIM)
DIAG2 = StatsLimits(StatsSpec(covariance="diag", components=2), DIM)


def _honest(limits: StatsLimits) -> tuple[dict[str, np.ndarray], float, float]:
    x = _cluster(np.random.default_rng(12), 25, DIM, 0.5)
    s = _stats(0, 0, x, limits.spec)
    return s.upload_arrays(), s.ll_mean, s.ll_std


def _broken(limits: StatsLimits, name: str, change) -> dict[str, np.ndarray]:
    arrays, _, _ = _honest(limits)
    arrays[name] = np.asarray(change(arrays[name].copy()), dtype=np.float32)
    return arrays


def _not_pd(packed: np.ndarray) -> np.ndarray:
    cov = unpack_symmetric(packed, DIM)
    cov[0, 1] = cov[1, 0] = 2.0 * math.sqrt(cov[0, 0] * cov[1, 1])  # |corr| > 1
    return pack_symmetric(cov)


HOSTILE_STATS = {
    "nan mean": (
        SHRUNK,
        "means",
        lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a),
        "non-finite",
    ),
    "inf covariance": (SHRUNK, "covariance", lambda a: a * np.inf, "non-finite"),
    "not positive-definite": (SHRUNK, "covariance", _not_pd, "not positive-definite"),
    "zero covariance": (SHRUNK, "covariance", lambda a: a * 0.0, "not positive-definite"),
    "huge covariance": (SHRUNK, "covariance", lambda a: a * 1e30, "above"),
    "mean out of range": (SHRUNK, "means", lambda a: a + 5.0, "feature range"),
    "huge mean": (SHRUNK, "means", lambda a: a * 3e38, "feature range"),
    "negative variance": (DIAG2, "covariance", lambda a: -a, "not positive-definite"),
    "tiny variance": (DIAG2, "covariance", lambda a: a * 1e-6, "outside"),
    "weights not summing to one": (DIAG2, "weights", lambda a: a * 0.5, "sum"),
    "zero weight": (DIAG2, "weights", lambda a: np.array([1.0, 0.0]), "weights"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_STATS))
def test_hostile_statistics_are_refused_with_a_reason(case):
    limits, name, change, reason = HOSTILE_STATS[case]
    arrays = _broken(limits, name, change)
    _, ll_mean, ll_std = _honest(limits)
    with pytest.raises(StatsError, match=reason):
        checked_stats(0, 0, arrays, ll_mean, ll_std, 25, limits)


@pytest.mark.parametrize("limits", [SHRUNK, DIAG2], ids=["shrunk", "diag2"])
def test_honest_statistics_pass_and_round_trip_through_the_upload(limits):
    arrays, ll_mean, ll_std = _honest(limits)
    stats = checked_stats(3, 4, arrays, ll_mean, ll_std, 25, limits)
    assert (stats.user_id, stats.label, stats.num_examples) == (3, 4, 25)
    for name, value in stats.upload_arrays().items():
        np.testing.assert_array_equal(value, arrays[name])


@pytest.mark.parametrize(
    ("ll_mean", "ll_std", "reason"),
    [(1e9, 1.0, "ll-mean"), (-1e12, 1.0, "ll-mean"), (0.0, 0.0, "ll-std"), (0.0, 1e12, "ll-std")],
)
def test_log_likelihood_statistics_outside_what_the_model_can_produce_are_refused(
    ll_mean, ll_std, reason
):
    arrays, _, _ = _honest(SHRUNK)
    with pytest.raises(StatsError, match=reason):
        checked_stats(0, 0, arrays, ll_mean, ll_std, 25, SHRUNK)


def test_honest_held_out_log_likelihoods_lie_within_the_bounds():
    lo, hi = SHRUNK.ll_bounds()
    _, ll_mean, ll_std = _honest(SHRUNK)
    assert lo < ll_mean < hi and ll_std < 0.5 * (hi - lo)


# ----------------------------------------------------------------------- the Guard
def _two_classes() -> tuple[LikelihoodFilter, list[ClassStats]]:
    rng = np.random.default_rng(13)
    stats = [_stats(u, u, _cluster(rng, 30, 4, 0.25 + 0.5 * u), StatsSpec()) for u in (0, 1)]
    return LikelihoodFilter(stats), stats


def test_the_guard_blocks_likely_foreign_images_and_shares_own_and_unlikely_ones():
    # Prepare: images drawn near class 1, far from both, and near class 0.
    flt, stats = _two_classes()
    rng = np.random.default_rng(14)
    near1 = torch.from_numpy(_cluster(rng, 20, 4, 0.75)).float()
    far = torch.full((3, 4), 0.0)
    guard = ArgminGuard(alpha=2.0, sided="one")
    # Execute
    ll = flt.log_likelihoods(near1)
    blocked_outsider = guard.block(flt, flt.scores(near1), OUTSIDER)
    blocked_owner = guard.block(flt, flt.scores(near1), 1)
    blocked_far = guard.block(flt, flt.scores(far), OUTSIDER)
    # Assert: the rule in log-likelihoods, image by image.
    best = ll.argmax(dim=1)
    threshold = torch.tensor([s.ll_mean - 2.0 * s.ll_std for s in stats], dtype=torch.float64)
    expected = ll.gather(1, best[:, None])[:, 0] >= threshold[best]
    assert torch.equal(blocked_outsider, expected) and bool(blocked_outsider.any())
    assert not bool(blocked_owner.any())  # the owner may share its own images
    assert not bool(blocked_far.any())  # far below every class's range: shared


def test_a_larger_alpha_blocks_more_and_the_strict_guard_blocks_at_least_as_much():
    flt, _ = _two_classes()
    x = torch.from_numpy(np.random.default_rng(15).uniform(0.1, 0.9, size=(200, 4))).float()
    scores = flt.scores(x)
    small = ArgminGuard(alpha=1.0, sided="one").block(flt, scores, OUTSIDER)
    large = ArgminGuard(alpha=3.0, sided="one").block(flt, scores, OUTSIDER)
    strict = StrictGuard(alpha=3.0, sided="one").block(flt, scores, OUTSIDER)
    assert bool((large | ~small).all()) and bool((strict | ~large).all())


def test_evaluation_reports_accuracy_guard_curve_and_auroc():
    # Prepare
    flt, _ = _two_classes()
    rng = np.random.default_rng(16)
    x = torch.from_numpy(np.concatenate([_cluster(rng, 10, 4, c) for c in (0.25, 0.75)])).float()
    y = torch.tensor([0] * 10 + [1] * 10)
    harmless = torch.from_numpy(rng.uniform(0, 1, size=(50, 4)) ** 8).float()
    # Execute
    ev = evaluate(flt, ArgminGuard(1.5, "one"), x, y, harmless, alphas=[0.5, 1.5, 5.0])
    # Assert
    assert ev.overall_accuracy == 1.0 and ev.ood_auroc is not None and ev.ood_auroc > 0.9
    assert [p["alpha"] for p in ev.guard_curve] == [0.5, 1.5, 5.0]
    assert ev.guard_curve[1]["guarded_accuracy"] == ev.guarded_accuracy
    accepted = [p["acceptance_rate"] for p in ev.guard_curve]
    assert accepted == sorted(accepted, reverse=True)


def test_the_probe_check_refuses_a_catch_all_range():
    # Prepare
    _, stats = _two_classes()
    honest = stats[0]
    catch_all = ClassStats(**{**honest.__dict__, "ll_std": 1e6})
    probe = ProbeSet(torch.rand(64, 4, generator=torch.Generator().manual_seed(0)), harmless=48)
    # Execute / Assert
    assert probe_problem(honest, probe, 1.5, 0.2) is None
    problem = probe_problem(catch_all, probe, 1.5, 0.2)
    assert problem is not None and "catch-all" in problem and "100.0%" in problem


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"covariance": "full"}, "covariance"),
        ({"components": 0}, "components"),
        ({"components": 3}, "covariance=diag"),
        ({"ridge": 0.0}, "ridge"),
        ({"shrinkage": 1.5}, "shrinkage"),
        ({"folds": 1}, "folds"),
    ],
)
def test_bad_statistics_options_fail_with_the_field_name(changes, reason):
    with pytest.raises(ValueError, match=reason):
        StatsSpec(**changes)
