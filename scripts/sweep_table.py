"""Print a markdown table of a Hydra multirun folder: overrides -> accuracy and timing.

python scripts/sweep_table.py multirun/DATE/TIME
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from docl_flower.core.evaluation.results import RESULTS_FILE, read_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep", type=Path)
    args = parser.parse_args()
    print("| overrides | overall | class 0 | class 9 | worst class | wall s |")
    print("|---|---|---|---|---|---|")
    for job in sorted(args.sweep.iterdir(), key=lambda p: (len(p.name), p.name)):
        results = job / RESULTS_FILE
        overrides_file = job / ".hydra" / "overrides.yaml"
        if not results.is_file() or not overrides_file.is_file():
            continue
        r = read_results(results)
        overrides = " ".join(yaml.safe_load(overrides_file.read_text()) or [])
        pc = r.per_class_accuracy
        wall = r.wall_seconds if r.wall_seconds is not None else float("nan")
        print(
            f"| `{overrides}` | {r.overall_accuracy:.4f} | {pc.get('0', float('nan')):.4f} | "
            f"{pc.get('9', float('nan')):.4f} | {r.worst_class_accuracy:.4f} | {wall:.0f} |"
        )


if __name__ == "__main__":
    main()
