"""Benchmark of the global filter: throughput, one-image latency, memory, loading, bfloat16.

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
``outputs/``, or ``agreement_run``; without one, ten autoencoders trained here for a
few epochs).

Without the fused native kernel (no AVX-512, or no compiler) the rows are scored by the torch
kernel, the bfloat16 rows and the decision check are skipped, and the report says so.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from docl_flower.core.filter import native
from docl_flower.core.filter.global_filter import (
    GUARDS,
    OUTSIDER,
    GlobalFilter,
    Registration,
    ScoringConfig,
    bf16_available,
    decision_agreement,
    prefer_bf16,
    reference_scores,
)
from docl_flower.core.pipeline.config import PROJECT_ROOT
from docl_flower.core.training.autoencoder import AutoencoderSpec
from docl_flower.experiments.launch import cpu_model, load_average
from docl_flower.experiments.tables import markdown_table, write_json

#: CPU flags worth recording next to the figures.
FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
#: Resident memory is sampled every 2 ms: a scoring call of the small rows lasts a few ms.
RSS_SAMPLE_S = 0.002
#: Random autoencoders: weights ~ N(0, 0.05^2), so that sigmoid outputs stay near 0.5 and the
#: errors are of the size of trained ones; their (unused) error statistics and sizes.
WEIGHT_SCALE = 0.05
RANDOM_MU, RANDOM_SIGMA, RANDOM_EXAMPLES = 10.0, 1.0, 100
#: Above this many autoencoders a row scores fewer images (``images * 100 / N``, at least
#: :data:`MIN_BIG_IMAGES`), so that each of the large rows takes seconds, not minutes.
FULL_BATCH_UP_TO = 100
MIN_BIG_IMAGES = 512
#: One-image latency: at least this many calls before the time budget may stop the series
#: (a p99 of fewer calls is the maximum).
MIN_LATENCY_REPS = 20
#: GEMM yardstick: best of this many ``torch.mm`` calls of matrices of this side (large enough
#: for the BLAS to reach its peak rate on every thread).
GEMM_REPEATS, GEMM_SIZE = 5, 2048
#: Flops of one autoencoder on one image, per ``D * M``: two products of ``D x M`` (encoder
#: and decoder), a multiply and an add each.
FLOPS_PER_DM = 4
#: Registrations timed into each loaded filter (one new user each; the median is reported).
REGISTER_REPEATS = 5
#: The decision check's trained filter (without a run to read): training batch size, and the
#: Guard of ``conf/guard/paper.yaml`` it is checked with.
QUICK_BATCH = 128
PAPER_ALPHA, PAPER_SIDED = 1.5, "one"


@dataclass(frozen=True)
class BenchFilterSettings:
    """What the benchmark measures (the command line of ``scripts/bench_filter.py``)."""

    #: Numbers N of autoencoders, and feature dimensions D (784: MNIST pixels; 128: faces).
    sizes: Sequence[int] = (10, 100, 1000, 10000)
    dims: Sequence[int] = (784, 128)
    #: The autoencoders' hidden size M (the paper's 32).
    hidden: int = AutoencoderSpec().hidden
    #: Images of a batch (a row of more than 100 autoencoders takes fewer).
    images: int = 4096
    chunk_images: int = ScoringConfig.chunk_images
    chunk_models: int = ScoringConfig.chunk_models
    kernel: str = ScoringConfig.kernel
    #: Skip the bfloat16 rows / the save-and-load timing / the decision check.
    no_bf16: bool = False
    no_load: bool = False
    #: Sizes of the save-and-load timing (None: every size).
    load_sizes: Sequence[int] | None = None
    no_agreement: bool = False
    #: A ``docl-flower`` run folder for the decision check (None: the newest under outputs/).
    agreement_run: Path | None = None
    #: Epochs of the autoencoders trained for the decision check when no run is found.
    agreement_epochs: int = 3
    #: One-image latency: calls, and seconds per series.
    latency_reps: int = 200
    latency_budget: float = 15.0
    #: Largest N timed with the naive loop (one autoencoder after the other).
    naive_max: int = 1000
    #: Compile the native kernel into a fresh cache folder (reports the compile time).
    cold_build: bool = False
    #: Timed calls per batch (the best counts).
    repeats: int = 3
    #: Side of the GEMM yardstick.
    gemm_size: int = GEMM_SIZE
    out: Path = Path("results/bench_filter.json")

    def scoring(self) -> ScoringConfig:
        """The float32 rows' scoring."""
        return ScoringConfig(self.chunk_images, self.chunk_models, self.kernel)

    def bf16_scoring(self) -> ScoringConfig:
        """The bfloat16 rows' scoring: pure bfloat16 scores.

        The float32 refinement of the deciding entries depends on the data; its cost is in the
        decision check, on a trained filter.
        """
        return ScoringConfig(self.chunk_images, self.chunk_models, "bf16", bf16_refine=False)


