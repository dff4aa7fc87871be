"""The paper's face experiment on the ORL faces: 10 people of 40 per draw, five draws.

    python scripts/faces.py [--out faces] [--draws 5] [--extractors face imagenet identity]
                            [--adversaries face] [--reuse] [--extra HYDRA_OVERRIDE ...]

Each (extractor, draw) is one ``docl-flower`` run (Flower simulation): ``dataset=att_faces
partition=random_classes seed=DRAW``: 10 users are 10 people drawn at random from the 40,
each with 7 training and 3 test photos; the harmless uploads are the 300 photos of the 30
people nobody registered (new identities, as in the paper). From each run's saved filter:
overall and per-person accuracy, the Guard trade-off over alpha (the paper's two-sided
interval and the one-sided one), AUROC, scalability (k of the 10 registered); for the
extractors in ``--adversaries``, the adversary matrix of draw 0 (an adversary trains on its
own and the victim's training photos, with the same recipe and calibration, and registers as
itself). Writes ``OUT/faces.json``, ``OUT/summary.md`` and PNGs; reads results files and saved
filters only.
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

from docl_flower.core.data.seeds import derive_seed
from docl_flower.core.evaluation.analysis import adversary_matrix, alpha_sweep, scalability
from docl_flower.core.evaluation.metrics import auroc, overall_accuracy, per_class_accuracy
from docl_flower.core.filter.global_filter import ArgminGuard, GlobalFilter, Registration
from docl_flower.core.filter.store import load_filter
from docl_flower.core.pipeline.config import Experiment
from docl_flower.core.pipeline.inputs import server_sets, split_features
from docl_flower.core.training.autoencoder import AutoencoderSpec, TrainSpec, state_to_numpy
from docl_flower.core.training.calibration import train_and_calibrate
from docl_flower.federation.components import load_experiment
from docl_flower.operations.runs import launch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ALPHAS = [round(a, 2) for a in np.arange(0.25, 5.01, 0.25)]
SIDES = ("two", "one")
KS = [1, 3, 5, 7, 9]
LABELS = {
    "face": "dlib face descriptor (128-d)",
    "imagenet": "EfficientNet-Lite0 ImageNet (1280-d)",
    "identity": "raw pixels (10,304-d)",
}
#: The paper's face results (Sec. 3): IMDB faces, ResNet features, M = 32 and M = 132.
PAPER = {"overall_accuracy": "0.92 (M = 32), 0.97 (M = 132)"}


def run_dir(out: Path, extractor: str, draw: int) -> Path:
    return out / "runs" / extractor / f"draw-{draw}"


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
    assert sets.harmless is not None, "att_faces: harmless images are the unregistered people"
    harmless = flt.scores(sets.harmless)
    out["num_harmless"] = int(harmless.shape[0])
    out["auroc"] = auroc(flt.predict(scores[mask])[1].numpy(), flt.predict(harmless)[1].numpy())
    out["alpha_sweep"] = {
        sided: alpha_sweep(
            flt,
            lambda a, sided=sided: ArgminGuard(a, sided),
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


def adversaries(exp: Experiment, honest: list[Registration], alpha: float) -> dict[str, Any]:
    """Fig. 4 for one draw: adversary a trains on a's and v's photos, registers as a."""
    assert isinstance(exp.model, AutoencoderSpec) and isinstance(exp.train, TrainSpec)
    images, labels = exp.dataset.load("train")
    feats = split_features(exp.dataset, exp.features, "train", images=images).features
    users = sorted(exp.assignment)
    adversarial = {}
    start = time.time()
    for a in users:
        for v in users:
            if a == v:
                continue
            rows = np.concatenate(
                [exp.client_spec.user_indices(a, labels), exp.client_spec.user_indices(v, labels)]
            )
            fit = train_and_calibrate(
                feats[torch.from_numpy(rows)],
                exp.model,
                exp.train,
                derive_seed(exp.seed, 0xAD, a, v),
            )
            label = exp.assignment[a][0]
            adversarial[(a, v)] = Registration(
                a, label, state_to_numpy(fit.model), fit.err_mean, fit.err_std, int(rows.size)
            )
        print(f"adversary {a}: 9 autoencoders, {time.time() - start:.0f}s", flush=True)
    sets = server_sets(exp)
    by_user = sorted(honest, key=lambda r: r.user_id)
    return {
        sided: adversary_matrix(
            by_user, adversarial, sets.x_test, sets.y_test, ArgminGuard(alpha, sided)
        ).tolist()
        for sided in SIDES
    }


def at_alpha(sweep: list[dict[str, float]], alpha: float) -> dict[str, float]:
    return next(r for r in sweep if abs(r["alpha"] - alpha) < 1e-9)


def best_at_acceptance(sweep: list[dict[str, float]], level: float) -> dict[str, float] | None:
    """The alpha with the highest guarded accuracy whose acceptance is at least ``level``."""
    ok = [r for r in sweep if r["acceptance_rate"] >= level]
    return max(ok, key=lambda r: (r["guarded_accuracy"], -r["alpha"])) if ok else None


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def summarise(report: dict[str, Any], alpha: float, level: float) -> str:
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
        if all(b is not None for b in best):
            cells.append(
                f"{mean_std([b['alpha'] for b in best if b])}, "
                f"{mean_std([b['guarded_accuracy'] for b in best if b])}, "
                f"{mean_std([b['acceptance_rate'] for b in best if b])}"
            )
        else:
            cells.append(f"none reaches {level}")
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    lines += ["", f"Paper (IMDB faces, ResNet features): overall {PAPER['overall_accuracy']}."]
    if report.get("adversaries"):
        lines += [
            "",
            "Adversary matrix (draw 0): mean fraction of the victim's test photos blocked",
        ]
        for name, mats in report["adversaries"].items():
            for sided in SIDES:
                m = np.array(mats[sided], dtype=float)
                off = m[~np.eye(len(m), dtype=bool)]
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


def plot(report: dict[str, Any], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in report["extractors"].items():
        for sided, style in (("two", "--"), ("one", "-")):
            g = np.mean([[x["guarded_accuracy"] for x in r["alpha_sweep"][sided]] for r in runs], 0)
            a = np.mean([[x["acceptance_rate"] for x in r["alpha_sweep"][sided]] for r in runs], 0)
            ax.plot(a, g, style, marker=".", label=f"{name}, {sided}-sided")
    ax.set(xlabel="acceptance of new identities", ylabel="guarded accuracy", xlim=(0, 1.02))
    ax.set_title("ORL faces, 10 of 40 people, mean over draws (alpha 0.25 ... 5)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "faces_tradeoff.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in report["extractors"].items():
        ks = [k for k in KS if all(str(k) in r["scalability"] for r in runs)]
        ys = [np.mean([r["scalability"][str(k)] for r in runs]) for k in ks]
        ax.plot(ks, ys, marker="o", label=name)
    ax.set(xlabel="people registered (k)", ylabel="mean per-person accuracy", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "faces_scalability.png", dpi=110)
    plt.close(fig)
    for name, mats in report.get("adversaries", {}).items():
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        for axis, sided in zip(axes, SIDES, strict=True):
            im = axis.imshow(np.array(mats[sided], dtype=float), vmin=0, vmax=1, cmap="viridis")
            axis.set(title=f"{sided}-sided", xlabel="victim", ylabel="adversary")
        fig.colorbar(im, ax=axes, shrink=0.8, label="victim's photos blocked")
        fig.savefig(out / f"faces_adversaries_{name}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("faces"))
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--extractors", nargs="+", default=["face", "imagenet", "identity"])
    parser.add_argument("--adversaries", nargs="*", default=["face"])
    parser.add_argument("--alpha", type=float, default=1.5)
    parser.add_argument("--acceptance", type=float, default=0.98)
    parser.add_argument("--subsets", type=int, default=10)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every run")
    args = parser.parse_args()
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"draws": args.draws, "alpha": args.alpha, "extractors": {}}
    first: dict[str, tuple[Experiment, list[Registration]]] = {}
    for name in args.extractors:
        runs = []
        for draw in range(args.draws):
            folder = run_dir(args.out, name, draw)
            overrides = [
                "dataset=att_faces",
                f"features={name}",
                "partition=random_classes",
                f"seed={draw}",
                *args.extra,
            ]
            launch(overrides, folder, reuse=args.reuse, needs=["filter"])
            numbers, exp, honest = analyse_run(folder, args.subsets)
            runs.append(numbers)
            if draw == 0:
                first[name] = (exp, honest)
        report["extractors"][name] = runs
    report["adversaries"] = {
        name: adversaries(*first[name], args.alpha) for name in args.adversaries if name in first
    }
    report["seconds"] = time.time() - start
    (args.out / "faces.json").write_text(json.dumps(report, indent=1) + "\n")
    md = summarise(report, args.alpha, args.acceptance)
    (args.out / "summary.md").write_text(md)
    plot(report, args.out)
    print(md)
    print(f"make faces: {report['seconds']:.0f}s; wrote {args.out}/summary.md, faces.json, PNGs")


if __name__ == "__main__":
    main()
