"""Scale: DOCL with 10, 100 and 1,000 simulated users through Flower and Ray, next to a plain loop.

For each size the same experiment runs twice:

1. ``docl-flower`` (a Flower simulation on Ray, in a subprocess started by
   :func:`~docl_flower.operations.runs.launch_measured`): wall time, peak memory of the whole
   process tree (SuperLink, simulation, Ray daemons and workers; RSS and PSS sums), bytes
   uploaded and downloaded, class and owner accuracy, and where the ServerApp's time went
   (``phase_seconds`` of ``results.json``);
2. the plain PyTorch loop of :mod:`docl_flower.core.pipeline.plain`: the same users, data rows,
   recipe and seeds in a pool of as many worker processes as the simulation runs clients at
   once, then the same filter and evaluation. It checks that both trained the same
   autoencoders (largest difference of ``mu`` and of any parameter).

Sizes use ``partition=users_per_class`` with ``class_shards=100``: every user holds one
hundredth of a class (about 60 MNIST images) whatever the number of users, so the time per
user is comparable; the recipe is ``train=scale``. The last rows run the default experiment
(10 users, one class each, default recipe) both ways, ``default_repeats`` times (3), each
Flower run next to its own plain run: this machine's speed drifts by 5-15% over minutes, so
the target for that row is judged on the median of the paired ratios (every run is shown).

Writes ``OUT/bench_scale.json`` and ``OUT/summary.md``. Targets (issue #11): 1,000 users in
under 30 min and 8 GiB; time per user at 1,000 within 1.5x of that at 10; Flower / plain
<= 1.3 at 10 users (default recipe) and <= 1.5 at 1,000.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from docl_flower.core.evaluation.results import RunResult
from docl_flower.core.pipeline.plain import PlainRun
from docl_flower.experiments.launch import cpu_model, load_average
from docl_flower.experiments.tables import fmt, markdown_table, write_json
from docl_flower.operations.runs import TreeUsage, launch_measured

GIB = 1024**3
#: MNIST's classes: the many-users rows hold ``users / CLASSES`` users per class.
CLASSES = 10
#: The row of the default experiment (and ``default-10 #2`` and on for its repeats).
DEFAULT_ROW = "default-10"
#: Targets of issue #11.
TARGETS = {
    "max_minutes_1000": 30.0,  # 1,000 users in under half an hour
    "max_peak_gib": 8.0,  # ... and within the memory of a laptop
    "max_time_per_user_ratio": 1.5,  # s/user at 1,000 within 1.5x of that at 10
    "max_overhead_default_10": 1.3,  # Flower / plain, default experiment
    "max_overhead_1000": 1.5,  # Flower / plain, 1,000 users
}
JSON_FILE = "bench_scale.json"
SUMMARY_FILE = "summary.md"


class ScaleError(RuntimeError):
    """A setting or a run that the benchmark cannot measure."""


@dataclass(frozen=True)
class ScaleSettings:
    """What ``make scale`` measures (the command line of ``scripts/bench_scale.py``)."""

    #: Users of the many-users rows (none: only the default-recipe rows).
    users: Sequence[int] = (10, 100, 1000)
    #: Each user holds ``1 / class_shards`` of a class: 100 -> about 60 MNIST images.
    class_shards: int = 100
    out: Path = Path("scale")
    #: Reuse finished Flower runs (their ``results.json`` and ``memory.json``).
    reuse: bool = False
    #: Flower runs only.
    skip_plain: bool = False
    #: Skip the default-recipe rows.
    no_default: bool = False
    #: Paired runs (Flower, then plain) of the default experiment; judged on the median.
    default_repeats: int = 3
    #: More Hydra overrides, every run.
    extra: Sequence[str] = ()


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "avx512f": "avx512f" in flags,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_start": load_average(2),
    }


def size_overrides(users: int, shards: int, extra: Sequence[str]) -> list[str]:
    """Overrides of a run of ``users`` users of one ``1/shards`` of a class each."""
    if users % CLASSES or users // CLASSES > shards:
        raise ScaleError(
            f"--users {users}: need a multiple of {CLASSES}, at most {CLASSES} * {shards}"
        )
    return [
        "partition=users_per_class",
        f"partition.users_per_class={users // CLASSES}",
        f"partition.class_shards={shards}",
        "train=scale",
        *extra,
    ]


def flower_figures(
    name: str, overrides: Sequence[str], result: RunResult, usage: TreeUsage
) -> dict[str, Any]:
    """The Flower half of a row, from the run's results and its process tree's figures."""
    if result.already_registered:
        skipped = len(result.already_registered)
        raise ScaleError(f"{name}: {skipped} users were already registered (nothing timed)")
    users = len(result.registered)
    wall = float(result.wall_seconds or usage.measured_wall_seconds)
    phases = result.phase_seconds
    # The command's time before the ServerApp sent its first message: startup outside the
    # ServerApp (wall - server) plus its own setup and the wait for the nodes.
    before_first_message = (
        wall - float(result.server_seconds or 0.0) + phases["setup"] + phases["wait_for_nodes"]
    )
    return {
        "name": name,
        "overrides": list(overrides),
        "users": users,
        "failed": len(result.failed),
        "flower_wall_seconds": wall,
        "flower_seconds_per_user": wall / max(users, 1),
        "peak_rss_gib": usage.peak_rss_bytes / GIB,
        "peak_pss_gib": usage.peak_pss_bytes / GIB,
        "peak_processes": usage.peak_processes,
        "bytes_uploaded_per_user": float(np.mean(list(result.bytes_uploaded.values()))),
        "bytes_downloaded_total": int(sum(result.bytes_downloaded.values())),
        "class_accuracy": result.overall_accuracy,
        "owner_accuracy": result.owner_accuracy,
        "guarded_accuracy": result.guarded_accuracy,
        "acceptance_rate": result.acceptance_rate,
        "flower_breakdown": {
            "before_first_message": before_first_message,
            "registration": phases["registration"],
            "server_handling": phases["server_handling"],
            "evaluation": phases["evaluation"],
            "client_train_seconds_sum": float(sum(result.train_seconds.values())),
        },
    }


def plain_figures(
    flower: dict[str, Any], plain: PlainRun, peak_pss_bytes: int, differences: dict[str, float]
) -> dict[str, Any]:
    """The plain half of a row, next to its Flower half ``flower``."""
    training = plain.phase_seconds["training"]
    users = max(int(flower["users"]), 1)
    return {
        "plain_seconds": plain.phase_seconds["total"],
        "plain_workers": plain.workers,
        "plain_peak_pss_gib": peak_pss_bytes / GIB,
        "plain_breakdown": plain.phase_seconds,
        "plain_class_accuracy": plain.evaluation.overall_accuracy,
        "overhead_ratio": flower["flower_wall_seconds"] / plain.phase_seconds["total"],
        # Registration time not explained by training at the same concurrency, per user.
        "per_message_overhead_seconds": (flower["flower_breakdown"]["registration"] - training)
        / users,
        **differences,
    }


def same_models(run_dir: Path, plain: PlainRun) -> dict[str, float]:
    """Largest differences between the Flower run's saved autoencoders and the plain loop's."""
    from docl_flower.core.filter.store import load_filter

    saved, _ = load_filter(run_dir / "filter")
    flower = {(r.user_id, r.label): r for r in saved}
    d_mu = d_param = 0.0
    for reg in plain.registrations:
        other = flower[(reg.user_id, reg.label)]
        d_mu = max(d_mu, abs(reg.err_mean - other.err_mean))
        for name, value in reg.params.items():
            d_param = max(d_param, float(np.max(np.abs(value - other.params[name]))))
    return {"max_abs_mu_difference": d_mu, "max_abs_parameter_difference": d_param}


def measure_row(
    name: str, overrides: Sequence[str], settings: ScaleSettings, folder: str | None = None
) -> dict[str, Any]:
    """Run one configuration both ways (Flower in ``OUT/folder``) and return its figures."""
    run_dir = settings.out / (folder or name)
    result, usage = launch_measured(overrides, run_dir, settings.reuse)
    row = flower_figures(name, overrides, result, usage)
    if settings.skip_plain:
        return row
    from docl_flower.core.pipeline.config import compose_config
    from docl_flower.core.pipeline.plain import run_plain
    from docl_flower.federation.components import build_experiment
    from docl_flower.operations.memory import TreeMemory

    exp = build_experiment(compose_config(list(overrides)))
    memory = TreeMemory(os.getpid()).start()
    plain = run_plain(exp)
    memory.stop()
    row.update(plain_figures(row, plain, memory.peak_pss, same_models(run_dir, plain)))
    return row


# ------------------------------------------------------------------ the report

TABLE_HEADER = [
    "run",
    "users",
    "Flower wall s",
    "s/user",
    "plain s",
    "Flower/plain",
    "peak RSS GiB",
    "peak PSS GiB",
    "up B/user",
    "down B",
    "class acc",
    "owner acc",
    "start s",
    "reg s",
    "server s",
    "eval s",
    "msg overhead s",
    "max d(mu)",
]


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table of the measured rows (a plain run's columns ``-`` when skipped)."""
    cells = []
    for r in rows:
        b = r["flower_breakdown"]
        cells.append(
            [
                r["name"],
                str(r["users"]),
                fmt(r["flower_wall_seconds"], ".1f"),
                fmt(r["flower_seconds_per_user"], ".3f"),
                fmt(r.get("plain_seconds"), ".1f"),
                fmt(r.get("overhead_ratio"), ".2f"),
                fmt(r["peak_rss_gib"], ".2f"),
                fmt(r["peak_pss_gib"], ".2f"),
                fmt(r["bytes_uploaded_per_user"], ".0f"),
                str(r["bytes_downloaded_total"]),
                fmt(r["class_accuracy"], ".4f"),
                fmt(r["owner_accuracy"], ".4f"),
                fmt(b["before_first_message"], ".1f"),
                fmt(b["registration"], ".1f"),
                fmt(b["server_handling"], ".1f"),
                fmt(b["evaluation"], ".1f"),
                fmt(r.get("per_message_overhead_seconds"), ".3f"),
                fmt(r.get("max_abs_mu_difference"), ".2g"),
            ]
        )
    return markdown_table(TABLE_HEADER, cells)


