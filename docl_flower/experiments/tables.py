"""Markdown tables and JSON files of the experiments; the tables of ``report`` and ``sweep_table``.

Every function here builds text from numbers it is given (results files, measured rows); none
runs anything, so each is tested on made-up figures.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from docl_flower.core.evaluation.results import RESULTS_FILE, RunResult, read_results

#: What the paper reports for MNIST (Sec. 3 text; Fig. 2 for the per-class values).
PAPER = {"overall_accuracy": "0.97", "0": "> 0.99", "9": "about 0.95"}


def fmt(value: Any, spec: str = ".2f") -> str:
    """A cell: ``-`` for a missing value, floats formatted with ``spec``, the rest as text."""
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def scalars(value: object) -> object:
    """JSON ``default`` of the benchmarks: numpy and torch scalars as numbers; else refused."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, payload: Any, default: Callable[[object], object] = scalars) -> None:
    """``payload`` as indented JSON at ``path`` (its folder made when missing).

    Non-finite floats are written as JSON's ``NaN`` / ``Infinity`` (Python reads them back).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=default) + "\n")


# ------------------------------------------------------------------ one run, one sweep


def newest_results(root: Path = Path("outputs")) -> Path:
    """The newest ``ROOT/*/*/results.json`` (``FileNotFoundError`` when there is none)."""
    runs = sorted(root.glob("*/*/" + RESULTS_FILE), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no {root}/*/*/{RESULTS_FILE} yet: run `make run` first")
    return runs[-1]


def run_report(r: RunResult) -> str:
    """The README's markdown table of one DOCL run beside the paper's MNIST figures."""
    lines = [
        "| metric | docl-flower | paper |",
        "|---|---|---|",
        f"| overall accuracy | {r.overall_accuracy:.4f} | {PAPER['overall_accuracy']} |",
    ]
    lines += [
        f"| class {cls} accuracy | {acc:.4f} | {PAPER.get(cls, '-')} |"
        for cls, acc in r.per_class_accuracy.items()
    ]
    if r.guarded_accuracy is not None:
        lines.append(f"| guarded accuracy (alpha {r.alpha}) | {r.guarded_accuracy:.4f} | Fig. 3 |")
    if r.acceptance_rate is not None:
        lines.append(
            f"| acceptance rate, Fashion-MNIST (alpha {r.alpha}) | {r.acceptance_rate:.4f} "
            "| Fig. 3 |"
        )
    if r.ood_auroc is not None:
        lines.append(f"| OOD AUROC (min error, MNIST vs Fashion-MNIST) | {r.ood_auroc:.4f} | - |")
    up = sorted(set(r.bytes_uploaded.values()))
    down = sorted(set(r.bytes_downloaded.values()))
    secs = r.train_seconds.values()
    cfg = r.config
    lines += [
        f"| bytes uploaded per user | {', '.join(map(str, up))} | - |",
        f"| bytes downloaded per user | {', '.join(map(str, down))} | 0 (by design) |",
        f"| client training seconds (min-max) | {min(secs):.0f}-{max(secs):.0f} | - |",
        f"| wall seconds, whole command | {r.wall_seconds or float('nan'):.0f} | - |",
        "",
        f"Users: {len(r.registered)} registered, {len(r.failed)} failed; "
        f"seed {cfg['seed']}; M = {cfg['model']['hidden']}; {cfg['train']['epochs']} epochs.",
    ]
    return "\n".join(lines)


def sweep_table(sweep: Path) -> str:
    """A Hydra multirun folder as a table: each job's overrides -> accuracy and timing.

    Jobs in their numeric order (``2`` before ``10``); a job without results is left out.
    """
    rows = []
    nan = float("nan")
    for job in sorted(sweep.iterdir(), key=lambda p: (len(p.name), p.name)):
        results = job / RESULTS_FILE
        overrides_file = job / ".hydra" / "overrides.yaml"
        if not results.is_file() or not overrides_file.is_file():
            continue
        r = read_results(results)
        overrides = " ".join(yaml.safe_load(overrides_file.read_text()) or [])
        pc = r.per_class_accuracy
        wall = r.wall_seconds if r.wall_seconds is not None else nan
        rows.append(
            [
                f"`{overrides}`",
                f"{r.overall_accuracy:.4f}",
                f"{pc.get('0', nan):.4f}",
                f"{pc.get('9', nan):.4f}",
                f"{r.worst_class_accuracy:.4f}",
                f"{wall:.0f}",
            ]
        )
    header = ["overrides", "overall", "class 0", "class 9", "worst class", "wall s"]
    return markdown_table(header, rows)