# ------------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = cpu_model()
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
        "load_average_start": load_average(),
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
        while not self._stop.wait(RSS_SAMPLE_S):
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
    """The fastest of ``repeats`` calls of ``fn`` (after one untimed warm-up call)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_gflops(size: int = GEMM_SIZE, repeats: int = GEMM_REPEATS) -> float:
    """GFLOP/s of this machine's float32 GEMM: ``torch.mm`` of two ``size`` x ``size`` matrices."""
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
        if i + 1 >= MIN_LATENCY_REPS and time.perf_counter() > deadline:
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
    """``n_models`` random autoencoders (weights ~ N(0, :data:`WEIGHT_SCALE` ^ 2)), seeded."""
    rng = np.random.default_rng(seed)
    shapes = AutoencoderSpec(hidden=hidden).shapes(dim)
    return [
        Registration(
            i,
            i,
            {
                k: rng.standard_normal(s, dtype=np.float32) * np.float32(WEIGHT_SCALE)
                for k, s in shapes.items()
            },
            RANDOM_MU,
            RANDOM_SIGMA,
            RANDOM_EXAMPLES,
        )
        for i in range(n_models)
    ]


def _compile_s() -> float:
    kernel = native.load()
    return kernel.build_seconds if kernel is not None else 0.0


def label(flt: GlobalFilter) -> str:
    """The kernel of a filter as the table shows it (``bf16 (emulated)`` without the CPU's)."""
    return f"{flt.kernel} (emulated)" if flt.bf16_emulated else flt.kernel


