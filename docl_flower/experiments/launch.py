"""Launch-and-measure helpers shared by the experiments: the machine, the local deployment demo.

Runs of ``docl-flower`` start through :mod:`docl_flower.operations.runs` (``launch``, and
``launch_measured`` for a run whose process tree's memory is sampled); this module adds what
the benchmarks record next to their figures (:func:`cpu_model`, :func:`load_average`) and the
real local deployment of ``scripts/deploy_demo.py`` (:func:`deploy_demo`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docl_flower.core.evaluation.results import RESULTS_FILE, read_results, write_results
from docl_flower.operations.runs import launch

from .tables import write_json

CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name (``unknown`` where ``/proc/cpuinfo`` is missing or has none)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def load_average(digits: int | None = None) -> list[float]:
    """The 1, 5 and 15 minute load averages (rounded to ``digits`` when given)."""
    values = list(os.getloadavg())
    return values if digits is None else [round(v, digits) for v in values]


# ------------------------------------------------------------------ runs per setting and seed
#: Runs ``docl-flower OVERRIDES`` into a folder (:func:`~docl_flower.operations.runs.launch`, or
#: a test's in-process stand-in).
Runner = Callable[[Sequence[str], Path], object]


def runs_per_seed(
    out: Path,
    names: Sequence[str],
    seeds: Sequence[int],
    overrides: Callable[[str, int], Sequence[str]],
    measure: Callable[[Path, int], list[dict[str, Any]]],
    results: str,
    runner: Runner | None = None,
    reuse: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Train (or reuse) one run per setting and seed in ``OUT/runs/NAME-seed-SEED``, measure it.

    ``measure(folder, seed)`` gives the run's rows; all rows so far are written to
    ``OUT/RESULTS`` after each run (a long experiment that stops keeps what it measured).
    """

    def default_runner(args: Sequence[str], folder: Path) -> object:
        return launch(args, folder, reuse=reuse, needs=("filter",))

    run = runner or default_runner
    found: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        found[name] = []
        for seed in seeds:
            folder = out / "runs" / f"{name}-seed-{seed}"
            run(list(overrides(name, seed)), folder)
            found[name] += measure(folder, seed)
            write_json(out / results, found)
    return found


# ------------------------------------------------------------------ the deployment demo


@dataclass(frozen=True)
class DeploySettings:
    """A local deployment: ``users`` SuperNodes and one SuperLink on 127.0.0.1."""

    #: The default experiment's users (one MNIST class each).
    users: int = 10
    out: Path = Path("deploy")
    #: No TLS, no SuperNode authentication (debugging only).
    insecure: bool = False
    #: Hydra overrides of the experiment.
    overrides: Sequence[str] = field(default_factory=tuple)


#: All SuperNodes share this machine's cores: one torch thread each unless the overrides say.
ONE_THREAD = "train.num_threads=1"


def demo_overrides(settings: DeploySettings) -> list[str]:
    """The experiment's overrides: the number of users, one torch thread, the user's own."""
    own = list(settings.overrides)
    threads = [] if any(o.startswith("train.num_threads") for o in own) else [ONE_THREAD]
    return [f"num_users={settings.users}", *threads, *own]


def deploy_demo(settings: DeploySettings) -> Path:
    """Start the deployment, run the experiment on it, print its table; stop it all.

    Returns the run's ``results.json`` (its ``wall_seconds``: the whole demo).
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from docl_flower.core.pipeline.config import PROJECT_ROOT
    from docl_flower.federation.components import build_experiment
    from docl_flower.operations.deploy import LocalDeployment
    from docl_flower.operations.main import format_table

    start_time = time.time()
    with LocalDeployment(settings.out, secure=not settings.insecure) as dep:
        with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=demo_overrides(settings))
        exp = build_experiment(cfg)
        root = getattr(exp.dataset, "root", None)  # every data set read from files has one
        if root is None:
            raise SystemExit(f"{type(exp.dataset).__name__}: no data folder to give the nodes")
        data_dir = str(Path(root))
        dep.start_superlink()
        for user in sorted(exp.assignment):
            dep.add_node(
                user,
                f"user-id={user} partition-id={user} num-partitions={settings.users} "
                f"data-dir='{data_dir}'",
            )
        if dep.secure:
            cfg.strategy.bindings_path = str(dep.write_bindings())
        run_dir = dep.out / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "experiment.yaml", resolve=True)
        run_id, status = dep.run(
            PROJECT_ROOT,
            f"config-path='{run_dir / 'experiment.yaml'}' out-dir='{run_dir}'",
            echo=True,
        )
        if status != "finished:completed":
            raise SystemExit(f"run {run_id} ended with status {status}; logs in {dep.out}")
        results = read_results(run_dir / RESULTS_FILE)
        results.wall_seconds = time.time() - start_time
        write_results(run_dir / RESULTS_FILE, results)
        print(format_table(results))
        print(f"results: {run_dir / RESULTS_FILE}")
        return run_dir / RESULTS_FILE
