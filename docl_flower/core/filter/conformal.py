"""A Guard calibrated to a stated acceptance rate by split conformal prediction (no Flower).

An operator states ``guard.target_acceptance`` (say 0.99: at most 1% of harmless uploads may
be blocked) instead of guessing alpha. The provider owns harmless images (it keeps a probe set
already); a calibration split of them gives the Guard's alpha:

1. For each calibration image, its *blocking alpha* (:func:`blocking_alpha`): the smallest
   alpha at which the Guard, with its rule and sidedness, blocks it. The Guards are monotone
   in alpha (a wider interval blocks a superset), so an image is blocked at alpha exactly
   when its blocking alpha is ``<= alpha``. For the paper's rule that is
   ``(d_i* - mu_i*) / sigma_i*`` (one-sided; its absolute value two-sided) when ``i*`` is not
   the uploader's, for the strict rule the smallest such value over the foreign autoencoders.
2. With ``n`` calibration images and ``eps = 1 - target``, let ``k = floor(eps * (n + 1))``
   and take alpha just below the ``k``-th smallest blocking alpha (:func:`conformal_alpha`).
   A new harmless image exchangeable with the calibration images is blocked only if its
   blocking alpha is below that order statistic, that is if its rank among the ``n + 1``
   values is at most ``k``: probability ``<= k / (n + 1) <= eps`` (Vovk et al. 2005; Lei et
   al. 2018). Nothing is assumed of the score distribution.

The guarantee is marginal (over the calibration draw and the new image). What one finite
test set shows deviates from it by sampling error; :func:`finite_sample_slack` states a bound
that holds with probability ``1 - 2 * delta`` (Hoeffding on the test set, and the
calibration-conditional bound of Vovk 2012 on the calibration set). alpha never exceeds
``guard.max_alpha``, the widest region the upload check judged: where the conformal alpha is
larger, ``max_alpha`` is used, which blocks less and so keeps the guarantee.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from docl_flower.core.common.checks import check_number
from docl_flower.core.filter.global_filter import (
    OUTSIDER,
    ArgminGuard,
    Guard,
    ScoredFilter,
    StrictGuard,
)

#: Default share of the harmless images kept for calibration (``guard.calibration_share``);
#: the rest measures the achieved acceptance on images the calibration never saw.
DEFAULT_CALIBRATION_SHARE = 0.5
#: Probability of each of the two deviations :func:`finite_sample_slack` bounds.
SLACK_DELTA = 0.01


class CalibrationError(ValueError):
    """The calibration set cannot support the target (too few images, or no alpha > 0)."""


def blocking_alpha(
    guard: Guard, flt: ScoredFilter, scores: torch.Tensor, uploader: torch.Tensor | int = OUTSIDER
) -> torch.Tensor:
    """Per image (row of ``scores``), the smallest alpha at which ``guard``'s rule blocks it.

    ``+inf`` for an image the rule never blocks (its best autoencoder is the uploader's, or
    every score is NaN). ``guard.alpha`` itself is ignored: only its rule and sidedness count.
    """
    z = (scores.to(torch.float64) - flt.mu) / flt.sigma
    if guard.sided == "two":
        z = z.abs()
    z = torch.nan_to_num(z, nan=math.inf)
    up = torch.as_tensor(uploader).reshape(-1, 1)
    foreign = flt.owners[None, :] != up
    if isinstance(guard, ArgminGuard):
        idx, _ = flt.predict(scores)
        best = z.gather(1, idx[:, None])[:, 0]
        own = ~foreign.expand_as(z).gather(1, idx[:, None])[:, 0]
        return torch.where(own, torch.full_like(best, math.inf), best)
    if isinstance(guard, StrictGuard):
        return torch.where(foreign, z, torch.full_like(z, math.inf)).min(dim=1).values
    raise TypeError(f"no blocking alpha for a {type(guard).__name__}")


@dataclass(frozen=True)
class Calibration:
    """What the calibration chose, and from what (saved with the filter)."""

    #: The stated acceptance rate of harmless uploads.
    target_acceptance: float
    #: The Guard's alpha chosen (``<= max_alpha``).
    alpha: float
    #: The conformal alpha before the ``max_alpha`` cap (``inf``: nothing calibrated blocks).
    conformal_alpha: float
    #: Calibration images, and the rank ``k`` of the order statistic used.
    images: int
    rank: int
    #: Guaranteed bound on the blocked share: ``k / (n + 1)`` (``<= 1 - target``).
    blocked_bound: float
    #: Share of the calibration images the chosen alpha blocks.
    calibration_blocked: float
    #: SHA-256 of the calibration features (float32 bytes), to name the set.
    fingerprint: str
    #: The Guard's rule and sidedness the alpha belongs to.
    guard: str
    sided: str

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields (an infinite conformal alpha as None)."""
        out: dict[str, object] = asdict(self)
        if math.isinf(self.conformal_alpha):
            out["conformal_alpha"] = None
        return out


