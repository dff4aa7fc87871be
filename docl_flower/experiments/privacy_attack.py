"""Attack one run's uploads from the server's side: inversion and membership inference.

Only what the server holds: the run's saved filter (every uploaded autoencoder with its error
statistics) and data the provider owns (``docl_flower.core.evaluation.privacy_attacks`` holds
the attacks' mathematics):

* **inversion**: gradient descent on the autoencoder's input to minimise its reconstruction
  error, seeded restarts, no user data. ``prior``: in the span of the leading principal
  components of public features (MNIST: the first half of the MNIST test split; faces: the
  photos of the people nobody registered, which the server holds as harmless uploads).
  ``pixels``: the issue's attack, from uniform noise in the whole feature space, then
  iterations of ``x <- AE(x)``. Score, digits (``classes``): the fraction of recovered inputs
  that a nearest-neighbour classifier of the same public images names as the user's digit;
  faces (``people``): the fraction of users whose recovered template (the mean of the
  restarts) lies closer to their own photos than to any other registered person's. The faces
  gallery is the test split (all people; the registered people's test photos were never
  trained on): ground truth for measuring, standing in for the public profile photos a social
  network holds;
* **membership inference**: per user, the AUROC of the uploaded autoencoder's reconstruction
  error (lower: member) between the user's training images and the other images of its class.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from docl_flower.core.data.seeds import derive_seed
from docl_flower.core.evaluation.privacy_attacks import (
    InversionSpec,
    NearestNeighbours,
    PublicPrior,
    frozen_autoencoder,
    identification_ranks,
    invert,
    membership_auroc,
    nearest_is_member,
)
from docl_flower.core.evaluation.results import RESULTS_FILE, RunResult, read_results
from docl_flower.core.filter.global_filter import Registration
from docl_flower.core.filter.store import load_filter
from docl_flower.core.pipeline.config import Experiment
from docl_flower.core.pipeline.inputs import server_sets, split_features
from docl_flower.federation.components import load_experiment

#: The two inversion attacks: 16 seeded restarts of 500 steps each (enough for the
#: reconstruction error to stop falling on MNIST); the pixel attack starts from noise with a
#: smaller step, then runs 500 iterations of ``x <- AE(x)`` towards a fixed point.
ATTACKS: dict[str, InversionSpec] = {
    "prior": InversionSpec(space="prior", steps=500, lr=0.05, restarts=16),
    "pixels": InversionSpec(space="pixels", steps=500, lr=0.01, restarts=16, fixed_point_steps=500),
}
#: Principal components of the public prior (they hold most of the public images' variance).
COMPONENTS = 50
#: Neighbours of the public classifier that names recovered digits.
NEIGHBOURS = 5
#: face_recognition's usual match tolerance on dlib descriptors.
FACE_TOLERANCE = 0.6
#: A user counts as recovered when more than this share of its restarts is named right.
MAJORITY = 0.5
#: Seed of the draw of training images that ``nearest_is_member`` compares with (per user).
NEAREST_SEED = 0

# ---------------------------------------------------------------- the attacks


@dataclass
class Recovered:
    """What one attack recovered from one user's autoencoder (for the figures)."""

    user: int
    label: int
    features: torch.Tensor
    named: list[int]


@dataclass
class Attacked:
    """One run attacked: the numbers (JSON-ready) and what the figures need."""

    numbers: dict[str, Any]
    kind: str
    recovered: dict[str, list[Recovered]]
    image_shape: tuple[int, ...]
    #: people kind: per user, distance of the recovered template to each registered person.
    distances: dict[int, dict[int, float]]
    #: people kind: per user, the test photo nearest to the recovered template and its own.
    photos: dict[int, tuple[np.ndarray, np.ndarray, int]]


def kind_of(exp: Experiment) -> str:
    """``"people"`` (faces: identities, harmless = unregistered people) or ``"classes"``."""
    return "people" if exp.harmless_unregistered else "classes"


