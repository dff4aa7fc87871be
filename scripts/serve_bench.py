"""Benchmark the upload service (``docl-flower filter serve``) under load.

Prints tables and writes ``OUT/bench.json`` and ``OUT/bench.md`` (see
:mod:`docl_flower.experiments.serve_bench` for every figure). For filters of N = 10 and 1,000
MNIST-shaped autoencoders (and the 10-person ORL face filter where the data and dlib are
here): the real service on 127.0.0.1 at concurrency 1, 8 and 64 (images/s, p50 / p90 / p99
latency, failed requests) against ``deciding.decide`` in this process; reloads under load; and,
with ``--sweep``, other ``--max-batch`` / ``--max-delay-ms`` settings.

    python scripts/serve_bench.py [--out serve] [--quick] [--sizes 10 1000]
        [--concurrency 1 8 64] [--requests 1500] [--level-cap-s 45] [--sweep]
        [--sweep-settings 16/2 32/5 64/10] [--no-faces] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from docl_flower.experiments.serve_bench import (
    ServeBenchSettings,
    render,
    run_serve_bench,
    write,
)


def batching(text: str) -> tuple[int, float]:
    """``MAX_BATCH/MAX_DELAY_MS`` (e.g. ``32/5``)."""
    try:
        batch, delay = text.split("/")
        return int(batch), float(delay)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MAX_BATCH/MAX_DELAY_MS, got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> ServeBenchSettings:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="tiny filters, few requests (the test's settings)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", help="autoencoders per MNIST filter")
    parser.add_argument("--concurrency", type=int, nargs="+", help="clients of each level")
    parser.add_argument("--requests", type=int, help="requests per level (MNIST filters)")
    parser.add_argument("--face-requests", type=int, help="requests per level (face filter)")
    parser.add_argument("--level-cap-s", type=float, help="time cap of a level, seconds")
    parser.add_argument("--warmup", type=int, help="requests before each level, not counted")
    parser.add_argument("--max-batch", type=int, help="the service's --max-batch")
    parser.add_argument("--max-delay-ms", type=float, help="the service's --max-delay-ms")
    parser.add_argument("--reloads", type=int, help="reloads under load (0: skip)")
    parser.add_argument("--reload-interval-s", type=float)
    parser.add_argument("--sweep", action="store_true", default=None, help="batching sweep")
    parser.add_argument("--sweep-settings", type=batching, nargs="+", metavar="BATCH/DELAY_MS")
    faces = parser.add_mutually_exclusive_group()
    faces.add_argument("--faces", action="store_true", default=None, help="the ORL face filter")
    faces.add_argument("--no-faces", dest="faces", action="store_false", default=None)
    parser.add_argument("--data-root", type=Path, help="folder of mnist/ and att-faces/")
    parser.add_argument("--in-process-budget-s", type=float)
    parser.add_argument("--out", type=Path, default=Path("serve"))
    args = vars(parser.parse_args(argv))
    quick = args.pop("quick")
    given = {k: v for k, v in args.items() if v is not None}
    for key in ("sizes", "concurrency", "sweep_settings"):
        if key in given:
            given[key] = tuple(given[key])
    return ServeBenchSettings.quick_mode(**given) if quick else ServeBenchSettings(**given)


def _stop(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM ends the benchmark as Ctrl-C does: the servers it started are stopped first."""
    sys.exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    settings = parse_args(argv)
    before = signal.signal(signal.SIGTERM, _stop)
    try:
        payload = run_serve_bench(settings)
    finally:
        signal.signal(signal.SIGTERM, before)
    print(render(payload))
    json_path, md_path = write(payload, settings.out)
    print(f"written: {json_path}, {md_path}")
    return payload


if __name__ == "__main__":
    main()
