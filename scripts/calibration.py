"""The Guard calibrated to a stated acceptance rate, measured over seeds (``make calibration``).

python scripts/calibration.py --out calibration [--settings mnist faces dp] [--seeds 0 1 2 3 4]
    [--targets 0.95 0.98 0.99] [--extra OVERRIDE ...] [--no-reuse]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from docl_flower.experiments.calibration import (
    DEFAULT_SEEDS,
    DEFAULT_TARGETS,
    SETTINGS,
    CalibrationSettings,
    run_calibration,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("calibration"))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    parser.add_argument("--targets", nargs="+", type=float, default=list(DEFAULT_TARGETS))
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides of every run")
    parser.add_argument("--no-reuse", action="store_true", help="train every run again")
    args = parser.parse_args()
    try:
        settings = CalibrationSettings(
            out=args.out,
            settings=tuple(args.settings),
            seeds=tuple(args.seeds),
            targets=tuple(args.targets),
            extra=tuple(args.extra),
            reuse=not args.no_reuse,
        )
    except ValueError as err:
        parser.error(str(err))
    run_calibration(settings)
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
