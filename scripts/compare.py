"""DOCL vs FedAvg, FedProx (one class per user and IID) and a centralised reference.

    python scripts/compare.py [--out comparison] [--rounds 30] [--reuse]

Every row is one `docl-flower` run on MNIST with 10 users and the same seed and features;
the table (``OUT/comparison.md``) and the plot of accuracy vs bytes transferred per user
(``OUT/accuracy_vs_bytes.png``) are made from the runs' ``results.json`` files only.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from docl_flower.core.results import RunResult
from docl_flower.operations.runs import launch

RUNS: dict[str, tuple[str, list[str]]] = {
    "docl": ("DOCL (one class per user)", []),
    "fedavg": ("FedAvg, 2NN (one class per user)", ["strategy=fedavg"]),
    "fedprox": ("FedProx, 2NN (one class per user)", ["strategy=fedprox"]),
    "fedavg-iid": ("FedAvg, 2NN (IID)", ["strategy=fedavg", "partition=iid"]),
    "fedprox-iid": ("FedProx, 2NN (IID)", ["strategy=fedprox", "partition=iid"]),
    "centralised": ("Centralised 2NN (all images on the server)", ["strategy=centralised"]),
}


def run(name: str, overrides: list[str], out: Path, reuse: bool) -> RunResult:
    return launch(overrides, out / "runs" / name, reuse=reuse)


def _mean(d: Mapping[str, float]) -> float:
    return sum(d.values()) / max(1, len(d))


def table(rows: dict[str, RunResult]) -> str:
    lines = [
        "| method | overall acc. | worst class acc. | rounds | MB up / user | MB down / user | "
        "wall s | user receives others' parameters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        label = RUNS[name][0]
        up = _mean(r.bytes_uploaded) / 1e6
        down = _mean(r.bytes_downloaded) / 1e6
        receives = "yes" if r.receives_others_parameters else "no"
        if r.uploads_raw_images:
            label += " (uploads raw images)"
            receives = "no (hands over its images)"
        lines.append(
            f"| {label} | {r.overall_accuracy:.4f} | {r.worst_class_accuracy:.4f} | {r.rounds} | "
            f"{up:.2f} | {down:.2f} | {r.wall_seconds or float('nan'):.0f} | {receives} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, RunResult], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in rows.items():
        label = RUNS[name][0]
        if r.accuracy_curve and name != "centralised":
            # Round 0 (the initial model, nothing sent yet) has no place on a log axis.
            pts = [p for p in r.accuracy_curve if p["bytes_per_user"] > 0]
            xs = [p["bytes_per_user"] / 1e6 for p in pts]
            ax.plot(xs, [p["accuracy"] for p in pts], marker=".", label=label)
        else:
            total = (_mean(r.bytes_uploaded) + _mean(r.bytes_downloaded)) / 1e6
            ax.scatter([total], [r.overall_accuracy], s=80, marker="*", label=label, zorder=3)
    ax.set_xscale("log")
    ax.set(
        xlabel="MB transferred per user (up + down, cumulative)",
        ylabel="test accuracy",
        ylim=(0, 1.02),
    )
    ax.set_title("MNIST, 10 users: accuracy vs bytes transferred")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("comparison"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--centralised-epochs", type=int, default=10)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every run")
    args = parser.parse_args()
    start = time.time()
    rows = {}
    for name, (_, overrides) in RUNS.items():
        extra = list(args.extra)
        if name.startswith("fed"):
            extra.append(f"strategy.num_rounds={args.rounds}")
        if name == "centralised":
            extra.append(f"strategy.epochs={args.centralised_epochs}")
        rows[name] = run(name, [*overrides, *extra], args.out, args.reuse)
    md = table(rows)
    (args.out / "comparison.md").write_text(md)
    plot(rows, args.out / "accuracy_vs_bytes.png")
    print(md)
    print(
        f"make compare: {time.time() - start:.0f}s; wrote {args.out / 'comparison.md'} and "
        f"{args.out / 'accuracy_vs_bytes.png'}"
    )


if __name__ == "__main__":
    main()