def distance_scale(exp: Experiment) -> tuple[float, str]:
    """Factor from feature distances to the extractor's raw units, and the unit's name."""
    low, high = getattr(exp.features, "low", None), getattr(exp.features, "high", None)
    if type(exp.features).__name__ == "FaceDescriptor" and low is not None and high is not None:
        return float(high) - float(low), "dlib descriptor distance"
    return 1.0, "feature distance"


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _member_sets(
    exp: Experiment, regs: Sequence[Registration], x_test: torch.Tensor, y_test: torch.Tensor
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per user: features of its training images and of the other images of its class.

    The ground truth of the measurements (the server never holds the training images).
    """
    images, labels = exp.dataset.load("train")
    out = {}
    for reg in regs:
        rows = exp.client_spec.training_indices(reg.user_id, reg.label, labels)
        members = split_features(exp.dataset, exp.features, "train", rows, images).features
        out[reg.user_id] = (members, x_test[y_test == reg.label])
    return out


def _membership(
    regs: Sequence[Registration], sets: Mapping[int, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, Any]:
    """Per-user membership AUROC: training images vs the other images of the class."""
    per_user: dict[str, float] = {}
    counts: dict[str, list[int]] = {}
    for reg in regs:
        members, others = sets[reg.user_id]
        model = frozen_autoencoder(reg.params)
        with torch.no_grad():
            em = ((model(members) - members) ** 2).sum(1)
            en = ((model(others) - others) ** 2).sum(1)
        per_user[str(reg.user_id)] = membership_auroc(em.numpy(), en.numpy())
        counts[str(reg.user_id)] = [int(members.shape[0]), int(others.shape[0])]
    values = list(per_user.values())
    return {
        "auroc": _mean(values),
        "min": float(min(values)),
        "max": float(max(values)),
        "per_user": per_user,
        "members_nonmembers": counts,
    }


@contextmanager
def one_thread() -> Iterator[None]:
    """Run PyTorch on one thread: the inversion's small products run ~10x faster so."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _invert_all(
    regs: Sequence[Registration], attacks: Mapping[str, InversionSpec], prior: PublicPrior
) -> dict[str, list[tuple[Registration, torch.Tensor]]]:
    out: dict[str, list[tuple[Registration, torch.Tensor]]] = {}
    with one_thread():
        for name, spec in attacks.items():
            found = []
            for reg in regs:
                seed = derive_seed(spec.seed, reg.user_id)
                seeded = InversionSpec(**{**asdict(spec), "seed": seed})
                found.append((reg, invert(frozen_autoencoder(reg.params), seeded, prior)))
            out[name] = found
    return out


def _start_points(
    prior: PublicPrior, regs: Sequence[Registration], attacks: Mapping[str, InversionSpec]
) -> list[torch.Tensor]:
    """The prior attack's starting points, per user (where it starts: its chance level)."""
    spec = attacks.get("prior", ATTACKS["prior"])
    return [
        prior.decode(
            prior.sample(
                spec.restarts, torch.Generator().manual_seed(derive_seed(spec.seed, r.user_id))
            )
        )
        for r in regs
    ]


