"""The paper's evaluation (Fig. 2-5), the imbalance study and the strict Guard, on MNIST.

Three ``docl-flower`` runs (Flower simulations) train every autoencoder the figures use:

1. ``honest``: the default experiment (10 users, user i owns digit i);
2. ``adversaries``: one user per ordered pair (a, v) of the honest users' digits, trained on
   a's and v's images and registered as a's (:mod:`docl_flower.experiments.adversaries`);
3. ``imbalance``: 15 users keeping 1%, 5% or 10% of the images of digits 1, 3, 5, 7, 9
   (``partition=imbalance``).

The alpha sweep, the ROC curve and the class subsets of Fig. 5 reuse the honest filter (no
retraining). :func:`run_figures` writes ``OUT/analysis.json``, PNGs and ``OUT/summary.md``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from docl_flower.core.evaluation.analysis import alpha_sweep, roc_curve, scalability, swap_in
from docl_flower.core.evaluation.metrics import overall_accuracy, per_class_accuracy
from docl_flower.core.filter.global_filter import GUARDS, GlobalFilter, Registration
from docl_flower.core.filter.store import load_filter
from docl_flower.experiments import adversaries
from docl_flower.experiments.plotting import LEGEND_TEXT, SMALL_TEXT, TITLE_TEXT, plt, save
from docl_flower.federation.components import load_experiment
from docl_flower.operations.runs import launch

#: Fig. 3's Guard widths: alpha from 0.25 to 5 in steps of 0.25 (1.5, the default, inside;
#: at 5 nearly every image of a registered class lies in its interval).
ALPHAS = [round(float(a), 2) for a in np.arange(1, 21) * 0.25]
#: Fig. 5's numbers of registered classes: odd k up to 9 of the 10 users.
KS = [1, 3, 5, 7, 9]
#: The Guard rules compared (the paper's and the strict one), at the honest run's alpha.
RULES = GUARDS
#: The paper's numbers that the summary puts beside ours (Sec. 4, Fig. 2 and Fig. 4).
PAPER_OVERALL = 0.97
PAPER = {
    "overall_accuracy": PAPER_OVERALL,
    "class_0": "> 0.99",
    "class_9": "about 0.95",
    "u7_vs_u2_blocked": "about 0.7 (u7 succeeds about 3 times in 10)",
}
#: The adversary pair the paper quotes (adversary u7, victim u2), as (row, column).
PAPER_PAIR = (7, 2)
#: The digits whose accuracy the paper quotes (its best and worst class).
PAPER_DIGITS = ("0", "9")
#: Alphas annotated on Fig. 3 and listed in the summary's trade-off table.
ANNOTATED_ALPHAS = (1.0, 1.5, 2.0)
TABLE_ALPHAS = (1.0, 1.5, 2.0, 3.0)
#: Fig. 2's y axis starts here: every digit lies above it, and the differences show.
FIG2_FLOOR = 0.85
#: Figure sizes in inches (at :data:`DPI`), sized for the README's page width.
SIZES = {
    "fig2": (6, 3.4),
    "fig3": (5.5, 4),
    "roc": (4.5, 4),
    "fig4": (10, 4.4),
    "fig5": (6, 4),
    "imbalance": (6.5, 3.6),
}
DPI = 110
#: Share of a tick's width that the grouped bars of the imbalance plot fill.
BAR_GROUP = 0.8
#: Fig. 5's legend: 10 users in two rows of 5. The imbalance legend sits below the axes
#: (anchor in axes fractions: centred, under the tick labels), as the bars fill the plot.
LEGEND_COLUMNS = 5
LEGEND_BELOW = (0.5, -0.3)
#: Shrink of the colour bar beside Fig. 4's panels (the suptitle needs the top).
COLOURBAR_SHRINK = 0.8


@dataclass(frozen=True)
class FigureSettings:
    """What ``scripts/figures.py`` runs (its command-line options)."""

    out: Path = Path("figures")
    #: Adversary autoencoders train for this many epochs (the honest ones for 100): keeps
    #: the 90 of them within the time budget.
    adversary_epochs: int = 30
    #: Random class subsets per k for Fig. 5.
    subsets: int = 10
    seed: int = 0
    #: Reuse finished runs in ``OUT/runs``.
    reuse: bool = False
    #: Hydra overrides for every run.
    extra: tuple[str, ...] = ()


# ------------------------------------------------------------------------ Flower runs
def run_docl(out: Path, overrides: list[str], reuse: bool) -> Path:
    """Run ``docl-flower`` into ``out`` (or reuse a finished run there with its filter)."""
    launch(overrides, out, reuse=reuse, needs=adversaries.NEEDS)
    return out


def run_figures(settings: FigureSettings) -> tuple[dict[str, Any], list[Path], str]:
    """The three runs, then ``analysis.json``, the PNGs and ``summary.md`` in ``settings.out``.

    Returns the analysis, the PNG paths and the summary.
    """
    start = time.time()
    runs = settings.out / "runs"
    base = [f"seed={settings.seed}", *settings.extra]
    honest = run_docl(runs / "honest", base, settings.reuse)
    # The adversaries skip the minimum step count: 30 epochs of two digits are enough steps.
    adversary_recipe = [f"train.epochs={settings.adversary_epochs}", "train.min_steps=0"]
    adversary = adversaries.run_adversaries(
        honest, runs / "adversaries", base, adversary_recipe, settings.reuse
    )
    imbalance = run_docl(runs / "imbalance", [*base, "partition=imbalance"], settings.reuse)
    raw = analyze(honest, adversary, imbalance, settings.subsets, settings.seed)
    # A JSON round trip so that plots and the summary see exactly what analysis.json holds.
    analysis: dict[str, Any] = json.loads(json.dumps(raw))
    analysis["wall_seconds"] = time.time() - start
    (settings.out / "analysis.json").write_text(json.dumps(analysis, indent=1) + "\n")
    paths = plot(analysis, settings.out)
    text = summary(analysis)
    (settings.out / "summary.md").write_text(text)
    return analysis, paths, text


# ------------------------------------------------------------------------ analysis
def _as_user(reg: Registration, user: int) -> Registration:
    return replace(reg, user_id=user)


def analyze(
    honest_dir: Path,
    adversary_dir: Path | None,
    imbalance_dir: Path | None,
    subsets: int,
    seed: int,
) -> dict[str, Any]:
    """Every number of the figures, from saved filters and the honest run's config."""
    exp = load_experiment(honest_dir / "experiment.yaml")
    honest, _ = load_filter(honest_dir / "filter")
    honest = sorted(honest, key=lambda r: r.label)
    user_of = {r.label: r.user_id for r in honest}
    flt = GlobalFilter(honest, exp.scoring)
    images, labels_np = exp.dataset.load("test")
    labels = torch.as_tensor(labels_np)
    x = exp.features(images)
    scores = flt.scores(x)
    out: dict[str, Any] = {
        "seed": exp.seed,
        "alpha": exp.guard.alpha,
        "overall_accuracy": overall_accuracy(flt, scores, labels),
        "per_class_accuracy": per_class_accuracy(flt, scores, labels),
    }
    if exp.harmless is not None:
        harmless = flt.scores(exp.features(exp.harmless.load("test")[0]))
        out["alpha_sweep"] = {
            name: alpha_sweep(flt, rule, scores, labels, harmless, ALPHAS)
            for name, rule in RULES.items()
        }
        mask = torch.isin(labels, flt.labels)
        out["roc"] = roc_curve(
            flt.predict(scores[mask])[1].numpy(), flt.predict(harmless)[1].numpy()
        )
    out["scalability"] = {
        str(k): v
        for k, v in scalability(
            flt, scores, labels, [k for k in KS if k <= flt.size], subsets, seed
        ).items()
    }
    out["scalability_subsets"] = subsets
    if adversary_dir is not None:
        pairs, meta = adversaries.adversarial_pairs(honest, adversary_dir / "filter")
        out["adversary_epochs"] = meta["config"]["train"]["epochs"]
        guards = {name: rule(exp.guard.alpha) for name, rule in RULES.items()}
        out["adversaries"] = adversaries.adversary_matrices(
            honest, pairs, x, labels, guards, exp.scoring
        )
    if imbalance_dir is not None:
        regs, meta = load_filter(imbalance_dir / "filter")
        by_fraction: dict[float, list[Registration]] = {}
        for reg, entry in zip(regs, meta["entries"], strict=True):
            if reg.label in user_of:  # a reduced class that no honest user holds: no swap
                by_fraction.setdefault(float(entry["fraction"]), []).append(
                    _as_user(reg, user_of[reg.label])
                )
        out["imbalance"] = {}
        for frac, repl in sorted(by_fraction.items()):
            mixed = GlobalFilter(swap_in(honest, repl), exp.scoring)
            s = mixed.scores(x)
            out["imbalance"][str(frac)] = {
                "reduced_classes": sorted(r.label for r in repl),
                "num_examples": {str(r.label): r.num_examples for r in repl},
                "overall_accuracy": overall_accuracy(mixed, s, labels),
                "per_class_accuracy": per_class_accuracy(mixed, s, labels),
            }
    return out


