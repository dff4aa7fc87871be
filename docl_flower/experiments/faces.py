"""The paper's face experiment on the ORL faces: 10 people of 40 per draw, several draws.

Each (extractor, draw) is one ``docl-flower`` run (Flower simulation): ``dataset=att_faces
partition=random_classes seed=DRAW``: 10 users are 10 people drawn at random from the 40,
each with 7 training and 3 test photos; the harmless uploads are the 300 photos of the 30
people nobody registered (new identities, as in the paper). From each run's saved filter:
overall and per-person accuracy, the Guard trade-off over alpha (the paper's two-sided
interval and the one-sided one), AUROC, scalability (k of the 10 registered). For the
extractors in ``adversaries``, the adversary matrix of draw 0, by the protocol of
:mod:`docl_flower.experiments.adversaries` (one more run: an adversary trains on its own and
the victim's training photos through its Flower client, with the run's recipe, and registers
as itself). :func:`run_faces` writes ``OUT/faces.json``, ``OUT/summary.md`` and PNGs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from docl_flower.core.evaluation.analysis import alpha_sweep, scalability
from docl_flower.core.evaluation.metrics import auroc, overall_accuracy, per_class_accuracy
from docl_flower.core.filter.global_filter import ArgminGuard, GlobalFilter, Registration
from docl_flower.core.filter.store import load_filter
from docl_flower.core.pipeline.config import Experiment
from docl_flower.core.pipeline.inputs import server_sets
from docl_flower.experiments import adversaries
from docl_flower.experiments.figures import ALPHAS, KS
from docl_flower.experiments.plotting import LEGEND_TEXT, SMALL_TEXT, plt, save
from docl_flower.federation.components import load_experiment
from docl_flower.operations.runs import launch

#: The Guard's two intervals: the paper's ``mu +- alpha*sigma`` and ``d <= mu + alpha*sigma``.
SIDES = ("two", "one")
#: The draw whose adversary matrix is measured (one: the 90 adversaries cost a run each draw).
ADVERSARY_DRAW = 0
LABELS = {
    "face": "dlib face descriptor (128-d)",
    "imagenet": "EfficientNet-Lite0 ImageNet (1280-d)",
    "identity": "raw pixels (10,304-d)",
}
#: The paper's face results (Sec. 3): IMDB faces, ResNet features, M = 32 and M = 132.
PAPER = {"overall_accuracy": "0.92 (M = 32), 0.97 (M = 132)"}
#: Figure sizes in inches (at :data:`DPI`).
SIZES = {"tradeoff": (7, 4.5), "scalability": (6, 4), "adversaries": (9, 4)}
DPI = 110
#: Axes of fractions end a little past 1 so that points at 1 show.
UNIT_AXIS = (0, 1.02)
#: Shrink of the colour bar beside the adversary panels.
COLOURBAR_SHRINK = 0.8


@dataclass(frozen=True)
class FaceSettings:
    """What ``scripts/faces.py`` runs (its command-line options)."""

    out: Path = Path("faces")
    #: Draws of 10 people (seeds 0 ... draws - 1).
    draws: int = 5
    extractors: tuple[str, ...] = ("face", "imagenet", "identity")
    #: Extractors whose adversary matrix (draw 0) is measured.
    adversaries: tuple[str, ...] = ("face",)
    #: The Guard's alpha of the summary's columns and of the adversary matrices.
    alpha: float = 1.5
    #: The "best" column: the highest guarded accuracy with at least this acceptance.
    acceptance: float = 0.98
    #: Random subsets of people per k for the scalability table.
    subsets: int = 10
    reuse: bool = False
    #: Hydra overrides for every run.
    extra: tuple[str, ...] = ()


def run_dir(out: Path, extractor: str, draw: int) -> Path:
    """The folder of one (extractor, draw) run."""
    return out / "runs" / extractor / f"draw-{draw}"


def adversary_dir(out: Path, extractor: str) -> Path:
    """The folder of an extractor's adversary run (next to its draws)."""
    return out / "runs" / extractor / f"adversaries-draw-{ADVERSARY_DRAW}"


def base_overrides(extractor: str, draw: int, extra: Sequence[str]) -> list[str]:
    """Data, features and draw of a run (the partition comes after)."""
    return ["dataset=att_faces", f"features={extractor}", f"seed={draw}", *extra]


def run_overrides(extractor: str, draw: int, extra: Sequence[str]) -> list[str]:
    """The Hydra overrides of one honest run: 10 of the 40 people, drawn with seed ``draw``."""
    data, features, seed, *rest = base_overrides(extractor, draw, extra)
    return [data, features, "partition=random_classes", seed, *rest]


