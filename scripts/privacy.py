"""What the server learns from DOCL's uploads: inversion and membership inference, with DP.

    python scripts/privacy.py [--out privacy] [--datasets mnist faces] [--epsilons 1 4 8 none]
                              [--dp-recipe dp|default] [--reuse] [--extra HYDRA_OVERRIDE ...]
    python scripts/privacy.py --attack RUN_DIR [RUN_DIR ...] [--out DIR]

One ``docl-flower`` run per data set and setting (``none``, ``none-dp-recipe``, ``eps-E``) in
``OUT/runs/DATASET/SETTING``, then inversion and membership inference on every uploaded
autoencoder from the server's side only. Writes ``OUT/results.json``, ``OUT/summary.md``,
``OUT/inversion_*.png`` and ``OUT/tradeoff.png``. ``--attack`` attacks existing run folders
only (no Flower run). The experiment: ``docl_flower/experiments/privacy.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from docl_flower.experiments.privacy import DATASETS, PrivacySettings, run_privacy


def main() -> None:
    defaults = PrivacySettings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=defaults.out)
    parser.add_argument(
        "--datasets", nargs="+", choices=list(DATASETS), default=list(defaults.datasets)
    )
    parser.add_argument("--epsilons", nargs="+", default=list(defaults.epsilons))
    parser.add_argument(
        "--dp-recipe", default=defaults.dp_recipe, help="train config group of the DP runs"
    )
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs")
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every run")
    parser.add_argument(
        "--attack", nargs="+", type=Path, default=None, help="attack these run folders only"
    )
    args = parser.parse_args()
    try:
        settings = PrivacySettings(
            out=args.out,
            datasets=tuple(args.datasets),
            epsilons=tuple(args.epsilons),
            dp_recipe=args.dp_recipe,
            reuse=args.reuse,
            extra=tuple(args.extra),
            attack=tuple(args.attack or ()),
        )
    except ValueError as err:
        parser.error(str(err))
    report, md = run_privacy(settings)
    print(md)
    print(f"privacy.py: {report['seconds']:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