def is_default(row: dict[str, Any]) -> bool:
    """A row of the default experiment (``default-10``, or ``default-10 #2`` and on)."""
    return str(row["name"]).split(" #")[0] == DEFAULT_ROW


def verdicts(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each target of the issue that these rows measure: value, limit, whether it holds."""
    by = {r["name"]: r for r in rows}
    measured: dict[str, tuple[float, float]] = {}
    big, small = by.get("users-1000"), by.get("users-10")
    if big:
        measured["1000 users: wall minutes"] = (
            big["flower_wall_seconds"] / 60,
            TARGETS["max_minutes_1000"],
        )
        measured["1000 users: peak memory GiB (PSS)"] = (
            big["peak_pss_gib"],
            TARGETS["max_peak_gib"],
        )
        if "overhead_ratio" in big:
            measured["1000 users: Flower / plain"] = (
                big["overhead_ratio"],
                TARGETS["max_overhead_1000"],
            )
        if small:
            measured["s/user at 1000 / s/user at 10"] = (
                big["flower_seconds_per_user"] / small["flower_seconds_per_user"],
                TARGETS["max_time_per_user_ratio"],
            )
    defaults = [r["overhead_ratio"] for r in rows if is_default(r) and "overhead_ratio" in r]
    if defaults:
        name = "10 users, default recipe: Flower / plain"
        if len(defaults) > 1:
            spread = f"{min(defaults):.2f}-{max(defaults):.2f}"
            name += f" (median of {len(defaults)} paired runs: {spread})"
        measured[name] = (float(np.median(defaults)), TARGETS["max_overhead_default_10"])
    return {
        k: {"value": v, "limit": limit, "holds": v <= limit} for k, (v, limit) in measured.items()
    }


def summary(report: dict[str, Any]) -> str:
    """``summary.md``: the machine, the table and the targets of a report."""
    info, checks = report["machine"], report["targets"]
    lines = [
        "# Scale benchmark (`make scale`)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, "
        f"GPU: {info['gpu'] or 'none'}; load average {info['load_average_start']} at the "
        f"start, {info['load_average_end']} at the end.",
        "",
        table(report["rows"]),
        "",
        "| target | measured | limit | holds |",
        "|---|---|---|---|",
        *(
            f"| {k} | {v['value']:.3f} | {v['limit']} | {'yes' if v['holds'] else 'NO'} |"
            for k, v in checks.items()
        ),
    ]
    return "\n".join(lines) + "\n"


def plan(settings: ScaleSettings) -> list[tuple[str, list[str], str]]:
    """The rows to run, in order: (name, overrides, run folder)."""
    if settings.default_repeats < 1:
        raise ScaleError("--default-repeats: at least 1")
    rows = [
        (f"users-{n}", size_overrides(n, settings.class_shards, settings.extra), f"users-{n}")
        for n in settings.users
    ]
    for i in range(0 if settings.no_default else settings.default_repeats):
        name = DEFAULT_ROW + (f" #{i + 1}" if i else "")
        folder = DEFAULT_ROW + (f"-{i + 1}" if i else "")
        rows.append((name, list(settings.extra), folder))
    return rows


def run_scale(
    settings: ScaleSettings,
    progress: Callable[[str], None] = print,
    measure: Callable[..., dict[str, Any]] = measure_row,
) -> dict[str, Any]:
    """Measure every row, write ``bench_scale.json`` and ``summary.md``; return the report.

    ``progress`` gets the table after each row; ``measure`` measures one row (the tests give
    one that returns made-up figures).
    """
    todo = plan(settings)  # every setting checked before the first run
    info = machine()
    rows: list[dict[str, Any]] = []
    for name, overrides, folder in todo:
        rows.append(measure(name, overrides, settings, folder))
        progress(table(rows))
    info["load_average_end"] = load_average(2)
    report = {"machine": info, "rows": rows, "targets": verdicts(rows)}
    settings.out.mkdir(parents=True, exist_ok=True)
    write_json(settings.out / JSON_FILE, report)
    text = summary(report)
    (settings.out / SUMMARY_FILE).write_text(text)
    return report
