"""The privacy experiment's outputs: ``results.json``, ``summary.md`` and the PNGs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from docl_flower.experiments.plotting import (
    CELL_TEXT,
    LEGEND_TEXT,
    SMALL_TEXT,
    TITLE_TEXT,
    plt,
    save,
)
from docl_flower.experiments.privacy_attack import FACE_TOLERANCE, NEIGHBOURS, Attacked

#: Restarts shown per user in the inversion figures (prior attack), and of the pixel attack.
SHOWN = 8
SHOWN_PIXELS = 3
DPI = 100
#: Inches per image cell of the digit figure (width, height) and the margins around them.
CELL = (0.9, 0.95)
MARGIN = (1.6, 0.8)
#: The faces figure: width, inches per user row and the margin; its columns' width ratios
#: (distance matrix, colour bar, own photo, nearest photo).
PEOPLE_WIDTH = 11
PEOPLE_ROW = 0.55
PEOPLE_MARGIN = 2.2
PEOPLE_COLUMNS = (6, 0.2, 1, 1)
#: The trade-off figure: inches per panel (width) and its height.
PANEL = (3.0, 3.4)
#: Chance levels drawn on the trade-off: membership AUROC 0.5 (no signal), inversion score 0.1
#: (one of 10 digits or of 10 registered people).
MEMBERSHIP_CHANCE = 0.5
INVERSION_CHANCE = 0.1
#: Fractions are drawn on 0 ... 1 with a small margin so that points at 0 and 1 show.
UNIT_AXIS = (-0.02, 1.02)


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if np.isnan(value) else f"{value:.{digits}f}"
    return str(value)


#: The columns of a data set's table in ``summary.md``.
COLUMNS = (
    "setting",
    "users registered",
    "epsilon spent (max)",
    "noise multiplier",
    "overall acc.",
    "guarded acc.",
    "acceptance",
    "membership AUROC",
    "inversion (prior)",
    "inversion (pixels + fixed point)",
    "train s / user",
    "DP overhead",
)
#: How the settings are named in the tables (the others: ``epsilon = E``).
SETTING_LABELS = {"none": "none (default recipe)", "none-dp-recipe": "none (DP recipe, no noise)"}


def setting_label(setting: str) -> str:
    """The table's name of ``setting``."""
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
            f"fraction of recovered digits that a public {NEIGHBOURS}-NN classifier names as the "
            "user's "
            f"(chance {INVERSION_CHANCE})"
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
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "---|" * len(COLUMNS),
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
    extra = min(SHOWN_PIXELS, pixels[0].features.shape[0]) if pixels else 0
    cols = per + extra
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(cols * CELL[0] + MARGIN[0], len(rows) * CELL[1] + MARGIN[1])
    )
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
            ax.set_title(str(named), fontsize=SMALL_TEXT, color=color, pad=1)
        hits = sum(n == rec.label for n in rec.named)
        axes[i, 0].set_ylabel(
            f"u{rec.user} ({rec.label})\n{hits}/{len(rec.named)}",
            fontsize=SMALL_TEXT,
            rotation=0,
            ha="right",
        )
    if pixels:
        axes[0, per].set_title(f"pixels\n{pixels[0].named[0]}", fontsize=SMALL_TEXT, pad=1)
    fig.suptitle(title, fontsize=TITLE_TEXT)
    save(fig, path, DPI)


def plot_people(attacked: Attacked, path: Path, title: str) -> None:
    """Distances of each recovered template to every registered person, and the photo it matches.

    The face descriptor has no image decoder: what is shown is who the template identifies.
    """
    users = sorted(attacked.distances)
    people = sorted({p for d in attacked.distances.values() for p in d})
    mat = np.array([[attacked.distances[u][p] for p in people] for u in users])
    fig = plt.figure(figsize=(PEOPLE_WIDTH, PEOPLE_ROW * len(users) + PEOPLE_MARGIN))
    grid = fig.add_gridspec(len(users), len(PEOPLE_COLUMNS), width_ratios=list(PEOPLE_COLUMNS))
    ax = fig.add_subplot(grid[:, 0])
    im = ax.imshow(mat, cmap="viridis_r")
    for i in range(len(users)):
        for j in range(len(people)):
            ax.text(
                j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=CELL_TEXT, color="w"
            )
    label_of = {r.user: r.label for r in attacked.recovered["prior"]}
    ax.set_xticks(range(len(people)), [f"s{p + 1}" for p in people], fontsize=SMALL_TEXT)
    ax.set_yticks(
        range(len(users)), [f"u{u} (s{label_of[u] + 1})" for u in users], fontsize=SMALL_TEXT
    )
    ax.set(xlabel="registered person (their held-out photos)", ylabel="inverted autoencoder")
    ax.set_title("distance of the recovered template to each person", fontsize=LEGEND_TEXT)
    fig.colorbar(im, cax=fig.add_subplot(grid[:, 1]))
    for i, u in enumerate(users):
        own, nearest, who = attacked.photos[u]
        for j, (img, text) in enumerate(((own, f"s{label_of[u] + 1}"), (nearest, f"s{who + 1}"))):
            a = fig.add_subplot(grid[i, 2 + j])
            a.imshow(img, cmap="gray")
            a.set_xticks([])
            a.set_yticks([])
            color = "k" if j == 0 else ("tab:green" if who == label_of[u] else "tab:red")
            a.set_ylabel(text, fontsize=CELL_TEXT, rotation=0, ha="right", color=color)
            if i == 0:
                a.set_title("own photo" if j == 0 else "nearest\nto template", fontsize=SMALL_TEXT)
    fig.suptitle(title, fontsize=TITLE_TEXT)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
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
    fig, axes = plt.subplots(1, len(panels), figsize=(PANEL[0] * len(panels), PANEL[1]))
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
                fontsize=SMALL_TEXT,
            )
        ax.set_title(label, fontsize=TITLE_TEXT)
        if key in ("membership", "inversion"):
            chance = MEMBERSHIP_CHANCE if key == "membership" else INVERSION_CHANCE
            ax.axhline(chance, color="grey", ls=":", lw=1)
        if key != "train_seconds_mean":
            ax.set_ylim(*UNIT_AXIS)
    axes[0].legend(fontsize=LEGEND_TEXT)
    save(fig, path, DPI)


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
