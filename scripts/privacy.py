"""What the server learns from DOCL's uploads: inversion and membership inference, with DP.

    python scripts/privacy.py [--out privacy] [--datasets mnist faces] [--epsilons 1 4 8 none]
                              [--dp-recipe dp|default] [--reuse] [--extra HYDRA_OVERRIDE ...]
    python scripts/privacy.py --attack RUN_DIR [RUN_DIR ...] [--out DIR]

Every run is one ``docl-flower`` run (Flower simulation) in ``OUT/runs/DATASET/SETTING``:
MNIST with the default experiment (10 users, one digit each), faces with the paper's protocol
on ORL (``dataset=att_faces features=face partition=random_classes seed=0``: 10 of the 40
people, 7 training photos each; one draw). Settings: ``none`` is the default recipe without
differential privacy (faces: ``train.min_steps=1000`` as ``make faces`` trains them);
``eps-E`` adds ``train.dp.epsilon=E`` on the recipe that ``--dp-recipe`` names (default
``train=dp``, the recipe made for DP-SGD), and ``none-dp-recipe`` is that recipe without DP,
to tell what DP costs from what the recipe costs.

Then, from the server's side only (the run's saved filter plus data the provider owns), on
every uploaded autoencoder (``docl_flower.core.evaluation.privacy_attacks``):

* **inversion**: gradient descent on the autoencoder's input to minimise its reconstruction
  error, 16 seeded restarts, no user data. ``prior``: in the span of the 50 leading principal
  components of public features (MNIST: the first half of the MNIST test split; faces: the
  photos of the 30 people nobody registered, which the server holds as harmless uploads),
  500 steps. ``pixels``: the issue's attack, from uniform noise in the whole feature space,
  500 steps, then 500 iterations of ``x <- AE(x)``. Score, digits: the fraction of recovered
  inputs that a 5-nearest-neighbour classifier of the same public images names as the user's
  digit (chance 0.1); faces: the fraction of users whose recovered template (the mean of the
  restarts) lies closer to their own photos than to any other registered person's
  (top-1 among 10, chance 0.1). The faces gallery is the test split (3 photos per person, all
  40 people; the registered people's test photos were never trained on): ground truth for
  measuring, standing in for the public profile photos a social network holds;
* **membership inference**: per user, the AUROC of the uploaded autoencoder's reconstruction
  error (lower: member) between the user's training images and the other images of its class
  (MNIST: the test split of the digit; faces: the person's 3 held-out photos).

Writes ``OUT/results.json``, ``OUT/summary.md``, ``OUT/inversion_mnist.png``,
``OUT/inversion_faces.png`` (and per DP setting ``inversion_DATASET_SETTING.png``) and
``OUT/tradeoff.png``. ``--attack`` attacks existing run folders only (no Flower run).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib
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
from docl_flower.core.pipeline.config import Experiment, compose_config
from docl_flower.core.pipeline.inputs import server_sets, split_features
from docl_flower.federation.components import load_experiment
from docl_flower.operations.runs import launch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

#: Hydra overrides of each data set (faces: the paper's protocol, one draw).
DATASETS: dict[str, list[str]] = {
    "mnist": [],
    "faces": ["dataset=att_faces", "features=face", "partition=random_classes", "seed=0"],
}
#: What the ``none`` setting adds per data set (faces are trained as ``make faces`` does).
NO_DP_EXTRA: dict[str, list[str]] = {"mnist": [], "faces": ["train.min_steps=1000"]}
#: The two inversion attacks (see the module docstring).
ATTACKS: dict[str, InversionSpec] = {
    "prior": InversionSpec(space="prior", steps=500, lr=0.05, restarts=16),
    "pixels": InversionSpec(space="pixels", steps=500, lr=0.01, restarts=16, fixed_point_steps=500),
}
#: Principal components of the public prior.
COMPONENTS = 50
#: Neighbours of the public classifier that names recovered digits.
NEIGHBOURS = 5
#: Restarts shown per user in the inversion figures.
SHOWN = 8
#: face_recognition's usual match tolerance on dlib descriptors.
FACE_TOLERANCE = 0.6


# ---------------------------------------------------------------- settings and runs


def setting_name(epsilon: str) -> str:
    """``"none"`` or ``"eps-E"``."""
    return "none" if epsilon == "none" else f"eps-{epsilon}"


def settings_for(epsilons: Sequence[str], dp_recipe: str, dp: bool) -> list[str]:
    """The settings to run, most private first; the DP recipe's control next to ``none``."""
    numbers = sorted((e for e in epsilons if e != "none"), key=float)
    out = [setting_name(e) for e in numbers] if dp else []
    if "none" in epsilons:
        if dp and numbers and dp_recipe != "default":
            out.append("none-dp-recipe")
        out.append("none")
    return out