def attack_classes(
    exp: Experiment, regs: Sequence[Registration], attacks: Mapping[str, InversionSpec]
) -> Attacked:
    """Digits: name the recovered inputs with a classifier of public images."""
    sets = server_sets(exp)
    x, y = sets.x_test, sets.y_test
    half = x.shape[0] // 2
    reference, reference_labels = x[:half], y[:half]
    knn = NearestNeighbours(reference, reference_labels, k=min(NEIGHBOURS, half))
    prior = PublicPrior.from_features(reference, COMPONENTS)
    numbers: dict[str, Any] = {
        "public": {
            "images": f"first half of the {getattr(exp.dataset, 'name', 'data set')} test split",
            "num_images": int(half),
            "classifier": f"{knn.k}-nearest neighbours",
            "classifier_accuracy_on_second_half": knn.accuracy(x[half:], y[half:]),
            "prior_components": prior.components,
        }
    }
    members = _member_sets(exp, regs, x, y)
    recovered: dict[str, list[Recovered]] = {}
    inversion: dict[str, Any] = {}
    for name, found in _invert_all(regs, attacks, prior).items():
        rows = []
        near: dict[str, float] = {}
        for reg, feats in found:
            rows.append(Recovered(reg.user_id, reg.label, feats, knn.predict(feats).tolist()))
            gen = torch.Generator().manual_seed(derive_seed(NEAREST_SEED, reg.user_id))
            near[str(reg.user_id)] = nearest_is_member(feats, *members[reg.user_id], gen)
        recovered[name] = rows
        per_user = {str(r.user): _mean([float(p == r.label) for p in r.named]) for r in rows}
        inversion[name] = {
            "score": _mean(list(per_user.values())),
            "users_recovered": sum(v > MAJORITY for v in per_user.values()),
            "nearest_is_member": _mean(list(near.values())),
            "per_user": per_user,
            "nearest_is_member_per_user": near,
            "named": {str(r.user): r.named for r in rows},
        }
    starts = _start_points(prior, regs, attacks)
    inversion["start"] = {
        "score": _mean(
            [
                _mean([float(p == reg.label) for p in knn.predict(s).tolist()])
                for reg, s in zip(regs, starts, strict=True)
            ]
        )
    }
    numbers["inversion"] = inversion
    numbers["membership"] = _membership(regs, members)
    shape = tuple(int(s) for s in exp.dataset.image_shape)
    return Attacked(numbers, "classes", recovered, shape, {}, {})


def attack_people(
    exp: Experiment, regs: Sequence[Registration], attacks: Mapping[str, InversionSpec]
) -> Attacked:
    """Faces: identify the person of each recovered template among the gallery's people."""
    sets = server_sets(exp)
    if sets.harmless is None:
        raise ValueError("the people attack needs the unregistered people's photos")
    gallery, gallery_labels = sets.x_test, sets.y_test
    prior = PublicPrior.from_features(sets.harmless, COMPONENTS)
    scale, unit = distance_scale(exp)
    registered = sorted(int(r.label) for r in regs)
    everyone = sorted({int(v) for v in gallery_labels.tolist()})
    numbers: dict[str, Any] = {
        "public": {
            "images": "photos of the people nobody registered (the server's harmless set)",
            "num_images": int(sets.harmless.shape[0]),
            "prior_components": prior.components,
            "gallery": "test split: held-out photos of every person (ground truth, measuring only)",
            "distance_unit": unit,
            "people": len(everyone),
        }
    }
    test_images, _ = exp.dataset.load("test")
    members = _member_sets(exp, regs, gallery, gallery_labels)
    recovered: dict[str, list[Recovered]] = {}
    inversion: dict[str, Any] = {}
    distances: dict[int, dict[int, float]] = {}
    photos: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
    for name, found in _invert_all(regs, attacks, prior).items():
        per_user: dict[str, dict[str, Any]] = {}
        rows = []
        for reg, feats in found:
            template = feats.mean(dim=0, keepdim=True)
            ranks, per_person = identification_ranks(
                template, gallery, gallery_labels, reg.label, registered
            )
            ranks_all, per_all = identification_ranks(
                template, gallery, gallery_labels, reg.label, everyone
            )
            restart_ranks, _ = identification_ranks(
                feats, gallery, gallery_labels, reg.label, registered
            )
            own = per_all[reg.label][0] * scale
            other = min(v[0] for p, v in per_all.items() if p != reg.label) * scale
            trained_on = members[reg.user_id][0]
            per_user[str(reg.user_id)] = {
                "person": int(reg.label),
                "rank_among_registered": int(ranks[0]),
                "rank_among_all": int(ranks_all[0]),
                "restarts_identified": _mean([float(r == 0) for r in restart_ranks]),
                "distance_own": own,
                "distance_nearest_other": other,
                # Closer to the photos it was trained on than to the held-out ones: memorised.
                "distance_training_photos": float(torch.cdist(template, trained_on).mean()) * scale,
            }
            named = min(per_person, key=lambda p: per_person[p][0])
            rows.append(Recovered(reg.user_id, reg.label, feats, [named]))
            if name == "prior":
                distances[reg.user_id] = {p: v[0] * scale for p, v in per_person.items()}
                nearest = int(torch.cdist(template, gallery)[0].argmin())
                own_photo = int(torch.nonzero(gallery_labels == reg.label)[0, 0])
                photos[reg.user_id] = (
                    test_images[own_photo],
                    test_images[nearest],
                    int(gallery_labels[nearest]),
                )
        recovered[name] = rows
        users = list(per_user.values())
        inversion[name] = {
            "score": _mean([float(u["rank_among_registered"] == 0) for u in users]),
            "identified_among_all": _mean([float(u["rank_among_all"] == 0) for u in users]),
            "restarts_identified": _mean([u["restarts_identified"] for u in users]),
            "distance_own": _mean([u["distance_own"] for u in users]),
            "distance_nearest_other": _mean([u["distance_nearest_other"] for u in users]),
            "distance_training_photos": _mean([u["distance_training_photos"] for u in users]),
            "within_tolerance": _mean([float(u["distance_own"] < FACE_TOLERANCE) for u in users])
            if unit.startswith("dlib")
            else None,
            "users_recovered": sum(u["rank_among_registered"] == 0 for u in users),
            "per_user": per_user,
        }
    starts = _start_points(prior, regs, attacks)
    start_ranks = [
        identification_ranks(s.mean(0, keepdim=True), gallery, gallery_labels, r.label, registered)[
            0
        ][0]
        for r, s in zip(regs, starts, strict=True)
    ]
    inversion["start"] = {"score": _mean([float(r == 0) for r in start_ranks])}
    numbers["inversion"] = inversion
    numbers["membership"] = _membership(regs, members)
    shape = tuple(int(s) for s in exp.dataset.image_shape)
    return Attacked(numbers, "people", recovered, shape, distances, photos)


