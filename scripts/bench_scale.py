"""Scale: DOCL with 10, 100 and 1,000 simulated users through Flower and Ray, next to a plain loop.

For each size the same experiment runs twice:

1. ``docl-flower`` (a Flower simulation on Ray, in a subprocess): wall time, peak memory of the
   whole process tree (SuperLink, simulation, Ray daemons and workers; RSS and PSS sums
   sampled every 0.5 s), bytes uploaded and downloaded, class and owner accuracy, and where
   the ServerApp's time went (``phase_seconds`` of ``results.json``);
2. the plain PyTorch loop of :mod:`docl_flower.core.pipeline.plain`: the same users, data rows,
   recipe and seeds in a pool of as many worker processes as the simulation runs clients at
   once, then the same filter and evaluation. It checks that both trained the same
   autoencoders (largest difference of ``mu`` and of any parameter).

Sizes use ``partition=users_per_class`` with ``class_shards=100``: every user holds one
hundredth of a class (about 60 MNIST images) whatever the number of users, so the time per
user is comparable; the recipe is ``train=scale``. The last rows run the default experiment
(10 users, one class each, default recipe) both ways, ``--default-repeats`` times (3), each
Flower run next to its own plain run: this machine's speed drifts by 5-15% over minutes, so
the target for that row is judged on the median of the paired ratios (every run is shown).

Writes ``OUT/bench_scale.json`` and ``OUT/summary.md``; prints the table. Targets (issue #11):
1,000 users in under 30 min and 8 GiB; time per user at 1,000 within 1.5x of that at 10;
Flower / plain <= 1.3 at 10 users (default recipe) and <= 1.5 at 1,000.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from docl_flower.core.evaluation.results import RESULTS_FILE, RunResult, read_results
from docl_flower.core.filter.store import load_filter
from docl_flower.core.pipeline.config import compose_config
from docl_flower.core.pipeline.plain import PlainRun, run_plain
from docl_flower.federation.components import build_experiment
from docl_flower.operations.memory import TreeMemory

GIB = 1024**3
TARGETS = {
    "max_minutes_1000": 30.0,
    "max_peak_gib": 8.0,
    "max_time_per_user_ratio": 1.5,
    "max_overhead_default_10": 1.3,
    "max_overhead_1000": 1.5,
}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import torch

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "avx512f": "avx512f" in flags,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }


def size_overrides(users: int, shards: int, extra: list[str]) -> list[str]:
    """Overrides of a run of ``users`` users of one ``1/shards`` of a class each (10 classes)."""
    if users % 10 or users // 10 > shards:
        raise SystemExit(f"--users {users}: need a multiple of 10, at most 10 * {shards}")
    return [
        "partition=users_per_class",
        f"partition.users_per_class={users // 10}",
        f"partition.class_shards={shards}",
        "train=scale",
        *extra,
    ]


def fresh_run_dir(run_dir: Path) -> None:
    """An empty ``run_dir``: an earlier benchmark run there is removed.

    A run folder keeps its saved filter, and a run into it skips every user already
    registered there: it would time nothing. Only a folder that an earlier run wrote (its
    ``run.log``) is removed; any other non-empty folder is refused.
    """
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / "run.log").is_file():
            raise SystemExit(f"{run_dir} is not empty and holds no earlier benchmark run")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def run_flower(overrides: list[str], run_dir: Path, reuse: bool) -> tuple[RunResult, dict]:
    """One ``docl-flower`` run with its process tree's memory sampled."""
    memo = run_dir / "memory.json"
    if reuse and (run_dir / RESULTS_FILE).is_file() and memo.is_file():
        return read_results(run_dir / RESULTS_FILE), json.loads(memo.read_text())
    cmd = [str(Path(sys.executable).parent / "docl-flower"), *overrides, f"hydra.run.dir={run_dir}"]
    print("running:", " ".join(cmd), flush=True)
    fresh_run_dir(run_dir)
    start = time.time()
    with (run_dir / "run.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        memory = TreeMemory(proc.pid).start()
        code = proc.wait()
        memory.stop()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with code {code}; see {run_dir / 'run.log'}")
    mem = {
        "peak_rss_bytes": memory.peak_rss,
        "peak_pss_bytes": memory.peak_pss,
        "peak_processes": memory.peak_processes,
        "samples": memory.samples,
        "measured_wall_seconds": time.time() - start,
    }
    memo.write_text(json.dumps(mem, indent=2))
    return read_results(run_dir / RESULTS_FILE), mem


def same_models(run_dir: Path, plain: PlainRun) -> dict[str, float]:
    """Largest differences between the Flower run's saved autoencoders and the plain loop's."""
    saved, _ = load_filter(run_dir / "filter")
    flower = {(r.user_id, r.label): r for r in saved}
    d_mu = d_param = 0.0
    for reg in plain.registrations:
        other = flower[(reg.user_id, reg.label)]
        d_mu = max(d_mu, abs(reg.err_mean - other.err_mean))
        for name, value in reg.params.items():
            d_param = max(d_param, float(np.max(np.abs(value - other.params[name]))))
    return {"max_abs_mu_difference": d_mu, "max_abs_parameter_difference": d_param}


def row(
    name: str,
    overrides: list[str],
    out: Path,
    reuse: bool,
    skip_plain: bool,
    folder: str | None = None,
) -> dict[str, Any]:
    """Run one configuration both ways (Flower in ``out/folder``) and return its figures."""
    run_dir = out / (folder or name)
    result, mem = run_flower(overrides, run_dir, reuse)
    if result.already_registered:
        skipped = len(result.already_registered)
        raise SystemExit(f"{run_dir}: {skipped} users were already registered (nothing timed)")
    users = len(result.registered)
    wall = float(result.wall_seconds or mem["measured_wall_seconds"])
    phases = result.phase_seconds
    before_first_message = (
        wall - float(result.server_seconds or 0.0) + phases["setup"] + phases["wait_for_nodes"]
    )
    out_row: dict[str, Any] = {
        "name": name,
        "overrides": overrides,
        "users": users,
        "failed": len(result.failed),
        "flower_wall_seconds": wall,
        "flower_seconds_per_user": wall / max(users, 1),
        "peak_rss_gib": mem["peak_rss_bytes"] / GIB,
        "peak_pss_gib": mem["peak_pss_bytes"] / GIB,
        "peak_processes": mem["peak_processes"],
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
    if skip_plain:
        return out_row
    exp = build_experiment(compose_config(overrides))
    memory = TreeMemory(os.getpid()).start()
    plain = run_plain(exp)
    memory.stop()
    training = plain.phase_seconds["training"]
    out_row.update(
        {
            "plain_seconds": plain.phase_seconds["total"],
            "plain_workers": plain.workers,
            "plain_peak_pss_gib": memory.peak_pss / GIB,
            "plain_breakdown": plain.phase_seconds,
            "plain_class_accuracy": plain.evaluation.overall_accuracy,
            "overhead_ratio": wall / plain.phase_seconds["total"],
            # Registration time not explained by training at the same concurrency, per user.
            "per_message_overhead_seconds": (phases["registration"] - training) / max(users, 1),
            **same_models(run_dir, plain),
        }
    )
    return out_row


def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| run | users | Flower wall s | s/user | plain s | Flower/plain | peak RSS GiB | "
        "peak PSS GiB | up B/user | down B | class acc | owner acc | start s | reg s | "
        "server s | eval s | msg overhead s | max d(mu) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        b = r["flower_breakdown"]
        lines.append(
            "| "
            + " | ".join(
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
            + " |"
        )
    return "\n".join(lines)


def is_default(row: dict[str, Any]) -> bool:
    """A row of the default experiment (``default-10``, or ``default-10 #2`` and on)."""
    return str(row["name"]).split(" #")[0] == "default-10"


def verdicts(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--users",
        type=int,
        nargs="*",
        default=[10, 100, 1000],
        help="users of the many-users rows (none: only the default-recipe row)",
    )
    parser.add_argument("--class-shards", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("scale"))
    parser.add_argument("--reuse", action="store_true", help="reuse finished Flower runs")
    parser.add_argument("--skip-plain", action="store_true", help="Flower runs only")
    parser.add_argument("--no-default", action="store_true", help="skip the default-recipe row")
    parser.add_argument(
        "--default-repeats",
        type=int,
        default=3,
        help="paired runs (Flower, then plain) of the default experiment; judged on the median",
    )
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides, every run")
    args = parser.parse_args(argv)
    info = machine()
    rows = []
    for users in args.users:
        overrides = size_overrides(users, args.class_shards, args.extra)
        rows.append(row(f"users-{users}", overrides, args.out, args.reuse, args.skip_plain))
        print(table(rows), flush=True)
    if args.default_repeats < 1:
        raise SystemExit("--default-repeats: at least 1")
    for i in range(0 if args.no_default else args.default_repeats):
        name = "default-10" + (f" #{i + 1}" if i else "")
        folder = "default-10" + (f"-{i + 1}" if i else "")
        rows.append(row(name, list(args.extra), args.out, args.reuse, args.skip_plain, folder))
        print(table(rows), flush=True)
    info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    checks = verdicts(rows)
    report = {"machine": info, "rows": rows, "targets": checks}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_scale.json").write_text(json.dumps(report, indent=2, default=float))
    lines = [
        "# Scale benchmark (`make scale`)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, "
        f"GPU: {info['gpu'] or 'none'}; load average {info['load_average_start']} at the "
        f"start, {info['load_average_end']} at the end.",
        "",
        table(rows),
        "",
        "| target | measured | limit | holds |",
        "|---|---|---|---|",
        *(
            f"| {k} | {v['value']:.3f} | {v['limit']} | {'yes' if v['holds'] else 'NO'} |"
            for k, v in checks.items()
        ),
    ]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
