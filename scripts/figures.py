"""Reproduce the paper's evaluation (Fig. 2-5), the imbalance study and the strict Guard.

    python scripts/figures.py [--out figures] [--adversary-epochs 30] [--reuse]

Three Flower simulations train every autoencoder the figures use (through `docl-flower`):

1. ``honest``: the default experiment (10 users, user i owns digit i);
2. ``adversaries``: 90 users, one per ordered pair (a, v), whose autoencoder is trained on a's
   and v's images and registered as a's (``partition=adversaries``);
3. ``imbalance``: 15 users keeping 1%, 5% or 10% of the images of digits 1, 3, 5, 7, 9
   (``partition=imbalance``).

The alpha sweep, the ROC curve and the class subsets of Fig. 5 reuse the honest filter (no
retraining). Results go to ``OUT/analysis.json``, PNGs and ``OUT/summary.md``. The
experiment: ``docl_flower/experiments/figures.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from docl_flower.experiments.figures import FigureSettings, run_figures


def main() -> None:
    defaults = FigureSettings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=defaults.out)
    parser.add_argument("--adversary-epochs", type=int, default=defaults.adversary_epochs)
    parser.add_argument("--subsets", type=int, default=defaults.subsets)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs in OUT/runs")
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every run")
    args = parser.parse_args()
    start = time.time()
    _, paths, text = run_figures(
        FigureSettings(
            out=args.out,
            adversary_epochs=args.adversary_epochs,
            subsets=args.subsets,
            seed=args.seed,
            reuse=args.reuse,
            extra=tuple(args.extra),
        )
    )
    for path in paths:
        print("wrote", path)
    print(text)
    print(f"make figures: {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
