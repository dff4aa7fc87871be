"""DOCL vs one-shot feature statistics, FedAvg, FedProx and a centralised reference.

Every row is one ``docl-flower`` run with the same seed and features per data set (or a second
reading of one: the feature-statistics run also trained FedPFT's classifier of sampled
features). MNIST: 10 users, one digit each (deskewed pixels), and IID for the FedAvg family;
faces: the paper's protocol (``dataset=att_faces features=face partition=random_classes
seed=0``: 10 of the 40 ORL people, 7 training and 3 test photos each, the harmless uploads are
the 300 photos of the 30 unregistered people); the FedAvg family and the centralised reference
take the pixels there (see :data:`FACE_SGD`). The tables
(``OUT/comparison.md`` for MNIST, ``OUT/faces.md``) and the plots of accuracy vs bytes per user
(``OUT/accuracy_vs_bytes.png``, ``OUT/faces_accuracy_vs_bytes.png``) are made from the runs'
``results.json`` files only.

Methods with a Guard are compared at a common acceptance level: from each run's guard curve
(the Guard's rule over a grid of alphas), the alpha whose acceptance rate of harmless images is
closest to ``acceptance`` (0.98), with its guarded accuracy.

``only`` runs just those rows (others are read from their run folders when present). A row
with no results in this checkout keeps its line of the previous table at the same path, marked
as carried over (its new columns empty), so that a partial rerun never drops measured rows.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from docl_flower.core.evaluation.results import RESULTS_FILE, RunResult, read_results
from docl_flower.operations.runs import launch

#: The paper's face protocol (10 of 40 people, 7/3 photos, harmless: the 30 others).
FACES = ["dataset=att_faces", "features=face", "partition=random_classes", "seed=0"]
#: The same draw of people on pixels, for the CNN (the face descriptor is not an image).
FACE_PIXELS = ["dataset=att_faces", "features=identity", "partition=random_classes", "seed=0"]
#: DOCL on faces as ``make faces`` trains it (7 photos: 1,000 steps are plenty).
FACE_DOCL = ["train.min_steps=1000"]
#: The FedAvg family on faces: 7 photos are one SGD step per epoch, so 5 local epochs per round
#: (150 steps in 30 rounds); the centralised reference takes 100 epochs (300 steps). On the
#: face descriptors (values within a few hundredths of 0.5) the SGD recipe does not train a 2NN
#: at all (0.10 centralised after 10 epochs, 0.47 after 300): the FedAvg-family rows use pixels.
FACE_SGD = ["train.epochs=5"]
FEATURE_STATS = ["strategy=feature_stats"]
MIXTURE = [*FEATURE_STATS, "strategy.covariance=diag", "strategy.components=3"]

#: Row name -> (label, Hydra overrides). MNIST rows keep their historical names (run folders).
RUNS: dict[str, tuple[str, list[str]]] = {
    "docl": ("DOCL (one class per user)", []),
    "feature_stats": ("Feature statistics, shrunk Gaussian, likelihood", FEATURE_STATS),
    "feature_stats-mix3": ("Feature statistics, 3-Gaussian diag. mixture, likelihood", MIXTURE),
    "fedavg": ("FedAvg, 2NN (one class per user)", ["strategy=fedavg"]),
    "fedprox": ("FedProx, 2NN (one class per user)", ["strategy=fedprox"]),
    "fedavg-iid": ("FedAvg, 2NN (IID)", ["strategy=fedavg", "partition=iid"]),
    "fedprox-iid": ("FedProx, 2NN (IID)", ["strategy=fedprox", "partition=iid"]),
    "centralised": ("Centralised 2NN (all images on the server)", ["strategy=centralised"]),
    "faces-docl": ("DOCL", [*FACES, *FACE_DOCL]),
    "faces-feature_stats": (
        "Feature statistics, shrunk Gaussian, likelihood",
        [*FACES, *FEATURE_STATS],
    ),
    "faces-feature_stats-mix3": (
        "Feature statistics, 3-Gaussian diag. mixture, likelihood",
        [*FACES, *MIXTURE],
    ),
    "faces-fedavg": ("FedAvg, 2NN (pixels)", [*FACE_PIXELS, *FACE_SGD, "strategy=fedavg"]),
    "faces-fedprox": ("FedProx, 2NN (pixels)", [*FACE_PIXELS, *FACE_SGD, "strategy=fedprox"]),
    "faces-fedavg-cnn": (
        "FedAvg, CNN (pixels)",
        [*FACE_PIXELS, *FACE_SGD, "strategy=fedavg", "model=cnn"],
    ),
    "faces-fedprox-cnn": (
        "FedProx, CNN (pixels)",
        [*FACE_PIXELS, *FACE_SGD, "strategy=fedprox", "model=cnn"],
    ),
    "faces-centralised": (
        "Centralised 2NN (pixels, all photos on the server)",
        [*FACE_PIXELS, "strategy=centralised", "strategy.epochs=100"],
    ),
}

#: Rows read from another row's run: the classifier trained on features sampled from the
#: uploaded statistics (FedPFT's server step). Row name -> (label, source row).
SAMPLED: dict[str, tuple[str, str]] = {
    "feature_stats-sampled": (
        "Feature statistics, shrunk Gaussian, classifier of sampled features",
        "feature_stats",
    ),
    "faces-feature_stats-sampled": (
        "Feature statistics, shrunk Gaussian, classifier of sampled features",
        "faces-feature_stats",
    ),
}

#: The rows of each table, in order; table file, plot file and title.
TABLES: dict[str, tuple[list[str], str, str, str]] = {
    "mnist": (
        [
            "docl",
            "feature_stats",
            "feature_stats-sampled",
            "feature_stats-mix3",
            "fedavg",
            "fedprox",
            "fedavg-iid",
            "fedprox-iid",
            "centralised",
        ],
        "comparison.md",
        "accuracy_vs_bytes.png",
        "MNIST, 10 users",
    ),
    "faces": (
        [
            "faces-docl",
            "faces-feature_stats",
            "faces-feature_stats-sampled",
            "faces-feature_stats-mix3",
            "faces-fedavg",
            "faces-fedprox",
            "faces-fedavg-cnn",
            "faces-fedprox-cnn",
            "faces-centralised",
        ],
        "faces.md",
        "faces_accuracy_vs_bytes.png",
        "ORL faces, 10 of 40 people, 7 photos each",
    ),
}

#: The common acceptance level: the share of harmless images the Guard rows accept; the same
#: floor as the faces study's 'best' column (README), so the two read alike.
ACCEPTANCE = 0.98
#: The plot: size (inches), resolution, and the star of a one-shot method drawn larger.
FIGSIZE, DPI = (10, 4.8), 110
MARKER_SIZE, STAR_SIZE, CARRIED_SIZE = 50, 140, 60
#: The tables count megabytes (10^6 bytes).
MB = 1e6

HEADER = [
    "method",
    "overall acc.",
    "worst class acc.",
    "rounds",
    "guarded acc. at common acceptance",
    "acceptance",
    "alpha",
    "OOD AUROC",
    "MB up / user",
    "MB down / user",
    "wall s",
    "upload reveals",
    "user receives others' parameters",
]
#: Columns of a carried-over row that the previous table may hold (same header names).
CARRIED_COLUMNS = [h for h in HEADER if h not in ("method", "upload reveals")]
CARRIED_MARK = " (carried over)"
#: What the rows that may be carried over reveal (they have no results file to read it from).
CARRIED_REVEALS = {
    name: "model updates (every round)" for name in RUNS if "fedavg" in name or "fedprox" in name
} | {"centralised": "raw images", "faces-centralised": "raw images"}


def _mean(d: Mapping[str, float]) -> float:
    return sum(d.values()) / max(1, len(d))


def _mb(nbytes: float) -> str:
    """Megabytes with three significant digits (two decimals from 10 MB)."""
    mb = nbytes / MB
    return "0" if mb == 0 else f"{mb:.2f}" if mb >= 10 else f"{mb:.3g}"


def label_of(name: str) -> str:
    """The table label of a row."""
    return SAMPLED[name][0] if name in SAMPLED else RUNS[name][0]


def sampled_view(r: RunResult) -> RunResult:
    """The classifier of sampled features of a feature-statistics run, as a row (no Guard)."""
    if r.sampled_classifier_accuracy is None:
        raise ValueError("not a feature-statistics run: no classifier of sampled features")
    return dataclasses.replace(
        r,
        overall_accuracy=r.sampled_classifier_accuracy,
        per_class_accuracy=dict(r.sampled_classifier_per_class_accuracy),
        guarded_accuracy=None,
        acceptance_rate=None,
        ood_auroc=None,
        guard_curve=[],
    )


def at_acceptance(r: RunResult, target: float) -> dict[str, float] | None:
    """The guard-curve point whose acceptance rate is closest to ``target`` (None: no Guard).

    Ties go to the higher guarded accuracy, then to the smaller alpha.
    """
    if not r.guard_curve:
        return None
    return min(
        r.guard_curve,
        key=lambda p: (abs(p["acceptance_rate"] - target), -p["guarded_accuracy"], p["alpha"]),
    )


def reveals(r: RunResult) -> str:
    """What one upload of the row's method shows the server."""
    if r.uploads_raw_images:
        return "raw images"
    if r.method == "docl":
        return "autoencoder weights; error mean and std"
    if r.method == "feature_stats":
        strategy = r.config.get("strategy", {})
        k = strategy.get("components", 1) if isinstance(strategy, Mapping) else 1
        kind = strategy.get("covariance", "shrunk") if isinstance(strategy, Mapping) else ""
        second = "covariance" if kind == "shrunk" else "variances"
        what = f"class mean and {second}" if k == 1 else f"{k} means and {second} per class"
        return f"{what}; log-likelihood mean and std"
    return "model updates (every round)"


