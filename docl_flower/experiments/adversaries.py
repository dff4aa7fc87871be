"""The adversary experiment (the paper's Fig. 4): one protocol, for MNIST and for the faces.

An adversary ``a`` holds its own training images and those of a victim ``v``. It trains one
autoencoder on both, as a user does, through its Flower client (the same data loading, recipe,
seeds, calibration and the server's upload checks), and registers it as its own class. The
server swaps it in for a's honest autoencoder and lets a upload v's test images: entry
``(a, v)`` of the matrix is the fraction of them that the Guard blocks
(:func:`docl_flower.core.evaluation.analysis.adversary_matrix`; the diagonal is NaN, and so is
a pair whose adversary the server refused). Rows and columns follow the honest users'
classes in increasing order.

Every pair trains in one ``docl-flower`` run next to the honest one: one user per ordered
pair of the honest users' classes, owning class ``a`` with ``extra_classes = [v]`` (as
:func:`docl_flower.core.data.partitions.adversary_partition` builds it; ``partition=adversaries``
when the honest users own every class, as on MNIST; the same pairs spelled out as a
``Partition`` when they own a draw of the classes, as the 10 of ORL's 40 people).

Why this route. ``scripts/faces.py`` used to retrain the 90 adversaries in its own process
(``train_and_calibrate`` on a's and v's photos), a second route next to the Flower run of
``scripts/figures.py``. Both measure the same quantity, but the in-process route skipped the
client and the server's checks on an upload (an adversary that the probe check refuses never
gets into the filter), used seeds of its own and scored with the default
:class:`~docl_flower.core.filter.global_filter.ScoringConfig`. The Flower route is the
paper's (users train on their devices and upload) and is not slower in kind: it trains the
same 90 small autoencoders, two clients at a time on two cores, plus one simulation start-up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from docl_flower.core.evaluation.analysis import adversary_matrix
from docl_flower.core.filter.global_filter import Guard, Registration, ScoringConfig
from docl_flower.core.filter.store import load_filter
from docl_flower.core.pipeline.config import Experiment
from docl_flower.experiments.plotting import CELL_TEXT
from docl_flower.federation.components import load_experiment
from docl_flower.operations.runs import launch

#: The files a finished run must hold to be reused (the saved filter is what is analysed).
NEEDS = ("filter",)


def owned_classes(honest: Experiment) -> list[int]:
    """The classes of the honest users, in increasing order (one class per user).

    Raises
    ------
    ValueError
        If a user owns more than one class (then "a's autoencoder" is not one autoencoder).
    """
    multi = {u: cs for u, cs in honest.assignment.items() if len(cs) != 1}
    if multi:
        raise ValueError(f"the adversary experiment needs one class per user, got {multi}")
    return sorted(int(cs[0]) for cs in honest.assignment.values())


def ordered_pairs(classes: Sequence[int]) -> list[tuple[int, int]]:
    """Every (adversary, victim) pair of distinct ``classes``, by adversary then victim."""
    return [(a, v) for a in classes for v in classes if v != a]


def pair_partition(classes: Sequence[int], num_classes: int) -> list[str]:
    """Hydra overrides of the adversaries' partition: one user per ordered pair of ``classes``.

    User ``k`` owns class ``a`` of the ``k``-th pair and trains on v's images too.
    """
    chosen = sorted(int(c) for c in classes)
    if chosen == list(range(num_classes)):
        return ["partition=adversaries"]
    pairs = ordered_pairs(chosen)
    return [
        "partition=one_class_per_user",
        f"num_users={len(pairs)}",
        "partition.user_classes=[" + ",".join(f"[{a}]" for a, _ in pairs) + "]",
        # ``++``: the group's extra_classes is an empty dict, which Hydra would not merge into.
        "++partition.extra_classes={"
        + ",".join(f"{k}:[{v}]" for k, (_, v) in enumerate(pairs))
        + "}",
        "partition.shared_classes=true",
    ]


def adversary_overrides(
    honest: Experiment, base: Sequence[str], train: Sequence[str] = ()
) -> list[str]:
    """The adversary run's overrides next to the honest run ``honest``.

    The honest run's ``base`` (data, features, seed, extras), the pairs of its users'
    classes, then ``train`` (recipe changes for the adversaries only).
    """
    return [*base, *pair_partition(owned_classes(honest), honest.num_classes), *train]


def run_adversaries(
    honest_dir: Path,
    run_dir: Path,
    base: Sequence[str],
    train: Sequence[str] = (),
    reuse: bool = False,
) -> Path:
    """Train every adversary of the honest run in ``honest_dir`` in one run into ``run_dir``."""
    honest = load_experiment(honest_dir / "experiment.yaml")
    launch(adversary_overrides(honest, base, train), run_dir, reuse=reuse, needs=NEEDS)
    return run_dir


def adversarial_pairs(
    honest: Sequence[Registration], adversary_filter: Path
) -> tuple[dict[tuple[int, int], Registration], dict[str, Any]]:
    """The adversary run's autoencoders keyed by (adversary, victim) user of the honest run.

    An entry's classes (``trained_on`` in the saved filter) name the pair: its own class (the
    adversary's) and one other (the victim's). Entries of classes no honest user owns are
    left out. Returns the pairs (each registered under the adversary's honest user id) and
    the filter's metadata.
    """
    user_of = {r.label: r.user_id for r in honest}
    regs, meta = load_filter(adversary_filter)
    pairs: dict[tuple[int, int], Registration] = {}
    for reg, entry in zip(regs, meta["entries"], strict=True):
        victims = [int(c) for c in entry["trained_on"] if c != reg.label]
        if len(victims) == 1 and reg.label in user_of and victims[0] in user_of:
            adversary = user_of[reg.label]
            pairs[(adversary, user_of[victims[0]])] = replace(reg, user_id=adversary)
    return pairs, meta


def adversary_matrices(
    honest: Sequence[Registration],
    pairs: Mapping[tuple[int, int], Registration],
    features: torch.Tensor,
    labels: torch.Tensor,
    guards: Mapping[str, Guard],
    scoring: ScoringConfig | None = None,
) -> dict[str, list[list[float]]]:
    """Fig. 4 under each of ``guards``: rows adversaries, columns victims (JSON-ready)."""
    by_label = sorted(honest, key=lambda r: r.label)
    return {
        name: adversary_matrix(by_label, pairs, features, labels, guard, scoring).tolist()
        for name, guard in guards.items()
    }


def off_diagonal(matrix: Sequence[Sequence[float]]) -> np.ndarray[Any, np.dtype[np.float64]]:
    """The measured pairs of a matrix (diagonal left out; refused pairs stay NaN)."""
    m = np.array(matrix, dtype=float)
    return m[~np.eye(len(m), dtype=bool)]


def draw_matrix(ax: Any, matrix: Sequence[Sequence[float]], numbers: bool) -> Any:
    """Draw ``matrix`` on the axes ``ax`` (0: nothing blocked, 1: all), optionally with values."""
    m = np.array(matrix, dtype=float)
    # The colour scale is the fraction blocked, 0 to 1, in every panel (comparable colours).
    image = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    if numbers:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if not np.isnan(m[i, j]):
                    # Light text on the dark half of viridis, dark text on the light half.
                    colour = "w" if m[i, j] < 0.5 else "k"
                    ax.text(
                        j,
                        i,
                        f"{m[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=CELL_TEXT,
                        c=colour,
                    )
    return image