def batch_images(n_models: int, images: int) -> int:
    """Images of the batch of a row of ``n_models`` autoencoders (fewer for many of them)."""
    if n_models <= FULL_BATCH_UP_TO:
        return images
    return min(images, max(MIN_BIG_IMAGES, images * FULL_BATCH_UP_TO // n_models))


def measure(
    regs: list[Registration],
    scoring: ScoringConfig,
    x: torch.Tensor,
    settings: BenchFilterSettings,
    gemm_runs: list[float],
    reference: torch.Tensor | None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """One row of the table: build, throughput, batch and one-image latency, memory."""
    n, dim, hidden = len(regs), regs[0].params["encoder.weight"].shape[1], settings.hidden
    with PeakRss() as build_mem:
        start = time.perf_counter()
        flt = GlobalFilter(regs, scoring)
        build_s = time.perf_counter() - start
    images = x[: batch_images(n, x.shape[0])]
    with PeakRss() as score_mem:
        seconds = best_time(lambda: flt.scores(images), settings.repeats)
    scores = flt.scores(images)
    latency = one_image_latency(flt, x, settings.latency_reps, settings.latency_budget)
    gemm_runs.append(gemm_gflops(settings.gemm_size))
    ips = images.shape[0] / seconds
    gflops = ips * FLOPS_PER_DM * dim * hidden * n / 1e9
    row: dict[str, Any] = {
        "dim": dim,
        "hidden": hidden,
        "autoencoders": n,
        "kernel": flt.kernel,
        "label": label(flt),
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
    if n <= settings.naive_max and flt.kernel != "bf16":
        loop_s = best_time(lambda: reference_scores(regs, images), 1)
        row["naive_loop_images_per_second"] = images.shape[0] / loop_s
    return row, scores


@contextmanager
def temporary_key() -> Iterator[Path]:
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


def measure_load(regs: list[Registration], scoring: ScoringConfig) -> dict[str, Any]:
    """Time a save of ``regs``, a verified load, the filter build, and one more user.

    The last is ``PersistentFilter.register``: a save that rewrites the filter's metadata.
    """
    from docl_flower.core.filter.store import PersistentFilter, save_filter, segment_files

    n, dim = len(regs), regs[0].params["encoder.weight"].shape[1]
    info = {"config": {"bench": "bench_filter.py"}}
    with temporary_key() as tmp:
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
    sets: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {
        "test": (exp.features(images), torch.as_tensor(labels))
    }
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
            xc, AutoencoderSpec(), TrainSpec(epochs=epochs, batch_size=QUICK_BATCH), c
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
        "alpha": PAPER_ALPHA,
        "sided": PAPER_SIDED,
    }


def decision_check(settings: BenchFilterSettings) -> dict[str, Any]:
    """bfloat16 vs float32 decisions on the MNIST and Fashion-MNIST test images."""
    run = settings.agreement_run or _newest_run()
    setup = _from_run(run) if run is not None else _quick_trained(settings.agreement_epochs)
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
        "kernel": label(variants["pure"]),
        "refinement": {
            "bf16_margin": variants["refined"].scoring.bf16_margin,
            "refine_alpha": variants["refined"].scoring.refine_alpha,
        },
        "alpha": setup["alpha"],
        "sided": setup["sided"],
        "autoencoders": len(regs),
        "results": results,
    }


# ------------------------------------------------------------------------------- the run
def load_kernel(settings: BenchFilterSettings) -> float | None:
    """Load (or compile, ``cold_build``: in a fresh cache) the native kernel; its seconds.

    None when the float32 rows use the torch kernel anyway.
    """
    if settings.scoring().kernel == "torch":
        return None
    if settings.cold_build:
        os.environ["DOCL_FLOWER_CACHE"] = tempfile.mkdtemp(prefix="docl-bench-")
    start = time.perf_counter()
    native.load()
    return time.perf_counter() - start


def run_bench(settings: BenchFilterSettings) -> dict[str, Any]:
    """Measure every row; the JSON payload (written by the caller, see :func:`write`)."""
    scoring = settings.scoring()
    build_s = load_kernel(settings)
    info = machine()
    started = time.perf_counter()
    gemm_runs = [gemm_gflops(settings.gemm_size)]
    with_bf16 = not settings.no_bf16 and native.load() is not None
    load_sizes = settings.sizes if settings.load_sizes is None else settings.load_sizes
    rows, loads, auto = [], [], {}
    for dim in settings.dims:
        x = torch.rand(settings.images, dim, generator=torch.Generator().manual_seed(dim))
        auto[str(dim)] = {
            "bf16_instructions": bf16_available(),
            "picks": "bf16" if prefer_bf16(dim, settings.hidden) else "native",
        }
        for n in settings.sizes:
            regs = make_registrations(n, dim, settings.hidden)
            row, ref = measure(regs, scoring, x, settings, gemm_runs, None)
            rows.append(row)
            if with_bf16:
                rows.append(measure(regs, settings.bf16_scoring(), x, settings, gemm_runs, ref)[0])
            del ref
            if not settings.no_load and n in load_sizes:
                loads.append(measure_load(regs, scoring))
            del regs
    gemm = max(gemm_runs)
    for r in rows:
        r["fraction_of_gemm"] = r["gflops"] / gemm
    checked = not settings.no_agreement and native.load() is not None
    agreement = decision_check(settings) if checked else None
    info["load_average_end"] = load_average()
    info["max_rss_bytes"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )  # KiB on Linux
    return {
        "machine": info,
        "seconds": time.perf_counter() - started,
        "gemm_gflops": gemm,
        "gemm_gflops_runs": gemm_runs,
        "scoring": asdict(scoring),
        "kernel": sorted({str(r["label"]) for r in rows}),
        "auto": auto,
        "native_load_seconds": build_s,
        "native_compile_seconds": _compile_s() if build_s is not None else None,
        "dims": list(settings.dims),
        "hidden": settings.hidden,
        "sizes": list(settings.sizes),
        "rows": rows,
        "load": loads,
        "agreement": agreement,
    }


def write(payload: dict[str, Any], path: Path) -> None:
    """The payload as JSON (non-finite floats as text)."""
    write_json(path, payload)


# ------------------------------------------------------------------------------- the tables
def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f}" if s < 1 else f"{s * 1e3:.0f}"


def yes(flag: bool) -> str:
    """A table cell for a flag."""
    return "yes" if flag else "no"


def header(payload: dict[str, Any], gemm_size: int) -> list[str]:
    """The lines about the machine, the GEMM yardstick and the kernels."""
    info, scoring = payload["machine"], payload["scoring"]
    start, end = info["load_average_start"], info["load_average_end"]
    lines = []
    if scoring["kernel"] != "torch" and not any(
        k.startswith(("native", "bf16")) for k in payload["kernel"]
    ):
        lines.append(
            "native kernel unavailable (it needs AVX-512 and a C++ compiler): scoring with the "
            "torch kernel, no bfloat16 rows, no decision check (see the warning)"
        )
    lines += [
        f"machine: {info['cpu']}, {info['cores']} cores, {_mb(info['memory_bytes'])} MiB, "
        f"{info['torch_threads']} torch threads, GPU: {info['gpu'] or 'none'}",
        "CPU flags: "
        + ", ".join(f"{f} {yes(v)}" for f, v in info["flags"].items())
        + f"; bf16 kernel on instructions: {yes(info['bf16_kernel_on_instructions'])}",
        f"load average (1/5/15 min) at start {start[0]:.1f}/{start[1]:.1f}/{start[2]:.1f}, "
        f"at end {end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f}",
        f"float32 GEMM ({gemm_size}^3, torch.mm): {payload['gemm_gflops']:.1f} GFLOP/s (best of "
        f"{', '.join(f'{g:.0f}' for g in payload['gemm_gflops_runs'])}: before, between and "
        "after the scoring)",
        f"kernels: {', '.join(payload['kernel'])} (asked: {scoring['kernel']}); chunks: "
        f"{scoring['chunk_images']} images x {scoring['chunk_models']} autoencoders, "
        f"M={payload['hidden']}; kernel=auto picks: "
        + ", ".join(f"D={d}: {a['picks']}" for d, a in payload["auto"].items())
        + ("" if info["bf16_instructions"] else " (this CPU reports no avx512_bf16)"),
    ]
    if payload["native_load_seconds"] is not None:
        lines.append(
            f"native kernel load: {payload['native_load_seconds']:.2f} s "
            f"(of which compiling: {payload['native_compile_seconds']:.2f} s)"
        )
    return lines


def rows_table(rows: Sequence[dict[str, Any]]) -> str:
    """Throughput, latency and memory of every row."""
    head = [
        "D",
        "autoencoders",
        "kernel",
        "filter MiB",
        "images",
        "batch s",
        "images/s",
        "GFLOP/s",
        "of GEMM (adjacent)",
        "1 image p50 ms",
        "1 image p99 ms",
        "peak RSS MiB (scoring temporaries)",
        "naive loop images/s",
    ]
    cells = []
    for r in rows:
        lat, naive = r["latency_1"], r["naive_loop_images_per_second"]
        cells.append(
            [
                str(r["dim"]),
                str(r["autoencoders"]),
                r["label"],
                _mb(r["filter_bytes"]),
                str(r["images"]),
                f"{r['seconds']:.3f}",
                f"{r['images_per_second']:.0f}",
                f"{r['gflops']:.1f}",
                f"{r['fraction_of_gemm']:.2f} ({r['fraction_of_adjacent_gemm']:.2f})",
                _ms(lat["p50_s"]),
                _ms(lat["p99_s"]),
                f"{_mb(r['peak_rss_scoring_bytes'])} ({_mb(r['scoring_temporary_bytes'])})",
                "-" if naive is None else f"{naive:.0f}",
            ]
        )
    return markdown_table(head, cells)


def load_table(loads: Sequence[dict[str, Any]]) -> str:
    """Saving and loading filters through the store."""
    head = [
        "D",
        "autoencoders",
        "file MiB",
        "save s",
        "load s",
        "filter build s",
        f"+1 user ms (median / max of {REGISTER_REPEATS})",
        "peak RSS MiB",
    ]
    cells = [
        [
            str(r["dim"]),
            str(r["autoencoders"]),
            _mb(r["file_bytes"]),
            f"{r['save_seconds']:.2f}",
            f"{r['load_seconds']:.2f}",
            f"{r['filter_build_seconds']:.2f}",
            f"{_ms(r['register_seconds_median'])} / {_ms(r['register_seconds_max'])}",
            _mb(r["peak_rss_bytes"]),
        ]
        for r in loads
    ]
    return markdown_table(head, cells)


def agreement_table(agreement: dict[str, Any]) -> str:
    """How often bfloat16 decides as float32, per image set, variant and uploader."""
    refine = agreement["refinement"]
    intro = (
        f"Decisions, {agreement['kernel']} vs float32 ({agreement['source']}; "
        f"{agreement['autoencoders']} autoencoders; Guards at alpha {agreement['alpha']}, "
        f"{agreement['sided']}-sided; refined: entries within {refine['bf16_margin']:.0%} of "
        f"the best score or of mu + {refine['refine_alpha']} sigma scored again in float32):"
    )
    guard_keys = [k for k in agreement["results"][0] if k.startswith("guard:")]
    head = [
        "images",
        "bf16",
        "uploader",
        "n",
        "argmin",
        *(f"{k.removeprefix('guard:')} Guard" for k in guard_keys),
        "max rel. score difference",
        "scoring s (float32 / bf16)",
    ]
    cells = []
    for r in agreement["results"]:
        sec = r["scoring_seconds"]
        cells.append(
            [
                r["set"],
                r["bf16"],
                r["uploader"],
                str(int(r["images"])),
                f"{r['argmin']:.5f}",
                *(f"{r[k]:.5f}" for k in guard_keys),
                f"{r['max_relative_difference']:.2e}",
                f"{sec['float32']:.2f} / {sec[r['bf16']]:.2f}",
            ]
        )
    return intro + "\n" + markdown_table(head, cells)


def render(payload: dict[str, Any], gemm_size: int) -> str:
    """The printed report of a payload: the machine, then each table."""
    parts = ["\n".join(header(payload, gemm_size)), rows_table(payload["rows"])]
    if payload["load"]:
        parts.append(
            "Saved filter (store API; load = SHA-256 + HMAC + content hashes):\n"
            + load_table(payload["load"])
        )
    if payload["agreement"] is not None:
        parts.append(agreement_table(payload["agreement"]))
    return "\n\n".join(parts)
