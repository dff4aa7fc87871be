"""Print the README's markdown table for one DOCL run, beside the paper's MNIST figures.

python scripts/report.py outputs/DATE/TIME/results.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from docl_flower.core.evaluation.results import read_results
from docl_flower.experiments.tables import newest_results, run_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path, nargs="?")
    args = parser.parse_args()
    try:
        path = args.results or newest_results()
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    print(f"<!-- {path} -->")
    print(run_report(read_results(path)))


if __name__ == "__main__":
    main()
