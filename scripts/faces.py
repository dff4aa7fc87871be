"""The paper's face experiment on the ORL faces: 10 people of 40 per draw, five draws.

    python scripts/faces.py [--out faces] [--draws 5] [--extractors face imagenet identity]
                            [--adversaries face] [--reuse] [--extra HYDRA_OVERRIDE ...]

Each (extractor, draw) is one ``docl-flower`` run (``dataset=att_faces
partition=random_classes seed=DRAW``: 10 of the 40 people, 7 training and 3 test photos each;
harmless: the 300 photos of the 30 people nobody registered). From each run's saved filter:
accuracy, the Guard trade-off over alpha (two- and one-sided), AUROC, scalability; for the
extractors in ``--adversaries``, the adversary matrix of draw 0 (one more run: an adversary
trains on its own and the victim's photos through its Flower client and registers as itself).
Writes ``OUT/faces.json``, ``OUT/summary.md`` and PNGs. The experiment:
``docl_flower/experiments/faces.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from docl_flower.experiments.faces import FaceSettings, run_faces


def main() -> None:
    defaults = FaceSettings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=defaults.out)
    parser.add_argument("--draws", type=int, default=defaults.draws)
    parser.add_argument("--extractors", nargs="+", default=list(defaults.extractors))
    parser.add_argument("--adversaries", nargs="*", default=list(defaults.adversaries))
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    parser.add_argument("--acceptance", type=float, default=defaults.acceptance)
    parser.add_argument("--subsets", type=int, default=defaults.subsets)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every run")
    args = parser.parse_args()
    report, md = run_faces(
        FaceSettings(
            out=args.out,
            draws=args.draws,
            extractors=tuple(args.extractors),
            adversaries=tuple(args.adversaries),
            alpha=args.alpha,
            acceptance=args.acceptance,
            subsets=args.subsets,
            reuse=args.reuse,
            extra=tuple(args.extra),
        )
    )
    print(md)
    print(f"make faces: {report['seconds']:.0f}s; wrote {args.out}/summary.md, faces.json, PNGs")


if __name__ == "__main__":
    main()
