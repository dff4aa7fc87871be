"""Benchmark the global filter: throughput, one-image latency, memory, loading, bfloat16.

Prints tables and writes JSON. For each feature dimension D (784: MNIST pixels; 128: face
descriptors) and each number N of autoencoders (random, seeded, ``D -> M -> D`` with the
paper's M = 32), it reports

- the bytes of the stacked filter (the tensors the scoring path holds) and of the
  registrations, and the peak resident memory while building and while scoring;
- throughput: images/s and GFLOP/s for a batch (each autoencoder costs ``4 * D * M`` flops per
  image) and its fraction of this machine's float32 GEMM rate (``torch.mm`` of 2048x2048
  matrices, same threads, best of measurements before, between and after the scoring runs, so
  that a busy machine does not lower the yardstick; in brackets, against the best of the two
  measured just before and just after the row, for a machine whose load changes during the
  run), and the batch's latency;
- one-image latency p50 / p99 (an upload service checks one image at a time: batch of 1,
  many repetitions, each on another image);
- loading a saved filter of N autoencoders through the store (``save_filter`` into a temporary
  folder, then ``PersistentFilter``: SHA-256 of every tensor file, HMAC of ``filter.json``
  under a temporary key, content hash of every autoencoder), building the filter from it, and
  registering one more user into it (``PersistentFilter.register``, as the ServerApp does after
  each accepted upload: the median of :data:`REGISTER_REPEATS`).

The bfloat16 kernel is measured too: on AVX512_BF16 instructions where the CPU has them,
else emulated (labelled ``bf16 (emulated)``: slower than float32, measured only to show what
it costs and that its decisions hold). ``kernel=auto`` picks it only where the instructions
exist and it is measured faster. The decision check scores the MNIST and Fashion-MNIST test
images with a trained filter in float32 and in bfloat16 and reports how often the argmin and
the Guards decide alike (the trained filter of the newest ``docl-flower`` run under
``outputs/``, or ``--agreement-run DIR``; without one, ten autoencoders trained here for a
few epochs).

    python scripts/bench_filter.py [--out results/bench_filter.json]
        [--sizes 10 100 1000 10000] [--dims 784 128] [--kernel native|torch|auto|bf16]
        [--no-bf16] [--no-load] [--no-agreement] [--agreement-run DIR] [--cold-build]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from docl_flower.core.filter import native
from docl_flower.core.filter.global_filter import (
    GUARDS,
    KERNELS,
    OUTSIDER,
    GlobalFilter,
    Registration,
    ScoringConfig,
    bf16_available,
    decision_agreement,
    prefer_bf16,
    reference_scores,
)
from docl_flower.core.training.autoencoder import AutoencoderSpec

PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: CPU flags worth recording next to the figures.
FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


# ------------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = native.cpu_flags()
    kernel = native.load()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "flags": {f: f in flags for f in FLAGS},
        "bf16_instructions": native.cpu_has_bf16(),
        "bf16_kernel_on_instructions": bool(kernel and kernel.bf16_hardware),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
    }


def rss() -> int:
    """Resident memory of this process now, bytes (0 where /proc is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakRss:
    """Samples this process's resident memory every few milliseconds; ``peak`` is the max."""

    def __init__(self) -> None:
        self.start = rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


# ------------------------------------------------------------------------------- timing
def best_time(fn: Callable[[], object], repeats: int) -> float:
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


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation (numpy's default)."""
    return float(np.percentile(np.asarray(values), q))


def one_image_latency(
    flt: GlobalFilter, x: torch.Tensor, reps: int, budget_s: float
) -> dict[str, float]:
    """Seconds per call of ``flt.scores`` on one image (another image each call)."""
    flt.scores(x[:1])  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for i in range(reps):
        row = x[i % x.shape[0]].reshape(1, -1)
        start = time.perf_counter()
        flt.scores(row)
        times.append(time.perf_counter() - start)
        if i >= 19 and time.perf_counter() > deadline:
            break
    return {
        "p50_s": percentile(times, 50),
        "p99_s": percentile(times, 99),
        "mean_s": float(np.mean(times)),
        "min_s": min(times),
        "reps": len(times),
    }


# ------------------------------------------------------------------------------- filters
def make_registrations(n_models: int, dim: int, hidden: int, seed: int = 0) -> list[Registration]:
    """``n_models`` random autoencoders (weights ~ N(0, 0.05^2)), seeded."""
    rng = np.random.default_rng(seed)
    shapes = AutoencoderSpec(hidden=hidden).shapes(dim)
    return [
        Registration(
            i,
            i,
            {
                k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.05)
                for k, s in shapes.items()
            },
            10.0,
            1.0,
            100,
        )
        for i in range(n_models)
    ]


def make_filter(n_models: int, dim: int, hidden: int, scoring: ScoringConfig) -> GlobalFilter:
    return GlobalFilter(make_registrations(n_models, dim, hidden), scoring)


def _compile_s() -> float:
    kernel = native.load()
    return kernel.build_seconds if kernel is not None else 0.0


def _label(flt: GlobalFilter) -> str:
    return f"{flt.kernel} (emulated)" if flt.bf16_emulated else flt.kernel


def measure(
    regs: list[Registration],
    scoring: ScoringConfig,
    x: torch.Tensor,
    args: argparse.Namespace,
    gemm_runs: list[float],
    reference: torch.Tensor | None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """One row of the table: build, throughput, batch and one-image latency, memory."""
    n, dim, hidden = len(regs), regs[0].params["encoder.weight"].shape[1], args.hidden
    with PeakRss() as build_mem:
        start = time.perf_counter()
        flt = GlobalFilter(regs, scoring)
        build_s = time.perf_counter() - start
    images = x if n <= 100 else x[: max(512, args.images * 100 // n)]
    with PeakRss() as score_mem:
        seconds = best_time(lambda: flt.scores(images), args.repeats)
    scores = flt.scores(images)
    latency = one_image_latency(flt, x, args.latency_reps, args.latency_budget)
    gemm_runs.append(gemm_gflops(args.gemm_size))
    ips = images.shape[0] / seconds
    gflops = ips * 4 * dim * hidden * n / 1e9
    row: dict[str, Any] = {
        "dim": dim,
        "hidden": hidden,
        "autoencoders": n,
        "kernel": flt.kernel,
        "label": _label(flt),
        "bf16_emulated": flt.bf16_emulated,
        "filter_bytes": flt.nbytes,
        "registration_bytes": sum(int(v.nbytes) for r in regs for v in r.params.values()),
        "build_seconds": build_s,
        "peak_rss_build_bytes": build_mem.peak,
        "rss_before_scoring_bytes": score_mem.start,
        "peak_rss_scoring_bytes": score_mem.peak,
        "scoring_temporary_bytes": score_mem.peak - score_mem.start,
        "images": int(images.shape[0]),
        "seconds": seconds,
        "images_per_second": ips,
        "gflops": gflops,
        "fraction_of_gemm": 0.0,  # set at the end, against the best GEMM rate
        # against the GEMM rates measured just before and just after this row (a machine
        # whose load changes during the run lowers both alike)
        "fraction_of_adjacent_gemm": gflops / max(gemm_runs[-2:]),
        "latency_1": latency,
        "naive_loop_images_per_second": None,
        "max_relative_difference_vs_float32": None,
    }
    if reference is not None:
        rel = (scores.double() - reference.double()).abs() / reference.double().abs()
        row["max_relative_difference_vs_float32"] = float(rel.max())
    if n <= args.naive_max and flt.kernel != "bf16":
        loop_s = best_time(lambda: reference_scores(regs, images), 1)
        row["naive_loop_images_per_second"] = images.shape[0] / loop_s
    return row, scores


@contextmanager
def _temporary_key() -> Iterator[Path]:
    """A temporary folder whose filter key the store uses (the user's key stays untouched)."""
    folder = Path(tempfile.mkdtemp(prefix="docl-bench-store-"))
    old = os.environ.get("DOCL_FLOWER_FILTER_KEY")
    os.environ["DOCL_FLOWER_FILTER_KEY"] = str(folder / "filter.key")
    try:
        yield folder
    finally:
        if old is None:
            os.environ.pop("DOCL_FLOWER_FILTER_KEY", None)
        else:
            os.environ["DOCL_FLOWER_FILTER_KEY"] = old
        shutil.rmtree(folder, ignore_errors=True)


#: Registrations timed into each loaded filter (one new user each; the median is reported).
REGISTER_REPEATS = 5


def measure_load(regs: list[Registration], scoring: ScoringConfig) -> dict[str, Any]:
    """Time a save of ``regs``, a verified load, the filter build, and one more user.

    The last is ``PersistentFilter.register``: a save that rewrites the filter's metadata.
    """
    from docl_flower.core.filter.store import PersistentFilter, save_filter, segment_files

    n, dim = len(regs), regs[0].params["encoder.weight"].shape[1]
    info = {"config": {"bench": "bench_filter.py"}}
    with _temporary_key() as tmp:
        folder = tmp / "filter"
        start = time.perf_counter()
        save_filter(folder, regs, {k: {"node_id": k} for k in range(n)}, info=info)
        save_s = time.perf_counter() - start
        files = segment_files(folder)
        file_bytes = sum(p.stat().st_size for p in files) + (folder / "filter.json").stat().st_size
        with PeakRss() as mem:
            start = time.perf_counter()
            loaded = PersistentFilter(folder, info)
            load_s = time.perf_counter() - start
            start = time.perf_counter()
            flt = GlobalFilter(loaded.registrations, scoring)
            build_s = time.perf_counter() - start
        same = len(loaded.entries) == n and flt.size == n
        del flt
        hidden = regs[0].params["encoder.weight"].shape[0]
        register_s = []
        for k, reg in enumerate(make_registrations(REGISTER_REPEATS, dim, hidden, seed=1)):
            user = n + k
            start = time.perf_counter()
            loaded.register(user, [replace(reg, user_id=user)], [{"node_id": user}])
            register_s.append(time.perf_counter() - start)
        same = same and len(loaded.entries) == n + REGISTER_REPEATS
        del loaded
    return {
        "dim": dim,
        "autoencoders": n,
        "file_bytes": file_bytes,
        "segments": len(files),
        "save_seconds": save_s,
        "load_seconds": load_s,
        "filter_build_seconds": build_s,
        "register_seconds_median": float(np.median(register_s)),
        "register_seconds_max": max(register_s),
        "peak_rss_bytes": mem.peak,
        "rss_before_bytes": mem.start,
        "entries_loaded": same,
    }


# ------------------------------------------------------------------------------- decisions
def _newest_run() -> Path | None:
    """The newest run under outputs/ like the default one with a filter of the 10 classes.

    Like the default: MNIST, deskewed pixels, M = 32, no differential privacy. None if none.
    """
    from omegaconf import OmegaConf

    runs = []
    for meta in (PROJECT_ROOT / "outputs").glob("*/*/filter/filter.json"):
        run = meta.parent.parent
        try:
            cfg = OmegaConf.load(run / "experiment.yaml")
            entries = json.loads(meta.read_text())["entries"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        default_like = (
            OmegaConf.select(cfg, "dataset.name") == "mnist"
            and str(OmegaConf.select(cfg, "features._target_")).endswith(".Deskew")
            and OmegaConf.select(cfg, "model.hidden") == AutoencoderSpec().hidden
            and OmegaConf.select(cfg, "train.dp.epsilon") is None
        )
        if default_like and sorted(e.get("label") for e in entries) == list(range(10)):
            runs.append(run)
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _from_run(run: Path) -> dict[str, Any]:
    from docl_flower.core.filter.store import load_filter
    from docl_flower.federation.components import load_experiment

    exp = load_experiment(run / "experiment.yaml")
    # verify_key=False: a local run folder, read for a benchmark (its key may live elsewhere)
    regs, _ = load_filter(run / "filter", verify_key=False)
    regs = sorted(regs, key=lambda r: r.label)
    images, labels = exp.dataset.load("test")
    sets = {"test": (exp.features(images), torch.as_tensor(labels))}
    if exp.harmless is not None:
        sets["harmless"] = (exp.features(exp.harmless.load("test")[0]), None)
    accuracy = None
    if (run / "results.json").is_file():
        accuracy = json.loads((run / "results.json").read_text()).get("overall_accuracy")
    return {
        "source": f"saved filter of the run {run.relative_to(PROJECT_ROOT)} "
        f"(its overall accuracy: {accuracy})",
        "dataset": type(exp.dataset).__name__,
        "registrations": regs,
        "sets": sets,
        "alpha": exp.guard.alpha,
        "sided": exp.guard.sided,
    }


def _quick_trained(epochs: int) -> dict[str, Any]:
    from docl_flower.core.data.idx import IdxDataset
    from docl_flower.core.features.extractors import Deskew
    from docl_flower.core.training.autoencoder import (
        TrainSpec,
        error_stats,
        reconstruction_errors,
        state_to_numpy,
        train_autoencoder,
    )

    mnist = IdxDataset("mnist", str(PROJECT_ROOT / "data" / "mnist"), download=False)
    fashion = IdxDataset(
        "fashion-mnist", str(PROJECT_ROOT / "data" / "fashion-mnist"), download=False
    )
    features = Deskew()
    train_images, train_labels = mnist.load("train")
    x_train = features(train_images)
    regs = []
    for c in range(10):
        xc = x_train[torch.as_tensor(train_labels == c)]
        model, _ = train_autoencoder(
            xc, AutoencoderSpec(hidden=32), TrainSpec(epochs=epochs, batch_size=128), c
        )
        mu, sd = error_stats(reconstruction_errors(model, xc))
        regs.append(Registration(c, c, state_to_numpy(model), mu, sd, len(xc)))
    images, labels = mnist.load("test")
    return {
        "source": f"10 autoencoders trained here on deskewed MNIST ({epochs} epochs, paper recipe)",
        "dataset": "mnist",
        "registrations": regs,
        "sets": {
            "test": (features(images), torch.as_tensor(labels)),
            "harmless": (features(fashion.load("test")[0]), None),
        },
        "alpha": 1.5,
        "sided": "one",
    }


def decision_check(args: argparse.Namespace) -> dict[str, Any]:
    """bfloat16 vs float32 decisions on the MNIST and Fashion-MNIST test images."""
    run = args.agreement_run or _newest_run()
    setup = _from_run(run) if run is not None else _quick_trained(args.agreement_epochs)
    regs = setup["registrations"]
    f32 = GlobalFilter(regs, ScoringConfig(kernel="native"))
    variants = {
        "pure": GlobalFilter(regs, ScoringConfig(kernel="bf16", bf16_refine=False)),
        "refined": GlobalFilter(regs, ScoringConfig(kernel="bf16")),
    }
    guards = [cls(setup["alpha"], setup["sided"]) for cls in GUARDS.values()]
    owner_of = {r.label: r.user_id for r in regs}
    names = {"test": "MNIST test", "harmless": "Fashion-MNIST test"}
    results = []
    for key, (x, labels) in setup["sets"].items():
        start = time.perf_counter()
        ref = f32.scores(x)
        seconds = {"float32": time.perf_counter() - start}
        uploaders: list[tuple[str, torch.Tensor | int]] = [("third party", OUTSIDER)]
        if labels is not None:
            owners = torch.tensor([owner_of.get(int(c), OUTSIDER) for c in labels])
            uploaders.append(("the image's owner", owners))
        for variant, flt in variants.items():
            start = time.perf_counter()
            other = flt.scores(x)
            seconds[variant] = time.perf_counter() - start
            for who, uploader in uploaders:
                agree = decision_agreement(f32, ref, other, guards, uploader)
                results.append(
                    {
                        "set": names.get(key, key),
                        "bf16": variant,
                        "uploader": who,
                        **agree,
                        "scoring_seconds": dict(seconds),
                    }
                )
    return {
        "source": setup["source"],
        "kernel": _label(variants["pure"]),
        "refinement": {
            "bf16_margin": variants["refined"].scoring.bf16_margin,
            "refine_alpha": variants["refined"].scoring.refine_alpha,
        },
        "alpha": setup["alpha"],
        "sided": setup["sided"],
        "autoencoders": len(regs),
        "results": results,
    }


# ------------------------------------------------------------------------------- main
def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f}" if s < 1 else f"{s * 1e3:.0f}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--dims", type=int, nargs="+", default=[784, 128])
    parser.add_argument("--hidden", type=int, default=AutoencoderSpec().hidden)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--chunk-images", type=int, default=ScoringConfig.chunk_images)
    parser.add_argument("--chunk-models", type=int, default=ScoringConfig.chunk_models)
    parser.add_argument("--kernel", choices=KERNELS, default=ScoringConfig.kernel)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 rows")
    parser.add_argument("--no-load", action="store_true", help="skip the save/load timing")
    parser.add_argument("--load-sizes", type=int, nargs="*", help="default: every --sizes")
    parser.add_argument("--no-agreement", action="store_true", help="skip the decision check")
    parser.add_argument("--agreement-run", type=Path, help="a docl-flower run folder")
    parser.add_argument("--agreement-epochs", type=int, default=3)
    parser.add_argument("--latency-reps", type=int, default=200)
    parser.add_argument(
        "--latency-budget", type=float, default=15.0, help="seconds per one-image series"
    )
    parser.add_argument("--naive-max", type=int, default=1000, help="largest N for the loop")
    parser.add_argument(
        "--cold-build",
        action="store_true",
        help="compile the native kernel into a fresh cache directory (reports compile time)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gemm-size", type=int, default=2048, help="side of the GEMM yardstick")
    parser.add_argument("--out", type=Path, default=Path("results/bench_filter.json"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    scoring = ScoringConfig(args.chunk_images, args.chunk_models, args.kernel)
    build_s: float | None = None
    if scoring.kernel != "torch":
        if args.cold_build:
            os.environ["DOCL_FLOWER_CACHE"] = tempfile.mkdtemp(prefix="docl-bench-")
        start = time.perf_counter()
        kernel = native.load()
        build_s = time.perf_counter() - start
        if kernel is None:
            print("native kernel unavailable: scoring with the torch kernel (see the warning)")
    info = machine()
    started = time.perf_counter()
    gemm_runs = [gemm_gflops(args.gemm_size)]
    # bfloat16 rows: pure bfloat16 scores (the float32 refinement of the deciding entries
    # depends on the data; its cost is in the decision check, on a trained filter)
    bf16_scoring = ScoringConfig(args.chunk_images, args.chunk_models, "bf16", bf16_refine=False)
    with_bf16 = not args.no_bf16 and native.load() is not None
    load_sizes = args.sizes if args.load_sizes is None else args.load_sizes
    rows, loads, auto = [], [], {}
    for dim in args.dims:
        x = torch.rand(args.images, dim, generator=torch.Generator().manual_seed(dim))
        auto[str(dim)] = {
            "bf16_instructions": bf16_available(),
            "picks": "bf16" if prefer_bf16(dim, args.hidden) else "native",
        }
        for n in args.sizes:
            regs = make_registrations(n, dim, args.hidden)
            row, ref = measure(regs, scoring, x, args, gemm_runs, None)
            rows.append(row)
            if with_bf16:
                rows.append(measure(regs, bf16_scoring, x, args, gemm_runs, ref)[0])
            del ref
            if not args.no_load and n in load_sizes:
                loads.append(measure_load(regs, scoring))
            del regs
    gemm = max(gemm_runs)
    for r in rows:
        r["fraction_of_gemm"] = r["gflops"] / gemm
    agreement = None if args.no_agreement or native.load() is None else decision_check(args)
    info["load_average_end"] = list(os.getloadavg())
    info["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kernel_used = sorted({str(r["label"]) for r in rows})

    print(
        f"machine: {info['cpu']}, {info['cores']} cores, "
        f"{_mb(info['memory_bytes'])} MiB, {info['torch_threads']} torch threads, "
        f"GPU: {info['gpu'] or 'none'}"
    )
    print(
        "CPU flags: "
        + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in info["flags"].items())
        + f"; bf16 kernel on instructions: {'yes' if info['bf16_kernel_on_instructions'] else 'no'}"
    )
    print(
        f"load average (1/5/15 min) at start {info['load_average_start'][0]:.1f}/"
        f"{info['load_average_start'][1]:.1f}/{info['load_average_start'][2]:.1f}, at end "
        f"{info['load_average_end'][0]:.1f}/{info['load_average_end'][1]:.1f}/"
        f"{info['load_average_end'][2]:.1f}"
    )
    print(
        f"float32 GEMM ({args.gemm_size}^3, torch.mm): {gemm:.1f} GFLOP/s (best of "
        f"{', '.join(f'{g:.0f}' for g in gemm_runs)}: before, between and after the scoring)"
    )
    print(
        f"kernels: {', '.join(kernel_used)} (asked: {scoring.kernel}); chunks: "
        f"{scoring.chunk_images} images x {scoring.chunk_models} autoencoders, M={args.hidden}; "
        "kernel=auto picks: "
        + ", ".join(f"D={d}: {a['picks']}" for d, a in auto.items())
        + ("" if native.cpu_has_bf16() else " (this CPU reports no avx512_bf16)")
    )
    if build_s is not None:
        print(f"native kernel load: {build_s:.2f} s (of which compiling: {_compile_s():.2f} s)")
    print()
    print(
        "| D | autoencoders | kernel | filter MiB | images | batch s | images/s | GFLOP/s "
        "| of GEMM (adjacent) | 1 image p50 ms | 1 image p99 ms "
        "| peak RSS MiB (scoring temporaries) "
        "| naive loop images/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lat = r["latency_1"]
        naive = r["naive_loop_images_per_second"]
        print(
            f"| {r['dim']} | {r['autoencoders']} | {r['label']} | {_mb(r['filter_bytes'])} | "
            f"{r['images']} | {r['seconds']:.3f} | {r['images_per_second']:.0f} | "
            f"{r['gflops']:.1f} | {r['fraction_of_gemm']:.2f} "
            f"({r['fraction_of_adjacent_gemm']:.2f}) | {_ms(lat['p50_s'])} | "
            f"{_ms(lat['p99_s'])} | {_mb(r['peak_rss_scoring_bytes'])} "
            f"({_mb(r['scoring_temporary_bytes'])}) | "
            f"{'-' if naive is None else f'{naive:.0f}'} |"
        )
    if loads:
        print()
        print("Saved filter (store API; load = SHA-256 + HMAC + content hashes):")
        print(
            "| D | autoencoders | file MiB | save s | load s | filter build s | "
            f"+1 user ms (median / max of {REGISTER_REPEATS}) | peak RSS MiB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in loads:
            print(
                f"| {r['dim']} | {r['autoencoders']} | {_mb(r['file_bytes'])} | "
                f"{r['save_seconds']:.2f} | {r['load_seconds']:.2f} | "
                f"{r['filter_build_seconds']:.2f} | "
                f"{_ms(r['register_seconds_median'])} / {_ms(r['register_seconds_max'])} | "
                f"{_mb(r['peak_rss_bytes'])} |"
            )
    if agreement is not None:
        print()
        print(
            f"Decisions, {agreement['kernel']} vs float32 ({agreement['source']}; "
            f"{agreement['autoencoders']} autoencoders; Guards at alpha {agreement['alpha']}, "
            f"{agreement['sided']}-sided; refined: entries within "
            f"{agreement['refinement']['bf16_margin']:.0%} of the best score or of "
            f"mu + {agreement['refinement']['refine_alpha']} sigma scored again in float32):"
        )
        guard_keys = [k for k in agreement["results"][0] if k.startswith("guard:")]
        print(
            "| images | bf16 | uploader | n | argmin | "
            + " | ".join(f"{k[6:]} Guard" for k in guard_keys)
            + " | max rel. score difference | scoring s (float32 / bf16) |"
        )
        print("|---|---|---|---|---|" + "---|" * len(guard_keys) + "---|---|")
        for r in agreement["results"]:
            sec = r["scoring_seconds"]
            print(
                f"| {r['set']} | {r['bf16']} | {r['uploader']} | {int(r['images'])} | "
                f"{r['argmin']:.5f} | "
                + " | ".join(f"{r[k]:.5f}" for k in guard_keys)
                + f" | {r['max_relative_difference']:.2e} | "
                f"{sec['float32']:.2f} / {sec[r['bf16']]:.2f} |"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": info,
        "seconds": time.perf_counter() - started,
        "gemm_gflops": gemm,
        "gemm_gflops_runs": gemm_runs,
        "scoring": vars(scoring),
        "kernel": kernel_used,
        "auto": auto,
        "native_load_seconds": build_s,
        "native_compile_seconds": _compile_s() if build_s is not None else None,
        "dims": args.dims,
        "hidden": args.hidden,
        "sizes": args.sizes,
        "rows": rows,
        "load": loads,
        "agreement": agreement,
    }
    args.out.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    print(f"written: {args.out}")
    return payload


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    main()
