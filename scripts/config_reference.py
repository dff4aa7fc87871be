"""Write the configuration reference (every option of every group of conf/) as markdown.

python scripts/config_reference.py [--out docs/reference/config.md] [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from docl_flower.operations.config_reference import DEFAULT_OUT, render, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the page to write")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when the page is stale"
    )
    args = parser.parse_args()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != render():
            sys.exit(f"{args.out} is stale: run python scripts/config_reference.py")
        return
    print(write(args.out))


if __name__ == "__main__":
    main()
