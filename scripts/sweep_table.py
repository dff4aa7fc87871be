"""Print a markdown table of a Hydra multirun folder: overrides -> accuracy and timing.

python scripts/sweep_table.py multirun/DATE/TIME
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep", type=Path)
    args = parser.parse_args()
    print("| overrides | overall | class 0 | class 9 | worst class | wall s |")
    print("|---|---|---|---|---|---|")
    for job in sorted(args.sweep.iterdir(), key=lambda p: (len(p.name), p.name)):
        results = job / "results.json"
        overrides_file = job / ".hydra" / "overrides.yaml"
        if not results.is_file() or not overrides_file.is_file():
            continue
        r = json.loads(results.read_text())
        overrides = " ".join(yaml.safe_load(overrides_file.read_text()) or [])
        pc = r["per_class_accuracy"]
        worst = min(pc.values())
        print(
            f"| `{overrides}` | {r['overall_accuracy']:.4f} | {pc.get('0', float('nan')):.4f} | "
            f"{pc.get('9', float('nan')):.4f} | {worst:.4f} | {r['wall_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
