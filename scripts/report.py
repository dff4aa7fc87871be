"""Print the README's markdown table for one DOCL run, beside the paper's MNIST figures.

python scripts/report.py outputs/DATE/TIME/results.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from docl_flower.core.evaluation.results import read_results

#: What the paper reports for MNIST (Sec. 3 text; Fig. 2 for the per-class values).
PAPER = {"overall_accuracy": "0.97", "0": "> 0.99", "9": "about 0.95"}


def newest_results(root: Path = Path("outputs")) -> Path:
    runs = sorted(root.glob("*/*/results.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit("no outputs/*/*/results.json yet: run `make run` first")
    return runs[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path, nargs="?")
    args = parser.parse_args()
    path = args.results or newest_results()
    print(f"<!-- {path} -->")
    r = read_results(path)
    cfg = r.config
    print(
        f"| metric | docl-flower | paper |\n|---|---|---|\n"
        f"| overall accuracy | {r.overall_accuracy:.4f} | {PAPER['overall_accuracy']} |"
    )
    for cls, acc in r.per_class_accuracy.items():
        print(f"| class {cls} accuracy | {acc:.4f} | {PAPER.get(cls, '-')} |")
    if r.guarded_accuracy is not None:
        print(f"| guarded accuracy (alpha {r.alpha}) | {r.guarded_accuracy:.4f} | Fig. 3 |")
    if r.acceptance_rate is not None:
        acc = r.acceptance_rate
        print(f"| acceptance rate, Fashion-MNIST (alpha {r.alpha}) | {acc:.4f} | Fig. 3 |")
    if r.ood_auroc is not None:
        print(f"| OOD AUROC (min error, MNIST vs Fashion-MNIST) | {r.ood_auroc:.4f} | - |")
    up = sorted(set(r.bytes_uploaded.values()))
    down = sorted(set(r.bytes_downloaded.values()))
    print(f"| bytes uploaded per user | {', '.join(map(str, up))} | - |")
    print(f"| bytes downloaded per user | {', '.join(map(str, down))} | 0 (by design) |")
    secs = r.train_seconds.values()
    print(f"| client training seconds (min-max) | {min(secs):.0f}-{max(secs):.0f} | - |")
    print(f"| wall seconds, whole command | {r.wall_seconds or float('nan'):.0f} | - |")
    print(
        f"\nUsers: {len(r.registered)} registered, {len(r.failed)} failed; "
        f"seed {cfg['seed']}; M = {cfg['model']['hidden']}; {cfg['train']['epochs']} epochs."
    )


if __name__ == "__main__":
    main()
