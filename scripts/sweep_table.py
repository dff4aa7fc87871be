"""Print a markdown table of a Hydra multirun folder: overrides -> accuracy and timing.

python scripts/sweep_table.py multirun/DATE/TIME
"""

from __future__ import annotations

import argparse
from pathlib import Path

from docl_flower.experiments.tables import sweep_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep", type=Path)
    args = parser.parse_args()
    print(sweep_table(args.sweep))


if __name__ == "__main__":
    main()
