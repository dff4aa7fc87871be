"""Scale: DOCL with 10, 100 and 1,000 simulated users through Flower and Ray, next to a plain loop.

Each size runs as a Flower simulation (``docl-flower`` in a subprocess, its process tree's
memory sampled) and as the plain PyTorch loop of the same users, recipe and seeds; the last
rows repeat the default experiment (10 users) both ways. See
:mod:`docl_flower.experiments.scale` for what is measured and the targets of issue #11.

Writes ``OUT/bench_scale.json`` and ``OUT/summary.md``; prints the table after every row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from docl_flower.experiments.scale import ScaleError, ScaleSettings, run_scale, summary
from docl_flower.operations.runs import RunFailedError


def main(argv: list[str] | None = None) -> None:
    defaults = ScaleSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--users",
        type=int,
        nargs="*",
        default=list(defaults.users),
        help="users of the many-users rows (none: only the default-recipe row)",
    )
    parser.add_argument("--class-shards", type=int, default=defaults.class_shards)
    parser.add_argument("--out", type=Path, default=defaults.out)
    parser.add_argument("--reuse", action="store_true", help="reuse finished Flower runs")
    parser.add_argument("--skip-plain", action="store_true", help="Flower runs only")
    parser.add_argument("--no-default", action="store_true", help="skip the default-recipe row")
    parser.add_argument(
        "--default-repeats",
        type=int,
        default=defaults.default_repeats,
        help="paired runs (Flower, then plain) of the default experiment; judged on the median",
    )
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides, every run")
    args = parser.parse_args(argv)
    settings = ScaleSettings(
        users=tuple(args.users),
        class_shards=args.class_shards,
        out=args.out,
        reuse=args.reuse,
        skip_plain=args.skip_plain,
        no_default=args.no_default,
        default_repeats=args.default_repeats,
        extra=tuple(args.extra),
    )
    try:
        report = run_scale(settings, progress=lambda text: print(text, flush=True))
    except (ScaleError, RunFailedError, FileExistsError) as err:
        raise SystemExit(str(err)) from None
    print(summary(report), end="")


if __name__ == "__main__":
    main()