def features_fingerprint(x: torch.Tensor) -> str:
    """SHA-256 of ``x`` as contiguous float32 bytes (shape included)."""
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(x.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def conformal_alpha(
    blocking: torch.Tensor, target_acceptance: float, max_alpha: float
) -> tuple[float, float, int]:
    """``(alpha, conformal alpha, k)`` for blocking alphas of ``n`` calibration images.

    Raises :class:`CalibrationError` when ``n + 1 < 1 / (1 - target)`` (no order statistic
    can hold the target) or when the chosen alpha is not above 0.
    """
    target = check_number("target_acceptance", target_acceptance, above=0.0, maximum=1.0)
    if target >= 1.0:
        raise CalibrationError("target_acceptance must be below 1 (1 would block nothing)")
    n = int(blocking.numel())
    k = math.floor((1.0 - target) * (n + 1) + 1e-9)
    if k < 1:
        need = math.ceil(1.0 / (1.0 - target)) - 1
        raise CalibrationError(
            f"{n} calibration images cannot hold target_acceptance {target}: "
            f"at least {need} are needed"
        )
    ordered = torch.sort(blocking.to(torch.float64)).values
    kth = float(ordered[k - 1])
    conformal = kth if math.isinf(kth) else float(np.nextafter(kth, -math.inf))
    alpha = min(conformal, max_alpha)
    if not alpha > 0.0:
        raise CalibrationError(
            f"no alpha > 0 holds target_acceptance {target}: the Guard blocks "
            f"{k} of {n} calibration images at any alpha > 0 (their blocking alpha is "
            f"{kth:.4g}); lower the target or use the other sidedness"
        )
    return alpha, conformal, k


def calibrate(
    guard: Guard,
    flt: ScoredFilter,
    harmless: torch.Tensor,
    target_acceptance: float,
    max_alpha: float,
) -> Calibration:
    """The alpha that holds ``target_acceptance`` for harmless uploads like ``harmless``."""
    blocking = blocking_alpha(guard, flt, flt.scores(harmless))
    alpha, conformal, k = conformal_alpha(blocking, target_acceptance, max_alpha)
    n = int(blocking.numel())
    return Calibration(
        target_acceptance=float(target_acceptance),
        alpha=alpha,
        conformal_alpha=conformal,
        images=n,
        rank=k,
        blocked_bound=k / (n + 1),
        calibration_blocked=float((blocking <= alpha).double().mean()),
        fingerprint=features_fingerprint(harmless),
        guard="paper" if isinstance(guard, ArgminGuard) else "strict",
        sided=guard.sided,
    )


def finite_sample_slack(calibration_images: int, test_images: int) -> float:
    """How far the blocked share of a finite test set may exceed ``1 - target``.

    With probability at least ``1 - 2 * SLACK_DELTA``: the calibration-conditional blocked
    probability exceeds ``k / (n + 1)`` by at most ``sqrt(ln(1/delta) / (2n))`` (Vovk 2012),
    and the share of ``m`` test images exceeds that probability by at most
    ``sqrt(ln(1/delta) / (2m))`` (Hoeffding).
    """
    if calibration_images < 1 or test_images < 1:
        raise ValueError("slack needs at least one calibration and one test image")
    term = math.log(1.0 / SLACK_DELTA) / 2.0
    return math.sqrt(term / calibration_images) + math.sqrt(term / test_images)


def split_harmless(
    harmless: torch.Tensor, share: float, seed: int, groups: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of the harmless images: ``(calibration, test)``.

    With ``groups`` (a person per image), whole groups go to one side: the calibration then
    sees other people than the test, as new people's uploads are.
    """
    check_number("calibration_share", share, above=0.0, maximum=1.0)
    rng = np.random.default_rng(seed)
    n = int(harmless.shape[0])
    if groups is None:
        order = torch.from_numpy(rng.permutation(n))
        cut = round(share * n)
        return harmless[order[:cut]], harmless[order[cut:]]
    if int(groups.numel()) != n:
        raise ValueError(f"{int(groups.numel())} groups for {n} harmless images")
    names = np.unique(groups.numpy())
    if names.size < 2:
        raise ValueError("a split by person needs harmless images of at least two people")
    chosen = rng.permutation(names)[: max(1, min(names.size - 1, round(share * names.size)))]
    in_cal = torch.from_numpy(np.isin(groups.numpy(), chosen))
    return harmless[in_cal], harmless[~in_cal]