# ------------------------------------------------------------------------ plots
def _lookup(values: dict[Any, Any], key: int) -> Any:
    """``values[key]`` whether the keys are ints (fresh) or strings (from JSON); None if absent."""
    return values.get(str(key), values.get(key))


def plot(a: dict[str, Any], out: Path) -> list[Path]:
    """Write one PNG per figure; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    pc = {int(k): v for k, v in a["per_class_accuracy"].items()}
    fig, ax = plt.subplots(figsize=SIZES["fig2"])
    ax.bar(list(pc), list(pc.values()), color="tab:blue", label="docl-flower")
    label = f"paper overall ({PAPER_OVERALL})"
    ax.axhline(PAPER_OVERALL, ls="--", c="k", lw=1, label=label)
    ax.axhline(a["overall_accuracy"], ls=":", c="tab:blue", lw=1, label="ours overall")
    ax.set(xlabel="class (user)", ylabel="accuracy", ylim=(FIG2_FLOOR, 1.0), xticks=list(pc))
    ax.set_title("Fig. 2: per-class accuracy, MNIST, 10 users")
    ax.legend(loc="lower left", fontsize=LEGEND_TEXT)
    paths.append(save(fig, out / "fig2_per_class.png", DPI))

    if "alpha_sweep" in a:
        paths += _plot_tradeoff(a, out)
    if "adversaries" in a:
        paths.append(_plot_adversaries(a, out))

    fig, ax = plt.subplots(figsize=SIZES["fig5"])
    ks = sorted(int(k) for k in a["scalability"])
    classes = sorted({int(c) for v in a["scalability"].values() for c in v})
    for c in classes:
        ax.plot(ks, [_lookup(a["scalability"][str(k)], c) for k in ks], marker="o", label=f"u{c}")
    ax.set(xlabel="number of registered classes k", ylabel="per-class accuracy", xticks=ks)
    ax.set_title(f"Fig. 5: mean over {a['scalability_subsets']} random subsets per k")
    ax.legend(ncol=LEGEND_COLUMNS, fontsize=SMALL_TEXT)
    paths.append(save(fig, out / "fig5_scalability.png", DPI))

    if "imbalance" in a:
        paths.append(_plot_imbalance(a, pc, out))
    return paths


def _plot_tradeoff(a: dict[str, Any], out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=SIZES["fig3"])
    for name, rows in a["alpha_sweep"].items():
        acc = [r["acceptance_rate"] for r in rows]
        gacc = [r["guarded_accuracy"] for r in rows]
        ax.plot(acc, gacc, marker=".", label=f"{name} Guard")
        for r in rows:
            if r["alpha"] in ANNOTATED_ALPHAS:
                ax.annotate(
                    f"a={r['alpha']}",
                    (r["acceptance_rate"], r["guarded_accuracy"]),
                    fontsize=SMALL_TEXT,
                )
    ax.set(
        xlabel="acceptance rate (Fashion-MNIST shared)",
        ylabel="guarded accuracy (MNIST blocked, right class)",
    )
    ax.set_title(f"Fig. 3: alpha from {ALPHAS[0]} to {ALPHAS[-1]}")
    ax.legend(fontsize=LEGEND_TEXT)
    first = save(fig, out / "fig3_tradeoff.png", DPI)
    fig, ax = plt.subplots(figsize=SIZES["roc"])
    ax.plot(a["roc"]["fpr"], a["roc"]["tpr"])
    ax.plot([0, 1], [0, 1], ls=":", c="gray")
    ax.set(
        xlabel="MNIST test images flagged harmless (FPR)",
        ylabel="Fashion-MNIST flagged harmless (TPR)",
    )
    ax.set_title(
        f"ROC of the min. reconstruction error, AUROC {a['roc']['auroc']:.4f}", fontsize=TITLE_TEXT
    )
    return [first, save(fig, out / "fig3_roc.png", DPI)]


def _plot_adversaries(a: dict[str, Any], out: Path) -> Path:
    fig, axes = plt.subplots(1, len(a["adversaries"]), figsize=SIZES["fig4"])
    image: Any = None
    for ax, (name, matrix) in zip(np.atleast_1d(axes), a["adversaries"].items(), strict=True):
        image = adversaries.draw_matrix(ax, matrix, numbers=True)
        size = len(matrix)
        ax.set(xlabel="victim v", ylabel="adversary a", xticks=range(size), yticks=range(size))
        ax.set_title(f"{name} Guard (alpha {a['alpha']}): v's images blocked", fontsize=TITLE_TEXT)
    fig.colorbar(image, ax=axes, shrink=COLOURBAR_SHRINK)
    fig.suptitle("Fig. 4: adversary a trains on its own and v's images")
    return save(fig, out / "fig4_adversaries.png", DPI, tight=False)


def _plot_imbalance(a: dict[str, Any], pc: dict[int, float], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=SIZES["imbalance"])
    fracs = sorted(a["imbalance"], key=float)
    reduced = a["imbalance"][fracs[0]]["reduced_classes"]
    width = BAR_GROUP / (len(fracs) + 1)
    left = np.arange(len(reduced)) - BAR_GROUP / 2
    ax.bar(left + width / 2, [pc[c] for c in reduced], width, label="all images")
    for i, f in enumerate(reversed(fracs), start=1):
        vals = a["imbalance"][f]["per_class_accuracy"]
        ax.bar(
            left + width * (i + 0.5),
            [_lookup(vals, c) for c in reduced],
            width,
            label=f"{float(f):.0%} of images",
        )
    ax.set(
        xticks=range(len(reduced)),
        xticklabels=[f"u{c}" for c in reduced],
        ylabel="per-class accuracy",
        ylim=(0.0, 1.0),
    )
    ax.set_title("Imbalance: reduced users keep a fraction of their images")
    ax.legend(
        fontsize=SMALL_TEXT, ncol=len(fracs) + 1, loc="lower center", bbox_to_anchor=LEGEND_BELOW
    )
    return save(fig, out / "imbalance.png", DPI)


# ------------------------------------------------------------------------ summary
def summary(a: dict[str, Any]) -> str:
    """Markdown tables of the numbers behind the figures, beside the paper's."""
    pc = {str(k): v for k, v in a["per_class_accuracy"].items()}
    lines = [
        f"Seed {a['seed']}; Guard alpha {a['alpha']} where one alpha is used.",
        "",
        "| quantity | docl-flower | paper |",
        "|---|---|---|",
        f"| overall accuracy | {a['overall_accuracy']:.4f} | {PAPER['overall_accuracy']} |",
    ]
    for digit in PAPER_DIGITS:
        if digit in pc:
            lines.append(
                f"| digit {digit} accuracy | {pc[digit]:.4f} | {PAPER['class_' + digit]} |"
            )
    if "adversaries" in a:
        row, col = PAPER_PAIR
        for name, m in a["adversaries"].items():
            if len(m) <= max(PAPER_PAIR):
                break
            lines.append(
                f"| u{row} adversary vs u{col} victim, fraction blocked ({name} Guard) | "
                f"{m[row][col]:.3f} | {PAPER['u7_vs_u2_blocked']} |"
            )
        for name, m in a["adversaries"].items():
            off = adversaries.off_diagonal(m)
            lines.append(
                f"| mean fraction blocked over the {off.size} pairs ({name} Guard) | "
                f"{np.nanmean(off):.3f} | - |"
            )
    if "alpha_sweep" in a:
        lines += _tradeoff_table(a)
    classes = sorted(int(c) for c in pc)
    lines += [
        "",
        f"Scalability (Fig. 5), mean per-class accuracy over "
        f"{a['scalability_subsets']} random class subsets per k:",
        "",
        "| k | " + " | ".join(f"u{c}" for c in classes) + " |",
        "|---|" + "---|" * len(classes),
    ]
    for k, vals in a["scalability"].items():
        row_cells = [f"{vals[str(c)]:.3f}" if str(c) in vals else "-" for c in classes]
        lines.append(f"| {k} | " + " | ".join(row_cells) + " |")
    if "imbalance" in a:
        lines += _imbalance_table(a, pc)
    if "adversary_epochs" in a:
        lines += ["", f"Adversary autoencoders were trained for {a['adversary_epochs']} epochs."]
    return "\n".join(lines) + "\n"


