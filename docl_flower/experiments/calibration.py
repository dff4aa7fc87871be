"""The calibrated Guard measured: achieved acceptance and guarded accuracy per stated target.

For each setting (MNIST with Fashion-MNIST as harmless uploads; ORL faces with the face
descriptor, calibrated on half of the unregistered people and tested on the other half; MNIST
under DP-SGD, epsilon 8) and each seed, one ``docl-flower`` run trains and saves the filter.
Then, from the saved filter and for each target acceptance, the Guard is calibrated exactly
as a run with ``guard.target_acceptance`` does (:func:`~docl_flower.federation.workflows.
steps.choose_guard`'s split and :func:`~docl_flower.core.filter.conformal.calibrate`) and
evaluated on the harmless images the calibration did not see: achieved acceptance (which
must be at least ``target - slack``), guarded accuracy, and the fixed-alpha Guard of the
config on the same images beside it. Writes ``calibration.json`` and ``summary.md``.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docl_flower.core.evaluation.metrics import evaluate
from docl_flower.core.filter.conformal import calibrate, finite_sample_slack, split_harmless
from docl_flower.core.filter.global_filter import GlobalFilter
from docl_flower.core.filter.store import load_filter
from docl_flower.core.pipeline.inputs import server_sets
from docl_flower.federation.components import load_experiment

from .launch import Runner, runs_per_seed
from .tables import fmt, markdown_table

#: The settings of the issue: Hydra overrides of each one's runs.
SETTINGS: dict[str, tuple[str, ...]] = {
    "mnist": (),
    "faces": ("dataset=att_faces", "features=face", "partition=random_classes"),
    "dp": ("train=dp",),  # DP-SGD at epsilon 8 per upload (conf/train/dp.yaml)
}
#: Where each setting's harmless uploads come from (for the summary).
HARMLESS = {
    "mnist": "Fashion-MNIST test images",
    "faces": "the 30 unregistered people (calibration: half of them, test: the other half)",
    "dp": "Fashion-MNIST test images",
}
#: The stated acceptance rates the issue asks for.
DEFAULT_TARGETS = (0.95, 0.98, 0.99)
#: Five seeds (faces: five draws of 10 of the 40 people).
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
#: The share of the harmless images kept for calibration (``guard.calibration_share``).
CALIBRATION_SHARE = 0.5


@dataclass(frozen=True)
class CalibrationSettings:
    """What ``scripts/calibration.py`` measures."""

    out: Path
    settings: tuple[str, ...] = tuple(SETTINGS)
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    targets: tuple[float, ...] = DEFAULT_TARGETS
    extra: tuple[str, ...] = ()
    reuse: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; choose from {sorted(SETTINGS)}")
        if not self.seeds or not self.targets:
            raise ValueError("at least one seed and one target")
        for t in self.targets:
            if not 0.0 < t < 1.0:
                raise ValueError(f"targets must lie in (0, 1), got {t}")


def measure_run(folder: Path, targets: Sequence[float], seed: int) -> list[dict[str, Any]]:
    """One saved run: the calibrated Guard at each target, and the fixed one, on held-out images."""
    exp = load_experiment(folder / "experiment.yaml")
    regs, _ = load_filter(folder / "filter")
    flt = GlobalFilter(sorted(regs, key=lambda r: (r.label, r.user_id)), exp.scoring)
    sets = server_sets(exp)
    if sets.harmless is None:
        raise ValueError(f"{folder}: the run has no harmless images to calibrate on")
    cal, test = split_harmless(sets.harmless, CALIBRATION_SHARE, seed, sets.harmless_labels)
    slack = finite_sample_slack(int(cal.shape[0]), int(test.shape[0]))
    fixed = evaluate(flt, exp.guard, sets.x_test, sets.y_test, test)
    rows = []
    for target in targets:
        c = calibrate(exp.guard, flt, cal, target, exp.max_alpha)
        guard = dataclasses.replace(exp.guard, alpha=c.alpha)
        ev = evaluate(flt, guard, sets.x_test, sets.y_test, test)
        assert ev.acceptance_rate is not None and fixed.acceptance_rate is not None
        rows.append(
            {
                "seed": seed,
                "target": target,
                "alpha": c.alpha,
                "conformal_alpha": c.conformal_alpha,
                "capped": c.alpha < c.conformal_alpha,
                "calibration_images": c.images,
                "test_images": int(test.shape[0]),
                "slack": slack,
                "acceptance": ev.acceptance_rate,
                "guarded_accuracy": ev.guarded_accuracy,
                "holds": ev.acceptance_rate >= target - slack,
                "fixed_alpha": fixed.alpha,
                "fixed_acceptance": fixed.acceptance_rate,
                "fixed_guarded_accuracy": fixed.guarded_accuracy,
            }
        )
    return rows


def run_calibration(
    settings: CalibrationSettings, runner: Runner | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Train (or reuse) every run, measure it, write ``calibration.json`` and ``summary.md``."""
    found = runs_per_seed(
        settings.out,
        settings.settings,
        settings.seeds,
        lambda name, seed: [*SETTINGS[name], f"seed={seed}", *settings.extra],
        lambda folder, seed: measure_run(folder, settings.targets, seed),
        "calibration.json",
        runner,
        settings.reuse,
    )
    (settings.out / "summary.md").write_text(summary(found))
    return found


def summary(found: dict[str, list[dict[str, Any]]]) -> str:
    """A table per setting: mean (min) achieved acceptance and guarded accuracy per target."""
    lines = [
        "# The Guard calibrated to a stated acceptance rate (split conformal)",
        "",
        "Achieved acceptance and guarded accuracy on harmless and test images the calibration "
        "did not see; mean over seeds, min in brackets. 'holds': seeds whose acceptance is at "
        "least target minus the finite-sample slack. 'fixed': the config's alpha on the same "
        "images.",
        "",
    ]
    for name, rows in found.items():
        lines += [f"## {name} (harmless: {HARMLESS[name]})", ""]
        table = []
        for target in sorted({r["target"] for r in rows}):
            sel = [r for r in rows if r["target"] == target]
            acc = [r["acceptance"] for r in sel]
            guarded = [r["guarded_accuracy"] for r in sel]
            table.append(
                [
                    fmt(target, ".2f"),
                    f"{fmt(statistics.mean(acc), '.4f')} ({fmt(min(acc), '.4f')})",
                    fmt(statistics.mean(r["slack"] for r in sel), ".3f"),
                    f"{sum(r['holds'] for r in sel)}/{len(sel)}",
                    f"{fmt(statistics.mean(guarded), '.4f')} ({fmt(min(guarded), '.4f')})",
                    fmt(statistics.mean(r["alpha"] for r in sel), ".3f"),
                    f"{sum(r['capped'] for r in sel)}/{len(sel)}",
                ]
            )
        fixed = rows[0]
        sel0 = [r for r in rows if r["target"] == rows[0]["target"]]
        table.append(
            [
                f"fixed alpha {fmt(fixed['fixed_alpha'], '.2f')}",
                fmt(statistics.mean(r["fixed_acceptance"] for r in sel0), ".4f"),
                "-",
                "-",
                fmt(statistics.mean(r["fixed_guarded_accuracy"] for r in sel0), ".4f"),
                fmt(fixed["fixed_alpha"], ".3f"),
                "-",
            ]
        )
        header = [
            "target",
            "acceptance",
            "slack",
            "holds",
            "guarded accuracy",
            "alpha",
            "capped at max_alpha",
        ]
        lines += [markdown_table(header, table), ""]
    return "\n".join(lines)