def overrides_for(dataset: str, setting: str, dp_recipe: str, extra: Sequence[str]) -> list[str]:
    """The Hydra overrides of one run."""
    base = [*DATASETS[dataset], *extra]
    recipe = [] if dp_recipe == "default" else [f"train={dp_recipe}"]
    if setting == "none":
        return [*base, *NO_DP_EXTRA[dataset]]
    if setting == "none-dp-recipe":
        return [*base, *recipe, "train.dp.epsilon=null"]
    epsilon = setting.removeprefix("eps-")
    if dp_recipe == "default":
        recipe = NO_DP_EXTRA[dataset]
    return [*base, *recipe, f"train.dp.epsilon={epsilon}"]


def dp_available() -> bool:
    """Whether this checkout's config has ``train.dp`` (differentially private training)."""
    cfg = compose_config()
    return "dp" in cfg.train


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
            gen = torch.Generator().manual_seed(derive_seed(0, reg.user_id))
            near[str(reg.user_id)] = nearest_is_member(feats, *members[reg.user_id], gen)
        recovered[name] = rows
        per_user = {str(r.user): _mean([float(p == r.label) for p in r.named]) for r in rows}
        inversion[name] = {
            "score": _mean(list(per_user.values())),
            "users_recovered": sum(v > 0.5 for v in per_user.values()),
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


# ---------------------------------------------------------------- outputs


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if np.isnan(value) else f"{value:.{digits}f}"
    return str(value)


SETTING_LABELS = {"none": "none (default recipe)", "none-dp-recipe": "none (DP recipe, no noise)"}


def setting_label(setting: str) -> str:
    return SETTING_LABELS.get(setting, setting.replace("eps-", "epsilon = "))


def summary(report: Mapping[str, Any]) -> str:
    """The markdown tables of ``report`` (``results.json``)."""
    lines: list[str] = []
    for dataset, runs in report["datasets"].items():
        if not runs:
            continue
        first = next(iter(runs.values()))
        kind = first["kind"]
        score = (
            "fraction of recovered digits that a public 5-NN classifier names as the user's "
            "(chance 0.1)"
            if kind == "classes"
            else "fraction of registered users whose recovered template is nearest to their own "
            "held-out photos among the registered people (chance 1 / users registered)"
        )
        lines += [
            f"### {dataset}",
            "",
            f"Inversion score: {score}. Membership: AUROC of the uploaded autoencoder's error, "
            "training images vs other images of the class, mean over users (min-max).",
            "",
            "| setting | users registered | epsilon spent (max) | noise multiplier | "
            "overall acc. | guarded acc. | acceptance | membership AUROC | inversion (prior) | "
            "inversion (pixels + fixed point) | train s / user | DP overhead |",
            "|" + "---|" * 12,
        ]
        control = runs.get("none-dp-recipe", {}).get("train_seconds_mean")
        for setting, r in runs.items():
            m = r["membership"]
            inv = r["inversion"]
            overhead = "-"
            if setting.startswith("eps-") and control:
                overhead = f"{r['train_seconds_mean'] / control:.2f}x"
            cells = [
                setting_label(setting),
                f"{r['users']}",
                _fmt(r.get("epsilon_spent_max"), 2),
                _fmt(r.get("noise_multiplier_mean"), 2),
                _fmt(r.get("overall_accuracy"), 4),
                _fmt(r.get("guarded_accuracy"), 4),
                _fmt(r.get("acceptance_rate"), 4),
                f"{m['auroc']:.3f} ({m['min']:.2f}-{m['max']:.2f})",
                _fmt(inv["prior"]["score"], 3) if "prior" in inv else "-",
                _fmt(inv["pixels"]["score"], 3) if "pixels" in inv else "-",
                _fmt(r.get("train_seconds_mean"), 1),
                overhead,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for setting, r in runs.items():
            inv = r["inversion"]
            if kind == "classes":
                found = ", ".join(
                    f"{name} attack for {inv[name]['users_recovered']}"
                    for name in ("prior", "pixels")
                    if name in inv
                )
                near = ", ".join(
                    f"{name} {inv[name]['nearest_is_member']:.2f}"
                    for name in ("prior", "pixels")
                    if name in inv
                )
                lines.append(
                    f"- {setting_label(setting)}: a majority of the restarts is named as the "
                    f"user's digit ({found}) of {r['users']} autoencoders; the prior's "
                    f"starting points score {inv['start']['score']:.3f}; nearest image is a "
                    f"training image (balanced, 0.5 = none memorised): {near}."
                )
            else:
                p = inv["prior"]
                lines.append(
                    f"- {setting_label(setting)}: recovered template identifies "
                    f"{p['users_recovered']} of {r['users']} users among the registered, "
                    f"{p['identified_among_all']:.2f} among all {r['public']['people']} people; "
                    f"distance to own held-out photos {p['distance_own']:.3f}, to own "
                    f"training photos {p['distance_training_photos']:.3f}, to the nearest other "
                    f"person {p['distance_nearest_other']:.3f} ({r['public']['distance_unit']}"
                    + (
                        f"; within {FACE_TOLERANCE}: {p['within_tolerance']:.2f}"
                        if p.get("within_tolerance") is not None
                        else ""
                    )
                    + f"); starting points: {inv['start']['score']:.2f}"
                    + (
                        f"; pixel attack: {inv['pixels']['users_recovered']} of {r['users']}."
                        if "pixels" in inv
                        else "."
                    )
                )
        if kind == "classes":
            pub = first["public"]
            lines.append(
                f"- The public {pub['classifier']} classifier ({pub['images']}, "
                f"{pub['num_images']} images) names "
                f"{pub['classifier_accuracy_on_second_half']:.3f} of the other half correctly."
            )
        lines.append("")
    if report.get("skipped"):
        lines.append(f"Not run: {report['skipped']}")
    return "\n".join(lines) + "\n"


def _file_tag(dataset: str, setting: str) -> str:
    return f"inversion_{dataset}.png" if setting == "none" else f"inversion_{dataset}_{setting}.png"


def plot_classes(attacked: Attacked, path: Path, title: str) -> None:
    """One row per user: recovered inputs (prior attack, then pixel attack) as images."""
    rows = attacked.recovered.get("prior") or next(iter(attacked.recovered.values()))
    pixels = attacked.recovered.get("pixels", [])
    shape = attacked.image_shape[:2]
    per = min(SHOWN, rows[0].features.shape[0])
    extra = min(3, pixels[0].features.shape[0]) if pixels else 0
    cols = per + extra
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.9 + 1.6, len(rows) * 0.95 + 0.8))
    axes = np.atleast_2d(axes)
    for i, rec in enumerate(rows):
        items = [(rec.features[j], rec.named[j]) for j in range(per)]
        if pixels:
            items += [(pixels[i].features[j], pixels[i].named[j]) for j in range(extra)]
        for j, (feat, named) in enumerate(items):
            ax = axes[i, j]
            if int(np.prod(shape)) == feat.numel():
                ax.imshow(feat.reshape(shape).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            color = "tab:green" if named == rec.label else "tab:red"
            ax.set_title(str(named), fontsize=7, color=color, pad=1)
        hits = sum(n == rec.label for n in rec.named)
        axes[i, 0].set_ylabel(
            f"u{rec.user} ({rec.label})\n{hits}/{len(rec.named)}",
            fontsize=7,
            rotation=0,
            ha="right",
        )
    if pixels:
        axes[0, per].set_title(f"pixels\n{pixels[0].named[0]}", fontsize=7, pad=1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_people(attacked: Attacked, path: Path, title: str) -> None:
    """Distances of each recovered template to every registered person, and the photo it matches.

    The face descriptor has no image decoder: what is shown is who the template identifies.
    """
    users = sorted(attacked.distances)
    people = sorted({p for d in attacked.distances.values() for p in d})
    mat = np.array([[attacked.distances[u][p] for p in people] for u in users])
    fig = plt.figure(figsize=(11, 0.55 * len(users) + 2.2))
    grid = fig.add_gridspec(len(users), 4, width_ratios=[6, 0.2, 1, 1])
    ax = fig.add_subplot(grid[:, 0])
    im = ax.imshow(mat, cmap="viridis_r")
    for i in range(len(users)):
        for j in range(len(people)):
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    label_of = {r.user: r.label for r in attacked.recovered["prior"]}
    ax.set_xticks(range(len(people)), [f"s{p + 1}" for p in people], fontsize=7)
    ax.set_yticks(range(len(users)), [f"u{u} (s{label_of[u] + 1})" for u in users], fontsize=7)
    ax.set(xlabel="registered person (their held-out photos)", ylabel="inverted autoencoder")
    ax.set_title("distance of the recovered template to each person", fontsize=8)
    fig.colorbar(im, cax=fig.add_subplot(grid[:, 1]))
    for i, u in enumerate(users):
        own, nearest, who = attacked.photos[u]
        for j, (img, text) in enumerate(((own, f"s{label_of[u] + 1}"), (nearest, f"s{who + 1}"))):
            a = fig.add_subplot(grid[i, 2 + j])
            a.imshow(img, cmap="gray")
            a.set_xticks([])
            a.set_yticks([])
            color = "k" if j == 0 else ("tab:green" if who == label_of[u] else "tab:red")
            a.set_ylabel(text, fontsize=6, rotation=0, ha="right", color=color)
            if i == 0:
                a.set_title("own photo" if j == 0 else "nearest\nto template", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_tradeoff(report: Mapping[str, Any], path: Path) -> None:
    """Accuracy, Guard, membership AUROC, inversion score and training time per setting."""
    panels = [
        ("overall_accuracy", "overall accuracy"),
        ("guarded_accuracy", "guarded accuracy"),
        ("acceptance_rate", "acceptance"),
        ("membership", "membership AUROC"),
        ("inversion", "inversion score (prior attack)"),
        ("train_seconds_mean", "training s / user"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.4))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for dataset, runs in report["datasets"].items():
            names = list(runs)
            ys = []
            for r in runs.values():
                if key == "membership":
                    ys.append(r["membership"]["auroc"])
                elif key == "inversion":
                    ys.append(r["inversion"]["prior"]["score"])
                else:
                    v = r.get(key)
                    ys.append(np.nan if v is None else float(v))
            xs = range(len(names))
            ax.plot(xs, ys, marker="o", label=dataset)
            ax.set_xticks(
                xs,
                [n.replace("eps-", "ε=").replace("-dp-recipe", "\n(DP rec.)") for n in names],
                fontsize=7,
            )
        ax.set_title(label, fontsize=9)
        if key in ("membership", "inversion"):
            ax.axhline(0.5 if key == "membership" else 0.1, color="grey", ls=":", lw=1)
        if key != "train_seconds_mean":
            ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(
    out: Path,
    report: dict[str, Any],
    attacked: Mapping[str, Mapping[str, Attacked]],
) -> str:
    """``results.json``, ``summary.md`` and the PNGs of ``report``; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    md = summary(report)
    (out / "summary.md").write_text(md)
    for dataset, runs in attacked.items():
        for setting, a in runs.items():
            title = f"{dataset}, {setting_label(setting)}: what inverting each upload recovers"
            if a.kind == "classes":
                plot_classes(a, out / _file_tag(dataset, setting), title)
            else:
                plot_people(a, out / _file_tag(dataset, setting), title)
    if any(report["datasets"].values()):
        plot_tradeoff(report, out / "tradeoff.png")
    return md


def relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when below it, else its name (no machine paths)."""
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return path.name


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "load_average_1_5_15": [round(v, 2) for v in load]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("privacy"))
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--epsilons", nargs="+", default=["1", "4", "8", "none"])
    parser.add_argument("--dp-recipe", default="dp", help="train config group of the DP runs")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs")
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every run")
    parser.add_argument(
        "--attack", nargs="+", type=Path, default=None, help="attack these run folders only"
    )
    args = parser.parse_args()
    for e in args.epsilons:
        if e != "none" and not float(e) > 0:
            parser.error(f"epsilon must be > 0 or 'none', got {e}")
    start = time.time()
    report: dict[str, Any] = {"machine_start": machine(), "datasets": {}}
    attacked: dict[str, dict[str, Attacked]] = {}
    if args.attack:
        for folder in args.attack:
            a = attack_run(folder)
            name = folder.name
            report["datasets"].setdefault(a.kind, {})[name] = {
                **a.numbers,
                "run": relative(folder, args.out),
            }
            attacked.setdefault(a.kind, {})[name] = a
    else:
        dp = dp_available()
        settings = settings_for(args.epsilons, args.dp_recipe, dp)
        if not dp and any(e != "none" for e in args.epsilons):
            report["skipped"] = "DP settings (this checkout has no train.dp option)"
            print("train.dp is not in conf/train: running the settings without DP only")
        for dataset in args.datasets:
            report["datasets"][dataset] = {}
            attacked[dataset] = {}
            for setting in settings:
                folder = args.out / "runs" / dataset / setting
                overrides = overrides_for(dataset, setting, args.dp_recipe, args.extra)
                launch(overrides, folder, reuse=args.reuse, needs=["filter"])
                a = attack_run(folder)
                print(
                    f"{dataset} {setting}: inversion {a.numbers['inversion']['prior']['score']:.3f}"
                    f", membership AUROC {a.numbers['membership']['auroc']:.3f}"
                    f" ({a.numbers['attack_seconds']:.0f}s)",
                    flush=True,
                )
                report["datasets"][dataset][setting] = {
                    **a.numbers,
                    "overrides": overrides,
                    "run": relative(folder, args.out),
                }
                attacked[dataset][setting] = a
    report["seconds"] = time.time() - start
    report["machine_end"] = machine()
    md = write_outputs(args.out, report, attacked)
    print(md)
    print(f"privacy.py: {report['seconds']:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
