"""Edited re-uploads of registered users' photos, measured (``make robustness``).

python scripts/robustness.py --out robustness [--settings face imagenet pixels] [--seeds 0]
    [--target 0.98] [--extra OVERRIDE ...] [--no-reuse]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from docl_flower.experiments.robustness import (
    DEFAULT_SEEDS,
    DEFAULT_TARGET,
    SETTINGS,
    RobustnessSettings,
    run_robustness,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("robustness"))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET)
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides of every run")
    parser.add_argument("--no-reuse", action="store_true", help="train every run again")
    args = parser.parse_args()
    try:
        settings = RobustnessSettings(
            out=args.out,
            settings=tuple(args.settings),
            seeds=tuple(args.seeds),
            target=args.target,
            extra=tuple(args.extra),
            reuse=not args.no_reuse,
        )
    except ValueError as err:
        parser.error(str(err))
    run_robustness(settings)
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
