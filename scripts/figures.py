"""Reproduce the paper's evaluation (Fig. 2-5), the imbalance study and the strict Guard.

    python scripts/figures.py [--out figures] [--adversary-epochs 30] [--reuse]

Three Flower simulations train every autoencoder the figures use (through `docl-flower`):

1. ``honest``: the default experiment (10 users, user i owns digit i);
2. ``adversaries``: 90 users, one per ordered pair (a, v), whose autoencoder is trained on a's
   and v's images and registered as a's (``partition=adversaries``);
3. ``imbalance``: 15 users keeping 1%, 5% or 10% of the images of digits 1, 3, 5, 7, 9
   (``partition=imbalance``).

The alpha sweep, the ROC curve and the class subsets of Fig. 5 reuse the honest filter (no
retraining). Results go to ``OUT/analysis.json``, PNGs and ``OUT/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

from docl_flower.core.evaluation.analysis import (
    adversary_matrix,
    alpha_sweep,
    roc_curve,
    scalability,
    swap_in,
)
from docl_flower.core.evaluation.metrics import overall_accuracy, per_class_accuracy
from docl_flower.core.filter.global_filter import GUARDS, GlobalFilter, Registration
from docl_flower.core.filter.store import load_filter
from docl_flower.federation.components import load_experiment
from docl_flower.operations.runs import launch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ALPHAS = [round(a, 2) for a in np.arange(0.25, 5.01, 0.25)]
KS = [1, 3, 5, 7, 9]
RULES = GUARDS
PAPER = {
    "overall_accuracy": 0.97,
    "class_0": "> 0.99",
    "class_9": "about 0.95",
    "u7_vs_u2_blocked": "about 0.7 (u7 succeeds about 3 times in 10)",
}


# ------------------------------------------------------------------------ Flower runs
def run_docl(out: Path, overrides: list[str], reuse: bool) -> Path:
    """Run ``docl-flower`` into ``out`` (or reuse a finished run there with its filter)."""
    launch(overrides, out, reuse=reuse, needs=["filter"])
    return out


# ------------------------------------------------------------------------ analysis
def _as_user(reg: Registration, user: int) -> Registration:
    return Registration(user, reg.label, reg.params, reg.err_mean, reg.err_std, reg.num_examples)


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
        regs, meta = load_filter(adversary_dir / "filter")
        adversarial = {}
        for reg, entry in zip(regs, meta["entries"], strict=True):
            victims = [c for c in entry["trained_on"] if c != reg.label]
            if len(victims) == 1 and reg.label in user_of and victims[0] in user_of:
                pair = (user_of[reg.label], user_of[victims[0]])
                adversarial[pair] = _as_user(reg, user_of[reg.label])
        out["adversary_epochs"] = meta["config"]["train"]["epochs"]
        out["adversaries"] = {
            name: adversary_matrix(
                honest, adversarial, x, labels, rule(exp.guard.alpha), exp.scoring
            ).tolist()
            for name, rule in RULES.items()
        }
    if imbalance_dir is not None:
        regs, meta = load_filter(imbalance_dir / "filter")
        by_fraction: dict[float, list[Registration]] = {}
        for reg, entry in zip(regs, meta["entries"], strict=True):
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
def plot(a: dict[str, Any], out: Path) -> list[Path]:
    """Write one PNG per figure; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)

    pc = {int(k): v for k, v in a["per_class_accuracy"].items()}
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.bar(list(pc), list(pc.values()), color="tab:blue", label="docl-flower")
    ax.axhline(PAPER["overall_accuracy"], ls="--", c="k", lw=1, label="paper overall (0.97)")
    ax.axhline(a["overall_accuracy"], ls=":", c="tab:blue", lw=1, label="ours overall")
    ax.set(xlabel="class (user)", ylabel="accuracy", ylim=(0.85, 1.0), xticks=list(pc))
    ax.set_title("Fig. 2: per-class accuracy, MNIST, 10 users")
    ax.legend(loc="lower left", fontsize=8)
    save(fig, "fig2_per_class.png")

    if "alpha_sweep" in a:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, rows in a["alpha_sweep"].items():
            acc = [r["acceptance_rate"] for r in rows]
            gacc = [r["guarded_accuracy"] for r in rows]
            ax.plot(acc, gacc, marker=".", label=f"{name} Guard")
            for r in rows:
                if r["alpha"] in (1.0, 1.5, 2.0):
                    ax.annotate(
                        f"a={r['alpha']}", (r["acceptance_rate"], r["guarded_accuracy"]), fontsize=7
                    )
        ax.set(
            xlabel="acceptance rate (Fashion-MNIST shared)",
            ylabel="guarded accuracy (MNIST blocked, right class)",
        )
        ax.set_title(f"Fig. 3: alpha from {ALPHAS[0]} to {ALPHAS[-1]}")
        ax.legend(fontsize=8)
        save(fig, "fig3_tradeoff.png")
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.plot(a["roc"]["fpr"], a["roc"]["tpr"])
        ax.plot([0, 1], [0, 1], ls=":", c="gray")
        ax.set(
            xlabel="MNIST test images flagged harmless (FPR)",
            ylabel="Fashion-MNIST flagged harmless (TPR)",
        )
        ax.set_title(
            f"ROC of the min. reconstruction error, AUROC {a['roc']['auroc']:.4f}", fontsize=9
        )
        save(fig, "fig3_roc.png")

    if "adversaries" in a:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
        for ax, (name, matrix) in zip(axes, a["adversaries"].items(), strict=True):
            m = np.array(matrix, dtype=float)
            im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    if not np.isnan(m[i, j]):
                        ax.text(
                            j,
                            i,
                            f"{m[i, j]:.2f}",
                            ha="center",
                            va="center",
                            fontsize=6,
                            color="w" if m[i, j] < 0.5 else "k",
                        )
            ax.set(
                xlabel="victim v",
                ylabel="adversary a",
                xticks=range(m.shape[1]),
                yticks=range(m.shape[0]),
            )
            ax.set_title(f"{name} Guard (alpha {a['alpha']}): v's images blocked", fontsize=9)
        fig.colorbar(im, ax=axes, shrink=0.8)
        fig.suptitle("Fig. 4: adversary a trains on its own and v's images")
        fig.savefig(out / "fig4_adversaries.png", dpi=110)
        plt.close(fig)
        paths.append(out / "fig4_adversaries.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = sorted(int(k) for k in a["scalability"])
    classes = sorted({int(c) for v in a["scalability"].values() for c in v})
    for c in classes:
        ax.plot(
            ks,
            [a["scalability"][str(k)].get(str(c), a["scalability"][str(k)].get(c)) for k in ks],
            marker="o",
            label=f"u{c}",
        )
    ax.set(xlabel="number of registered classes k", ylabel="per-class accuracy", xticks=ks)
    ax.set_title(f"Fig. 5: mean over {a['scalability_subsets']} random subsets per k")
    ax.legend(ncol=5, fontsize=7)
    save(fig, "fig5_scalability.png")

    if "imbalance" in a:
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        fracs = sorted(a["imbalance"], key=float)
        reduced = a["imbalance"][fracs[0]]["reduced_classes"]
        width = 0.8 / (len(fracs) + 1)
        ax.bar(
            np.arange(len(reduced)) - 0.4 + width / 2,
            [pc[c] for c in reduced],
            width,
            label="all images",
        )
        for i, f in enumerate(reversed(fracs), start=1):
            vals = a["imbalance"][f]["per_class_accuracy"]
            ax.bar(
                np.arange(len(reduced)) - 0.4 + width * (i + 0.5),
                [vals[str(c)] if str(c) in vals else vals[c] for c in reduced],
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
        ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, -0.3))
        save(fig, "imbalance.png")
    return paths


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
    for digit in ("0", "9"):
        if digit in pc:
            lines.append(
                f"| digit {digit} accuracy | {pc[digit]:.4f} | {PAPER['class_' + digit]} |"
            )
    if "adversaries" in a:
        for name, m in a["adversaries"].items():
            if len(m) <= 7:
                break
            lines.append(
                f"| u7 adversary vs u2 victim, fraction blocked ({name} Guard) | "
                f"{m[7][2]:.3f} | {PAPER['u7_vs_u2_blocked']} |"
            )
        for name, m in a["adversaries"].items():
            arr = np.array(m, dtype=float)
            lines.append(
                f"| mean fraction blocked over the 90 pairs ({name} Guard) | "
                f"{np.nanmean(arr):.3f} | - |"
            )
    if "alpha_sweep" in a:
        lines += [
            "",
            "Guard trade-off (Fig. 3):",
            "",
            "| alpha | paper: guarded acc. | paper: acceptance | "
            "strict: guarded acc. | strict: acceptance |",
            "|---|---|---|---|---|",
        ]
        arg = {r["alpha"]: r for r in a["alpha_sweep"]["paper"]}
        st = {r["alpha"]: r for r in a["alpha_sweep"]["strict"]}
        for alpha in (1.0, 1.5, 2.0, 3.0):
            if alpha in arg:
                lines.append(
                    f"| {alpha} | {arg[alpha]['guarded_accuracy']:.4f} | "
                    f"{arg[alpha]['acceptance_rate']:.4f} | {st[alpha]['guarded_accuracy']:.4f} | "
                    f"{st[alpha]['acceptance_rate']:.4f} |"
                )
        lines.append(
            f"\nThreshold-free AUROC (min error, MNIST vs Fashion-MNIST): {a['roc']['auroc']:.4f}"
        )
    lines += [
        "",
        f"Scalability (Fig. 5), mean per-class accuracy over "
        f"{a['scalability_subsets']} random class subsets per k:",
        "",
        "| k | " + " | ".join(f"u{c}" for c in range(10)) + " |",
        "|---|" + "---|" * 10,
    ]
    for k, vals in a["scalability"].items():
        row = [f"{vals[str(c)]:.3f}" if str(c) in vals else "-" for c in range(10)]
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    if "imbalance" in a:
        lines += [
            "",
            "Imbalance (reduced users keep a fraction of their training images):",
            "",
            "| fraction | images per reduced user | "
            + " | ".join(
                f"u{c}" for c in a["imbalance"][next(iter(a["imbalance"]))]["reduced_classes"]
            )
            + " | overall |",
            "|---|---|" + "---|" * 6,
        ]
        red = a["imbalance"][next(iter(a["imbalance"]))]["reduced_classes"]
        lines.append(
            "| 1.0 | all | "
            + " | ".join(f"{pc[str(c)]:.3f}" for c in red)
            + f" | {a['overall_accuracy']:.3f} |"
        )
        for f, v in sorted(a["imbalance"].items(), key=lambda kv: -float(kv[0])):
            n = sorted(v["num_examples"].values())
            vals = {str(k): x for k, x in v["per_class_accuracy"].items()}
            lines.append(
                f"| {f} | {n[0]}-{n[-1]} | "
                + " | ".join(f"{vals[str(c)]:.3f}" for c in red)
                + f" | {v['overall_accuracy']:.3f} |"
            )
    if "adversary_epochs" in a:
        lines += ["", f"Adversary autoencoders were trained for {a['adversary_epochs']} epochs."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("figures"))
    parser.add_argument("--adversary-epochs", type=int, default=30)
    parser.add_argument("--subsets", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs in OUT/runs")
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every run")
    args = parser.parse_args()
    start = time.time()
    runs = args.out / "runs"
    seed = [f"seed={args.seed}", *args.extra]
    honest = run_docl(runs / "honest", seed, args.reuse)
    adversaries = run_docl(
        runs / "adversaries",
        [
            *seed,
            "partition=adversaries",
            f"train.epochs={args.adversary_epochs}",
            "train.min_steps=0",
        ],
        args.reuse,
    )
    imbalance = run_docl(runs / "imbalance", [*seed, "partition=imbalance"], args.reuse)
    # A JSON round trip so that plots and the summary see exactly what analysis.json holds.
    analysis = json.loads(
        json.dumps(analyze(honest, adversaries, imbalance, args.subsets, args.seed))
    )
    analysis["wall_seconds"] = time.time() - start
    (args.out / "analysis.json").write_text(json.dumps(analysis, indent=1) + "\n")
    for path in plot(analysis, args.out):
        print("wrote", path)
    (args.out / "summary.md").write_text(summary(analysis))
    print(summary(analysis))
    print(f"make figures: {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