def _tradeoff_table(a: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Guard trade-off (Fig. 3):",
        "",
        "| alpha | paper: guarded acc. | paper: acceptance | "
        "strict: guarded acc. | strict: acceptance |",
        "|---|---|---|---|---|",
    ]
    arg = {r["alpha"]: r for r in a["alpha_sweep"]["paper"]}
    st = {r["alpha"]: r for r in a["alpha_sweep"]["strict"]}
    for alpha in TABLE_ALPHAS:
        if alpha in arg:
            lines.append(
                f"| {alpha} | {arg[alpha]['guarded_accuracy']:.4f} | "
                f"{arg[alpha]['acceptance_rate']:.4f} | {st[alpha]['guarded_accuracy']:.4f} | "
                f"{st[alpha]['acceptance_rate']:.4f} |"
            )
    lines.append(
        f"\nThreshold-free AUROC (min error, MNIST vs Fashion-MNIST): {a['roc']['auroc']:.4f}"
    )
    return lines


def _imbalance_table(a: dict[str, Any], pc: dict[str, float]) -> list[str]:
    red: Sequence[int] = a["imbalance"][next(iter(a["imbalance"]))]["reduced_classes"]
    lines = [
        "",
        "Imbalance (reduced users keep a fraction of their training images):",
        "",
        "| fraction | images per reduced user | "
        + " | ".join(f"u{c}" for c in red)
        + " | overall |",
        "|---|---|" + "---|" * (len(red) + 1),
        "| 1.0 | all | "
        + " | ".join(f"{pc[str(c)]:.3f}" for c in red)
        + f" | {a['overall_accuracy']:.3f} |",
    ]
    for f, v in sorted(a["imbalance"].items(), key=lambda kv: -float(kv[0])):
        n = sorted(v["num_examples"].values())
        vals = {str(k): x for k, x in v["per_class_accuracy"].items()}
        lines.append(
            f"| {f} | {n[0]}-{n[-1]} | "
            + " | ".join(f"{vals[str(c)]:.3f}" for c in red)
            + f" | {v['overall_accuracy']:.3f} |"
        )
    return lines
