"""The paper's evaluation (Fig. 2-5) and the imbalance study, on saved filters (no Flower).

Every function takes registrations or score matrices from :class:`GlobalFilter` and returns
plain numbers, so that plots are made from JSON by ``scripts/figures.py`` only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from docl_flower.core.evaluation.metrics import (
    acceptance_rate,
    auroc,
    guarded_accuracy,
    per_class_accuracy,
)
from docl_flower.core.filter.global_filter import (
    GlobalFilter,
    Guard,
    Registration,
    ScoredFilter,
    ScoringConfig,
)

GuardFactory = Callable[[float], Guard]


def alpha_sweep(
    flt: ScoredFilter,
    guard_factory: GuardFactory,
    scores: torch.Tensor,
    labels: torch.Tensor,
    harmless_scores: torch.Tensor,
    alphas: Sequence[float],
) -> list[dict[str, float]]:
    """Guarded accuracy and acceptance rate for each alpha (Fig. 3), from one scoring pass."""
    out = []
    for alpha in alphas:
        guard = guard_factory(float(alpha))
        out.append(
            {
                "alpha": float(alpha),
                "guarded_accuracy": guarded_accuracy(flt, guard, scores, labels),
                "acceptance_rate": acceptance_rate(flt, guard, harmless_scores),
            }
        )
    return out


def roc_curve(
    negatives: np.ndarray, positives: np.ndarray, points: int = 200
) -> dict[str, list[float] | float]:
    """Threshold-free ROC of "higher score = positive", with its AUROC."""
    allv = np.concatenate([negatives, positives])
    thresholds = np.quantile(allv, np.linspace(0.0, 1.0, points))[::-1]
    tpr = [float((positives >= t).mean()) for t in thresholds]
    fpr = [float((negatives >= t).mean()) for t in thresholds]
    return {"fpr": [0.0, *fpr, 1.0], "tpr": [0.0, *tpr, 1.0], "auroc": auroc(negatives, positives)}


def adversary_matrix(
    honest: Sequence[Registration],
    adversarial: Mapping[tuple[int, int], Registration],
    features: torch.Tensor,
    labels: torch.Tensor,
    guard: Guard,
    scoring: ScoringConfig | None = None,
) -> np.ndarray:
    """Fig. 4: entry ``(a, v)`` is the fraction of v's test images, uploaded by a, that are blocked.

    ``honest`` holds one autoencoder per user (user id = row/column index order); for each
    pair, a's honest autoencoder is replaced by ``adversarial[(a, v)]`` (trained on a's and
    v's images). Pairs that are missing stay NaN, as does the diagonal.
    """
    users = [r.user_id for r in honest]
    index = {u: i for i, u in enumerate(users)}
    base = GlobalFilter(honest, scoring)
    matrix = np.full((len(users), len(users)), np.nan)
    for v in users:
        victim_label = honest[index[v]].label
        xv = features[labels == victim_label]
        if xv.shape[0] == 0:
            continue
        base_scores = base.scores(xv)
        for a in users:
            reg = adversarial.get((a, v))
            if a == v or reg is None:
                continue
            regs = list(honest)
            regs[index[a]] = reg
            flt = GlobalFilter(regs, scoring)
            scores = base_scores.clone()
            scores[:, index[a]] = GlobalFilter([reg], scoring).scores(xv)[:, 0]
            blocked = guard.block(flt, scores, a)
            matrix[index[a], index[v]] = float(blocked.double().mean())
    return matrix


def scalability(
    flt: GlobalFilter,
    scores: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int],
    subsets_per_k: int,
    seed: int,
) -> dict[int, dict[int, float]]:
    """Fig. 5: mean per-class accuracy when only k autoencoders are registered.

    For each k, ``subsets_per_k`` random subsets (seeded; all subsets when there are fewer);
    the full score matrix is reused (no retraining, no re-scoring). Returns
    ``{k: {class: mean accuracy over the subsets that contain the class}}``.
    """
    rng = np.random.default_rng(seed)
    n = flt.size
    out: dict[int, dict[int, float]] = {}
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"k={k} outside 1..{n}")
        seen: set[tuple[int, ...]] = set()
        sums: dict[int, list[float]] = {}
        attempts = 0
        while len(seen) < subsets_per_k and attempts < 50 * subsets_per_k:
            attempts += 1
            subset = tuple(sorted(rng.choice(n, size=k, replace=False).tolist()))
            if subset in seen:
                continue
            seen.add(subset)
            sub = GlobalFilter([flt.registrations[i] for i in subset], flt.scoring)
            mask = torch.isin(labels, sub.labels)
            acc = per_class_accuracy(sub, scores[mask][:, list(subset)], labels[mask])
            for c, value in acc.items():
                sums.setdefault(c, []).append(value)
        out[k] = {c: float(np.mean(v)) for c, v in sorted(sums.items())}
    return out


def swap_in(
    honest: Sequence[Registration], replacements: Sequence[Registration]
) -> list[Registration]:
    """Replace the honest autoencoder of each replacement's label."""
    by_label = {r.label: r for r in replacements}
    return [by_label.get(r.label, r) for r in honest]
