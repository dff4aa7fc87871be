"""Evaluation metrics of the paper (GUIDE section 1): accuracy, Guard trade-off, OOD AUROC.

No Flower here. Inputs are score matrices from :meth:`ScoredFilter.scores` (the global filter of
autoencoders, or the likelihood filter of the feature-statistics baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from docl_flower.core.filter.global_filter import (
    OUTSIDER,
    Guard,
    ScoredFilter,
    guard_name,
    make_guard,
)


def _registered_mask(flt: ScoredFilter, labels: torch.Tensor) -> torch.Tensor:
    return torch.isin(labels, flt.labels)


def overall_accuracy(flt: ScoredFilter, scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of test images of registered classes whose ``i*`` is their true class."""
    mask = _registered_mask(flt, labels)
    if not bool(mask.any()):
        raise ValueError("no test image belongs to a registered class")
    pred = flt.predict_labels(scores[mask])
    return float((pred == labels[mask]).double().mean())


def per_class_accuracy(
    flt: ScoredFilter, scores: torch.Tensor, labels: torch.Tensor
) -> dict[int, float]:
    """Accuracy of ``i*`` per registered true class."""
    pred = flt.predict_labels(scores)
    out: dict[int, float] = {}
    for c in sorted({int(v) for v in flt.labels}):
        m = labels == c
        if bool(m.any()):
            out[c] = float((pred[m] == c).double().mean())
    return out


def guarded_accuracy(
    flt: ScoredFilter, guard: Guard, scores: torch.Tensor, labels: torch.Tensor
) -> float:
    """Fraction of registered-class images, uploaded by a non-owner, blocked with the right ``i*``.

    The uploader is a third party who owns no registered class (:data:`OUTSIDER`).
    """
    mask = _registered_mask(flt, labels)
    s, y = scores[mask], labels[mask]
    blocked = guard.block(flt, s, OUTSIDER)
    correct = flt.predict_labels(s) == y
    return float((blocked & correct).double().mean())


def owner_accuracy(flt: ScoredFilter, scores: torch.Tensor, owners: torch.Tensor) -> float:
    """Fraction of owned test images whose ``i*`` belongs to the image's owner.

    ``owners`` holds a user id per image, ``-1`` where the image has no owner. With one user per
    class this equals the overall accuracy; with many users per class it asks more: the
    autoencoder of the very user whose images these are.
    """
    mask = owners >= 0
    if not bool(mask.any()):
        raise ValueError("no test image has an owner")
    idx, _ = flt.predict(scores[mask])
    return float((flt.owners[idx] == owners[mask]).double().mean())


def owner_guarded_accuracy(
    flt: ScoredFilter, guard: Guard, scores: torch.Tensor, owners: torch.Tensor
) -> float:
    """Fraction of owned test images, uploaded by an outsider, blocked with the owner's ``i*``.

    The Guard decides by owner: the image counts as protected only when the best autoencoder
    is its owner's and its error lies in that autoencoder's interval.
    """
    mask = owners >= 0
    s, o = scores[mask], owners[mask]
    blocked = guard.block(flt, s, OUTSIDER)
    idx, _ = flt.predict(s)
    return float((blocked & (flt.owners[idx] == o)).double().mean())


def acceptance_rate(flt: ScoredFilter, guard: Guard, harmless_scores: torch.Tensor) -> float:
    """Fraction of harmless images (no registered class) that the Guard shares."""
    blocked = guard.block(flt, harmless_scores, OUTSIDER)
    return float((~blocked).double().mean())


def auroc(negatives: NDArray[np.floating], positives: NDArray[np.floating]) -> float:
    """Area under the ROC curve for "higher score means positive" (Mann-Whitney U, ties halved)."""
    neg = np.asarray(negatives, dtype=np.float64)
    pos = np.asarray(positives, dtype=np.float64)
    if neg.size == 0 or pos.size == 0:
        raise ValueError("AUROC needs at least one negative and one positive")
    allv = np.concatenate([neg, pos])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty_like(order, dtype=np.float64)
    sorted_v = allv[order]
    # average ranks for ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[neg.size :].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (neg.size * pos.size))