def run_faces(settings: FaceSettings) -> tuple[dict[str, Any], str]:
    """Every run, then ``faces.json``, ``summary.md`` and the PNGs in ``settings.out``.

    Returns the report and the summary.
    """
    start = time.time()
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"draws": settings.draws, "alpha": settings.alpha, "extractors": {}}
    report["adversaries"] = {}
    for name in settings.extractors:
        runs = []
        for draw in range(settings.draws):
            folder = run_dir(out, name, draw)
            overrides = run_overrides(name, draw, settings.extra)
            launch(overrides, folder, reuse=settings.reuse, needs=adversaries.NEEDS)
            numbers, exp, honest = analyse_run(folder, settings.subsets)
            runs.append(numbers)
            if draw == ADVERSARY_DRAW and name in settings.adversaries:
                report["adversaries"][name] = adversary_matrices(
                    exp, honest, folder, settings, name
                )
        report["extractors"][name] = runs
    report["seconds"] = time.time() - start
    (out / "faces.json").write_text(json.dumps(report, indent=1) + "\n")
    md = summarise(report, settings.alpha, settings.acceptance)
    (out / "summary.md").write_text(md)
    plot(report, out)
    return report, md


def adversary_matrices(
    exp: Experiment, honest: list[Registration], folder: Path, settings: FaceSettings, name: str
) -> dict[str, list[list[float]]]:
    """Fig. 4 for one draw: the adversaries' run, then one matrix per side of the Guard."""
    base = base_overrides(name, ADVERSARY_DRAW, settings.extra)
    found = adversaries.run_adversaries(
        folder, adversary_dir(settings.out, name), base, reuse=settings.reuse
    )
    pairs, _ = adversaries.adversarial_pairs(honest, found / "filter")
    sets = server_sets(exp)
    guards = {sided: ArgminGuard(settings.alpha, sided) for sided in SIDES}
    return adversaries.adversary_matrices(
        honest, pairs, sets.x_test, sets.y_test, guards, exp.scoring
    )


def analyse_run(folder: Path, subsets: int) -> tuple[dict[str, Any], Experiment, list[Any]]:
    """Every number of one run, from its saved filter and config."""
    exp = load_experiment(folder / "experiment.yaml")
    regs, _ = load_filter(folder / "filter")
    honest = sorted(regs, key=lambda r: r.label)
    flt = GlobalFilter(honest, exp.scoring)
    sets = server_sets(exp)
    scores = flt.scores(sets.x_test)
    labels = sets.y_test
    mask = torch.isin(labels, flt.labels)
    out: dict[str, Any] = {
        "people": sorted(int(r.label) for r in honest),
        "overall_accuracy": overall_accuracy(flt, scores, labels),
        "per_person_accuracy": {
            str(k): v for k, v in per_class_accuracy(flt, scores, labels).items()
        },
        "fallbacks": sets.fallbacks,
    }
    if sets.harmless is None:
        raise ValueError(f"{folder}: no harmless photos (att_faces: the unregistered people's)")
    harmless = flt.scores(sets.harmless)
    out["num_harmless"] = int(harmless.shape[0])
    out["auroc"] = auroc(flt.predict(scores[mask])[1].numpy(), flt.predict(harmless)[1].numpy())
    out["alpha_sweep"] = {
        sided: alpha_sweep(
            flt,
            partial(ArgminGuard, sided=sided),
            scores,
            labels,
            harmless,
            ALPHAS,
        )
        for sided in SIDES
    }
    out["scalability"] = {
        str(k): float(np.mean(list(v.values())))
        for k, v in scalability(
            flt, scores, labels, [k for k in KS if k <= flt.size], subsets, exp.seed
        ).items()
    }
    return out, exp, honest


def at_alpha(sweep: list[dict[str, float]], alpha: float) -> dict[str, float]:
    """The row of ``sweep`` at ``alpha``."""
    return next(r for r in sweep if np.isclose(r["alpha"], alpha))


def best_at_acceptance(sweep: list[dict[str, float]], level: float) -> dict[str, float] | None:
    """The alpha with the highest guarded accuracy whose acceptance is at least ``level``."""
    ok = [r for r in sweep if r["acceptance_rate"] >= level]
    return max(ok, key=lambda r: (r["guarded_accuracy"], -r["alpha"])) if ok else None


