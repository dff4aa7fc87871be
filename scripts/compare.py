"""DOCL vs one-shot feature statistics, FedAvg, FedProx and a centralised reference.

    python scripts/compare.py [--out comparison] [--dataset mnist|faces|both] [--rounds 30]
                              [--only NAME ...] [--reuse] [--extra HYDRA_OVERRIDE ...]

Every row is one ``docl-flower`` run (see :mod:`docl_flower.experiments.compare` for the rows,
the face protocol and the common acceptance level). Writes ``OUT/comparison.md`` (MNIST),
``OUT/faces.md`` and the plots ``OUT/accuracy_vs_bytes.png``,
``OUT/faces_accuracy_vs_bytes.png``, made from the runs' ``results.json`` files only.

``--only NAME ...`` runs just those rows (others are read from their run folders when present).
A row with no results in this checkout keeps its line of the previous table at the same path,
marked as carried over (its new columns empty), so that a partial rerun never drops measured
rows; run without ``--only`` to remeasure everything.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from docl_flower.experiments.compare import RUNS, CompareSettings, compare_table


def main() -> None:
    d = CompareSettings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=d.out)
    parser.add_argument("--dataset", choices=["mnist", "faces", "both"], default=d.dataset)
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--centralised-epochs", type=int, default=d.centralised_epochs)
    parser.add_argument("--acceptance", type=float, default=d.acceptance)
    parser.add_argument("--only", nargs="*", default=None, help="run only these rows")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every run")
    args = parser.parse_args()
    unknown = sorted(set(args.only or []) - set(RUNS))
    if unknown:
        parser.error(f"unknown rows {unknown}; rows: {sorted(RUNS)}")
    settings = CompareSettings(**{**vars(args), "extra": tuple(args.extra)})
    start = time.time()
    for dataset in settings.datasets():
        md, states = compare_table(dataset, settings)
        print(md)
        for name, state in states.items():
            print(f"{name}: {state}")
    print(f"compare.py: {time.time() - start:.0f}s; wrote {settings.out}")


if __name__ == "__main__":
    main()