def _cells(name: str, r: RunResult, target: float) -> list[str]:
    point = at_acceptance(r, target)
    receives = "yes" if r.receives_others_parameters else "no"
    if r.uploads_raw_images:
        receives = "no (hands over its images)"
    return [
        label_of(name),
        f"{r.overall_accuracy:.4f}",
        f"{r.worst_class_accuracy:.4f}",
        f"{r.rounds}",
        "-" if point is None else f"{point['guarded_accuracy']:.4f}",
        "-" if point is None else f"{point['acceptance_rate']:.4f}",
        "-" if point is None else f"{point['alpha']:g}",
        "-" if r.ood_auroc is None else f"{r.ood_auroc:.4f}",
        _mb(_mean(r.bytes_uploaded)),
        _mb(_mean(r.bytes_downloaded)),
        f"{r.wall_seconds or float('nan'):.0f}",
        reveals(r),
        receives,
    ]


def table(
    rows: dict[str, RunResult],
    target: float = ACCEPTANCE,
    carried: Mapping[str, Mapping[str, str]] | None = None,
    order: Sequence[str] | None = None,
) -> str:
    """The markdown table of ``rows`` (and of rows ``carried`` over from a previous table)."""
    carried = carried or {}
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for name in order or [*rows, *carried]:
        if name in rows:
            cells = _cells(name, rows[name], target)
        elif name in carried:
            old = carried[name]
            cells = [label_of(name) + CARRIED_MARK]
            # The previous cells up to "upload reveals" (not in older tables), then the last.
            cells += [old.get(h, "-") for h in CARRIED_COLUMNS[:-1]]
            cells += [CARRIED_REVEALS.get(name, "-"), old.get(CARRIED_COLUMNS[-1], "-")]
        else:
            continue
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def previous_rows(path: Path, names: Sequence[str]) -> dict[str, dict[str, str]]:
    """Cells of the rows of a previous table at ``path``, by row name (matched on the label).

    A previous label may carry a suffix (``(uploads raw images)``, ``(carried over)``); cells
    are keyed by the header of their column, so older tables with fewer columns still map.
    """
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    if len(lines) < 2:
        return {}

    def split(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    header = split(lines[0])
    found: dict[str, dict[str, str]] = {}
    for line in lines[2:]:
        cells = dict(zip(header, split(line), strict=False))
        label = cells.get("method", "")
        for name in names:
            if name not in found and re.fullmatch(re.escape(label_of(name)) + r"( \(.*\))?", label):
                found[name] = cells
    return found


def plot(
    rows: dict[str, RunResult],
    path: Path,
    title: str = "MNIST, 10 users",
    carried: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Accuracy against MB per user (a curve per round where the run has one), log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIGSIZE)
    markers = iter(["*", "D", "s", "^", "P", "X", "v", "h"] * 4)  # enough for every row
    for name, r in rows.items():
        label = label_of(name)
        if r.accuracy_curve and "centralised" not in name:
            # Round 0 (the initial model, nothing sent yet) has no place on a log axis.
            pts = [p for p in r.accuracy_curve if p["bytes_per_user"] > 0]
            xs = [p["bytes_per_user"] / MB for p in pts]
            ax.plot(xs, [p["accuracy"] for p in pts], marker=".", label=label)
        else:
            total = (_mean(r.bytes_uploaded) + _mean(r.bytes_downloaded)) / MB
            marker = next(markers)
            size = STAR_SIZE if marker == "*" else MARKER_SIZE
            ax.scatter([total], [r.overall_accuracy], s=size, marker=marker, label=label, zorder=3)
    for i, (name, cells) in enumerate((carried or {}).items()):
        try:
            total = float(cells["MB up / user"]) + float(cells["MB down / user"])
            acc = float(cells["overall acc."])
        except (KeyError, ValueError):
            continue
        ax.scatter(
            [total],
            [acc],
            s=CARRIED_SIZE,
            marker="o",
            facecolors="none",
            edgecolors=f"C{(len(rows) + i) % 10}",
            zorder=2,
            label=f"{label_of(name)} (final round, carried over)",
        )
    ax.set_xscale("log")
    ax.set(
        xlabel="MB transferred per user (up + down, cumulative)",
        ylabel="test accuracy",
        ylim=(0, 1.02),
    )
    ax.set_title(f"{title}: accuracy vs bytes transferred")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


@dataclass(frozen=True)
class CompareSettings:
    """The command line of ``scripts/compare.py``."""

    out: Path = Path("comparison")
    #: ``mnist``, ``faces`` or ``both``.
    dataset: str = "both"
    #: Rounds of the FedAvg family (30: its accuracy has levelled off on MNIST by then).
    rounds: int = 30
    #: Epochs of the centralised reference (10 on MNIST; the faces row sets its own).
    centralised_epochs: int = 10
    #: Harmless images accepted at the common acceptance level of the Guard rows.
    acceptance: float = ACCEPTANCE
    #: Run only these rows (None: every row).
    only: Sequence[str] | None = None
    reuse: bool = False
    #: Hydra overrides for every run.
    extra: Sequence[str] = ()

    def datasets(self) -> list[str]:
        """The tables to make."""
        return ["mnist", "faces"] if self.dataset == "both" else [self.dataset]


def overrides_for(name: str, settings: CompareSettings) -> list[str]:
    """The Hydra overrides of row ``name`` (with the rounds, epochs and ``extra``)."""
    overrides = [*RUNS[name][1], *settings.extra]
    if "fedavg" in name or "fedprox" in name:
        overrides.append(f"strategy.num_rounds={settings.rounds}")
    if "centralised" in name and not any(o.startswith("strategy.epochs=") for o in overrides):
        overrides.append(f"strategy.epochs={settings.centralised_epochs}")
    return overrides


#: Runs one row: (overrides, run folder, reuse) -> its results.
Runner = Callable[[Sequence[str], Path, bool], RunResult]


def _launch(overrides: Sequence[str], run_dir: Path, reuse: bool) -> RunResult:
    return launch(overrides, run_dir, reuse=reuse)


def compare_table(
    dataset: str, settings: CompareSettings, runner: Runner = _launch
) -> tuple[str, dict[str, str]]:
    """Run (or read) the rows of one table; write its table and plot.

    Returns the table and, per row without results, ``carried over ...`` or ``not run``.
    """
    names, table_file, plot_file, title = TABLES[dataset]
    out = settings.out
    results: dict[str, RunResult] = {}
    for name in names:
        if name in SAMPLED:
            continue
        folder = out / "runs" / name
        if settings.only is None or name in settings.only:
            results[name] = runner(overrides_for(name, settings), folder, settings.reuse)
        elif (folder / RESULTS_FILE).is_file():
            results[name] = read_results(folder / RESULTS_FILE)
    for name, (_, source) in SAMPLED.items():
        if source in results and name in names:
            results[name] = sampled_view(results[source])
    missing = [n for n in names if n not in results]
    carried = previous_rows(out / table_file, missing)
    rows = {n: results[n] for n in names if n in results}
    md = table(rows, settings.acceptance, carried, order=names)
    out.mkdir(parents=True, exist_ok=True)
    (out / table_file).write_text(md)
    plot(rows, out / plot_file, title, carried)
    states = {
        n: "carried over from the previous table" if n in carried else "not run" for n in missing
    }
    return md, states