def ood_auroc(
    flt: ScoredFilter, scores: torch.Tensor, labels: torch.Tensor, harmless: torch.Tensor
) -> float:
    """AUROC of the best (minimum) score: registered-class images vs harmless images.

    The score is the reconstruction error for DOCL, the negative log-likelihood for the
    likelihood filter (so the maximum log-likelihood there).
    """
    mask = _registered_mask(flt, labels)
    _, d_in = flt.predict(scores[mask])
    _, d_out = flt.predict(harmless)
    return auroc(d_in.numpy(), d_out.numpy())


@dataclass(frozen=True)
class Evaluation:
    """The headline metrics of one filter on one test set."""

    overall_accuracy: float
    per_class_accuracy: dict[int, float]
    alpha: float
    guarded_accuracy: float
    acceptance_rate: float | None
    ood_auroc: float | None
    #: Guarded accuracy and acceptance rate per alpha of the sweep (same Guard rule and sides).
    guard_curve: tuple[dict[str, float], ...] = ()
    #: With test images that have owners (many users per class): ``i*`` is the owner's, and
    #: that plus blocked (see :func:`owner_accuracy`, :func:`owner_guarded_accuracy`).
    owner_accuracy: float | None = None
    owner_guarded_accuracy: float | None = None


def guard_curve(
    flt: ScoredFilter,
    guard: Guard,
    scores: torch.Tensor,
    labels: torch.Tensor,
    harmless_scores: torch.Tensor,
    alphas: Sequence[float],
) -> tuple[dict[str, float], ...]:
    """Guarded accuracy and acceptance rate of ``guard``'s rule at each of ``alphas``."""
    name = guard_name(guard)
    out = []
    for alpha in alphas:
        at = make_guard(name, float(alpha), guard.sided)
        out.append(
            {
                "alpha": float(alpha),
                "guarded_accuracy": guarded_accuracy(flt, at, scores, labels),
                "acceptance_rate": acceptance_rate(flt, at, harmless_scores),
            }
        )
    return tuple(out)


#: Alphas of the guard curve in ``results.json`` (fine where acceptance changes fast).
ALPHA_GRID: tuple[float, ...] = tuple(
    float(a)
    for a in np.round(np.concatenate([np.arange(0.1, 5.0, 0.1), np.arange(5.0, 20.01, 0.5)]), 2)
)


def evaluate(
    flt: ScoredFilter,
    guard: Guard,
    features: torch.Tensor,
    labels: torch.Tensor,
    harmless: torch.Tensor | None,
    alphas: Sequence[float] = (),
    owners: torch.Tensor | None = None,
) -> Evaluation:
    """Score the test images (and harmless images, when given) once and compute every metric.

    With ``alphas`` (and harmless images), the Guard's rule is also evaluated at each alpha
    (:attr:`Evaluation.guard_curve`), from the same scores. With ``owners`` (a user id per test
    image, ``-1`` for none), owner accuracy and owner-guarded accuracy too.
    """
    scores = flt.scores(features)
    h_scores = flt.scores(harmless) if harmless is not None else None
    by_owner: tuple[float | None, float | None] = (None, None)
    if owners is not None and bool((owners >= 0).any()):
        by_owner = (
            owner_accuracy(flt, scores, owners),
            owner_guarded_accuracy(flt, guard, scores, owners),
        )
    return Evaluation(
        owner_accuracy=by_owner[0],
        owner_guarded_accuracy=by_owner[1],
        overall_accuracy=overall_accuracy(flt, scores, labels),
        per_class_accuracy=per_class_accuracy(flt, scores, labels),
        alpha=float(guard.alpha),
        guarded_accuracy=guarded_accuracy(flt, guard, scores, labels),
        acceptance_rate=None if h_scores is None else acceptance_rate(flt, guard, h_scores),
        ood_auroc=None if h_scores is None else ood_auroc(flt, scores, labels, h_scores),
        guard_curve=()
        if h_scores is None
        else guard_curve(flt, guard, scores, labels, h_scores, alphas),
    )
