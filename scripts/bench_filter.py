"""Benchmark the global filter's scoring throughput against this machine's float32 GEMM rate.

Prints a table and writes JSON. Each autoencoder costs ``4 * D * M`` flops per image (two
matrix products); the fraction is (filter flop rate) / (GEMM flop rate), both measured here
in the same run with the same number of threads. The GEMM rate is the best of several
measurements (before, between and after the scoring runs), so that a busy machine does not
lower the yardstick. With ``--kernel native`` the build time of the fused kernel is reported
(0 when it came from the disk cache; ``--cold-build`` compiles it afresh).

    python scripts/bench_filter.py [--out results/bench_filter.json] [--sizes 10 100 1000]
        [--kernel native|torch] [--cold-build]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from docl_flower.core import native
from docl_flower.core.filter import (
    KERNELS,
    GlobalFilter,
    Registration,
    ScoringConfig,
    reference_scores,
)
from docl_flower.core.model import AutoencoderSpec


def machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def best_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    a = torch.rand(size, size)
    b = torch.rand(size, size)
    seconds = best_time(lambda: torch.mm(a, b), repeats)
    return 2 * size**3 / seconds / 1e9


def make_filter(n_models: int, dim: int, hidden: int, scoring: ScoringConfig) -> GlobalFilter:
    rng = np.random.default_rng(0)
    shapes = AutoencoderSpec(hidden=hidden).shapes(dim)
    regs = [
        Registration(
            i,
            i,
            {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in shapes.items()},
            10.0,
            1.0,
            100,
        )
        for i in range(n_models)
    ]
    return GlobalFilter(regs, scoring)


def _compile_s() -> float:
    kernel = native.load()
    return kernel.build_seconds if kernel is not None else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--chunk-images", type=int, default=ScoringConfig.chunk_images)
    parser.add_argument("--chunk-models", type=int, default=ScoringConfig.chunk_models)
    parser.add_argument("--kernel", choices=KERNELS, default=ScoringConfig.kernel)
    parser.add_argument(
        "--cold-build",
        action="store_true",
        help="compile the native kernel into a fresh cache directory (reports compile time)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/bench_filter.json"))
    args = parser.parse_args()

    scoring = ScoringConfig(args.chunk_images, args.chunk_models, args.kernel)
    info = machine()
    build_s: float | None = None
    if scoring.kernel == "native":
        if args.cold_build:
            os.environ["DOCL_FLOWER_CACHE"] = tempfile.mkdtemp(prefix="docl-bench-")
        start = time.perf_counter()
        kernel = native.load()
        build_s = time.perf_counter() - start
        if kernel is None:
            print("native kernel unavailable: scoring with the torch kernel (see the warning)")
    gemm_runs = [gemm_gflops()]
    x = torch.rand(args.images, args.dim)
    rows = []
    for n in args.sizes:
        flt = make_filter(n, args.dim, args.hidden, scoring)
        used = flt.kernel
        images = x if n <= 100 else x[: max(512, args.images * 100 // n)]
        seconds = best_time(lambda f=flt, xs=images: f.scores(xs), args.repeats)
        ips = images.shape[0] / seconds
        gflops = ips * 4 * args.dim * args.hidden * n / 1e9
        regs = list(flt.registrations)
        loop_s = best_time(lambda r=regs, xs=images: reference_scores(r, xs), 1)
        gemm_runs.append(gemm_gflops())
        rows.append(
            {
                "autoencoders": n,
                "kernel": used,
                "images": int(images.shape[0]),
                "seconds": seconds,
                "images_per_second": ips,
                "gflops": gflops,
                "fraction_of_gemm": 0.0,  # set below, against the best GEMM rate
                "naive_loop_images_per_second": images.shape[0] / loop_s,
            }
        )
    gemm = max(gemm_runs)
    for r in rows:
        r["fraction_of_gemm"] = r["gflops"] / gemm
    kernel_used = sorted({str(r["kernel"]) for r in rows})
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, "
        f"GPU: {info['gpu'] or 'none'}"
    )
    print(
        f"float32 GEMM (2048^3, torch.mm): {gemm:.1f} GFLOP/s (best of "
        f"{', '.join(f'{g:.0f}' for g in gemm_runs)}: before, between and after the scoring)"
    )
    print(
        f"kernel: {', '.join(kernel_used)} (asked: {scoring.kernel}); chunks: "
        f"{scoring.chunk_images} images x {scoring.chunk_models} autoencoders, "
        f"D={args.dim}, M={args.hidden}"
    )
    if build_s is not None:
        print(f"native kernel load: {build_s:.2f} s (of which compiling: {_compile_s():.2f} s)")
    print("| autoencoders | images | images/s | GFLOP/s | of GEMM | naive loop images/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['autoencoders']} | {r['images']} | {r['images_per_second']:.0f} | "
            f"{r['gflops']:.1f} | {r['fraction_of_gemm']:.2f} | "
            f"{r['naive_loop_images_per_second']:.0f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": info,
        "gemm_gflops": gemm,
        "gemm_gflops_runs": gemm_runs,
        "scoring": vars(scoring),
        "kernel": kernel_used,
        "native_load_seconds": build_s,
        "native_compile_seconds": _compile_s() if build_s is not None else None,
        "dim": args.dim,
        "hidden": args.hidden,
        "rows": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