def mean_std(values: list[float]) -> str:
    """``mean ± std`` with three decimals."""
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def summarise(report: dict[str, Any], alpha: float, level: float) -> str:
    """The markdown summary of ``report`` (``faces.json``)."""
    lines = [
        f"Mean ± std over {report['draws']} draws of 10 people (ORL, 7 train / 3 test photos "
        f"each; harmless: the 300 photos of the 30 unregistered people). Guard columns at "
        f"alpha = {alpha}; 'best' = highest guarded accuracy with acceptance >= {level}.",
        "",
        "| extractor | overall acc. | worst person | AUROC | guarded (two-sided) | "
        "acceptance (two-sided) | guarded (one-sided) | acceptance (one-sided) | "
        "best one-sided: alpha, guarded, acceptance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in report["extractors"].items():
        overall = [r["overall_accuracy"] for r in runs]
        worst = [min(r["per_person_accuracy"].values()) for r in runs]
        cells = [mean_std(overall), mean_std(worst), mean_std([r["auroc"] for r in runs])]
        for sided in SIDES:
            rows = [at_alpha(r["alpha_sweep"][sided], alpha) for r in runs]
            cells.append(mean_std([x["guarded_accuracy"] for x in rows]))
            cells.append(mean_std([x["acceptance_rate"] for x in rows]))
        best = [best_at_acceptance(r["alpha_sweep"]["one"], level) for r in runs]
        found = [b for b in best if b is not None]
        if len(found) == len(best):
            cells.append(
                f"{mean_std([b['alpha'] for b in found])}, "
                f"{mean_std([b['guarded_accuracy'] for b in found])}, "
                f"{mean_std([b['acceptance_rate'] for b in found])}"
            )
        else:
            cells.append(f"none reaches {level}")
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    lines += ["", f"Paper (IMDB faces, ResNet features): overall {PAPER['overall_accuracy']}."]
    if report.get("adversaries"):
        lines += [
            "",
            f"Adversary matrix (draw {ADVERSARY_DRAW}): mean fraction of the victim's test "
            "photos blocked",
        ]
        for name, mats in report["adversaries"].items():
            for sided in SIDES:
                off = adversaries.off_diagonal(mats[sided])
                lines.append(
                    f"- {LABELS.get(name, name)}, {sided}-sided: mean {np.nanmean(off):.3f}, "
                    f"min {np.nanmin(off):.3f}"
                )
    scal = []
    for name, runs in report["extractors"].items():
        row = [
            f"{np.mean([r['scalability'][str(k)] for r in runs]):.3f}"
            if all(str(k) in r["scalability"] for r in runs)
            else "-"
            for k in KS
        ]
        scal.append(f"| {LABELS.get(name, name)} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Scalability: mean per-person accuracy with k of the 10 people registered",
        "",
        "| extractor | " + " | ".join(f"k = {k}" for k in KS) + " |",
        "|---|" + "---|" * len(KS),
        *scal,
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """The trade-off, scalability and adversary PNGs of ``report``; returns their paths."""
    fig, ax = plt.subplots(figsize=SIZES["tradeoff"])
    for name, runs in report["extractors"].items():
        for sided, style in (("two", "--"), ("one", "-")):
            g = np.mean([[x["guarded_accuracy"] for x in r["alpha_sweep"][sided]] for r in runs], 0)
            a = np.mean([[x["acceptance_rate"] for x in r["alpha_sweep"][sided]] for r in runs], 0)
            ax.plot(a, g, style, marker=".", label=f"{name}, {sided}-sided")
    ax.set(xlabel="acceptance of new identities", ylabel="guarded accuracy", xlim=UNIT_AXIS)
    ax.set_title(
        f"ORL faces, 10 of 40 people, mean over draws (alpha {ALPHAS[0]} ... {ALPHAS[-1]:g})"
    )
    ax.legend(fontsize=SMALL_TEXT)
    paths = [save(fig, out / "faces_tradeoff.png", DPI)]
    fig, ax = plt.subplots(figsize=SIZES["scalability"])
    for name, runs in report["extractors"].items():
        ks = [k for k in KS if all(str(k) in r["scalability"] for r in runs)]
        ys = [np.mean([r["scalability"][str(k)] for r in runs]) for k in ks]
        ax.plot(ks, ys, marker="o", label=name)
    ax.set(xlabel="people registered (k)", ylabel="mean per-person accuracy", ylim=UNIT_AXIS)
    ax.legend(fontsize=LEGEND_TEXT)
    paths.append(save(fig, out / "faces_scalability.png", DPI))
    for name, mats in report.get("adversaries", {}).items():
        fig, axes = plt.subplots(1, len(SIDES), figsize=SIZES["adversaries"])
        image: Any = None
        for axis, sided in zip(axes, SIDES, strict=True):
            image = adversaries.draw_matrix(axis, mats[sided], numbers=False)
            axis.set(title=f"{sided}-sided", xlabel="victim", ylabel="adversary")
        fig.colorbar(image, ax=axes, shrink=COLOURBAR_SHRINK, label="victim's photos blocked")
        paths.append(save(fig, out / f"faces_adversaries_{name}.png", DPI, tight=False))
    return paths