def run_numbers(result: RunResult) -> dict[str, Any]:
    """What the run itself measured: accuracy, the Guard, training time, DP spent."""
    seconds = list(result.train_seconds.values())
    dp: dict[str, dict[str, float]] = dict(getattr(result, "dp", {}) or {})
    eps = [float(v["epsilon"]) for v in dp.values() if "epsilon" in v]
    noise = [float(v["noise_multiplier"]) for v in dp.values() if "noise_multiplier" in v]
    return {
        "overall_accuracy": result.overall_accuracy,
        "guarded_accuracy": result.guarded_accuracy,
        "acceptance_rate": result.acceptance_rate,
        "alpha": result.alpha,
        "registered": len(result.registered),
        "failed": dict(result.failed),
        "train_seconds_mean": _mean(seconds),
        "train_seconds": dict(result.train_seconds),
        "wall_seconds": result.wall_seconds,
        "dp": dp,
        "epsilon_spent_max": max(eps) if eps else None,
        "noise_multiplier_mean": _mean(noise) if noise else None,
    }


def attack_run(
    folder: Path, attacks: Mapping[str, InversionSpec] | None = None, kind: str | None = None
) -> Attacked:
    """Attack every autoencoder of the run in ``folder`` (``experiment.yaml``, ``filter/``).

    Reads the run's ``results.json`` too when it is there (accuracy, Guard, DP, times).
    """
    start = time.time()
    exp = load_experiment(folder / "experiment.yaml")
    regs, _ = load_filter(folder / "filter")
    regs = sorted(regs, key=lambda r: (r.user_id, r.label))
    kind = kind or kind_of(exp)
    chosen = dict(ATTACKS if attacks is None else attacks)
    attacked = (attack_people if kind == "people" else attack_classes)(exp, regs, chosen)
    results = folder / RESULTS_FILE
    if results.is_file():
        attacked.numbers.update(run_numbers(read_results(results)))
    attacked.numbers["kind"] = kind
    attacked.numbers["users"] = len(regs)
    attacked.numbers["attacks"] = {k: asdict(v) for k, v in chosen.items()}
    attacked.numbers["attack_seconds"] = time.time() - start
    return attacked
