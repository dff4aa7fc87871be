"""Benchmark the global filter: throughput, one-image latency, memory, loading, bfloat16.

Prints tables and writes JSON (see :mod:`docl_flower.experiments.bench_filter` for every
figure). For each feature dimension D and number N of random autoencoders: the filter's bytes,
images/s and GFLOP/s against this machine's GEMM rate, one-image latency p50 / p99, peak
memory, loading a saved filter through the store and registering one more user; the bfloat16
kernel (on AVX512_BF16 where the CPU has it, else emulated), and how often bfloat16 decides as
float32 on a trained filter. Without the fused native kernel (no AVX-512) the torch kernel
scores and the report says so.

    python scripts/bench_filter.py [--out results/bench_filter.json]
        [--sizes 10 100 1000 10000] [--dims 784 128] [--kernel native|torch|auto|bf16]
        [--no-bf16] [--no-load] [--no-agreement] [--agreement-run DIR] [--cold-build]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from docl_flower.core.filter.global_filter import KERNELS
from docl_flower.experiments.bench_filter import BenchFilterSettings, render, run_bench, write


def parse_args(argv: Sequence[str] | None = None) -> BenchFilterSettings:
    d = BenchFilterSettings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(d.sizes))
    parser.add_argument("--dims", type=int, nargs="+", default=list(d.dims))
    parser.add_argument("--hidden", type=int, default=d.hidden)
    parser.add_argument("--images", type=int, default=d.images)
    parser.add_argument("--chunk-images", type=int, default=d.chunk_images)
    parser.add_argument("--chunk-models", type=int, default=d.chunk_models)
    parser.add_argument("--kernel", choices=KERNELS, default=d.kernel)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 rows")
    parser.add_argument("--no-load", action="store_true", help="skip the save/load timing")
    parser.add_argument("--load-sizes", type=int, nargs="*", help="default: every --sizes")
    parser.add_argument("--no-agreement", action="store_true", help="skip the decision check")
    parser.add_argument("--agreement-run", type=Path, help="a docl-flower run folder")
    parser.add_argument("--agreement-epochs", type=int, default=d.agreement_epochs)
    parser.add_argument("--latency-reps", type=int, default=d.latency_reps)
    parser.add_argument(
        "--latency-budget",
        type=float,
        default=d.latency_budget,
        help="seconds per one-image series",
    )
    parser.add_argument("--naive-max", type=int, default=d.naive_max, help="largest N for the loop")
    parser.add_argument(
        "--cold-build",
        action="store_true",
        help="compile the native kernel into a fresh cache directory (reports compile time)",
    )
    parser.add_argument("--repeats", type=int, default=d.repeats)
    parser.add_argument(
        "--gemm-size", type=int, default=d.gemm_size, help="side of the GEMM yardstick"
    )
    parser.add_argument("--out", type=Path, default=d.out)
    return BenchFilterSettings(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    settings = parse_args(argv)
    payload = run_bench(settings)
    print(render(payload, settings.gemm_size))
    write(payload, settings.out)
    print(f"written: {settings.out}")
    return payload


if __name__ == "__main__":
    main()
