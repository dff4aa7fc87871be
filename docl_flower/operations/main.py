"""Hydra entry point (``docl-flower``): resolve the config, launch the Flower run, report."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from docl_flower.core.common.files import file_stamp
from docl_flower.core.evaluation.results import RESULTS_FILE, RunResult, read_results, write_results
from docl_flower.core.pipeline.config import PROJECT_ROOT, Experiment, check_train_recipe
from docl_flower.core.pipeline.preflight import check_data, check_memory
from docl_flower.core.pipeline.resources import SimulationSpec

from ..federation import keys
from ..federation.components import build_experiment
from ..federation.strategy import format_users, group_failures
from ..federation.workflows.docl import Docl
from .processes import exit_on_signals
from .simulation import FlowerRunError, run_app

log = logging.getLogger(__name__)


def format_table(results: RunResult) -> str:
    """The short table printed at the end of a run."""
    r = results
    rows = [("method", r.method), ("overall accuracy", f"{r.overall_accuracy:.4f}")]
    if r.guarded_accuracy is not None:
        rows.append((f"guarded accuracy (alpha={r.alpha})", f"{r.guarded_accuracy:.4f}"))
    if r.acceptance_rate is not None:
        rows.append(("acceptance rate (harmless images)", f"{r.acceptance_rate:.4f}"))
    if r.ood_auroc is not None:
        rows.append(("OOD AUROC (best score)", f"{r.ood_auroc:.4f}"))
    if r.owner_accuracy is not None:
        rows.append(("owner accuracy", f"{r.owner_accuracy:.4f}"))
    if r.owner_guarded_accuracy is not None:
        rows.append(("owner guarded accuracy", f"{r.owner_guarded_accuracy:.4f}"))
    if r.dp:
        spent = max(v["epsilon"] for v in r.dp.values())
        delta = max(v["delta"] for v in r.dp.values())
        rows.append(("DP epsilon, delta (max over users)", f"{spent:.3f}, {delta:.2g}"))
    if r.sampled_classifier_accuracy is not None:
        rows.append(("sampled-feature classifier accuracy", f"{r.sampled_classifier_accuracy:.4f}"))
    rows.append(("rounds", f"{r.rounds}"))
    rows.append(("max bytes downloaded per user", f"{max(r.bytes_downloaded.values(), default=0)}"))
    rows.append(("registered users", f"{len(r.registered)}"))
    rows.append(("failed users", f"{len(r.failed)}"))
    wall = r.wall_seconds if r.wall_seconds is not None else float("nan")
    rows.append(("wall seconds", f"{wall:.1f}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    per_class = r.per_class_accuracy
    lines.append("per-class accuracy: " + "  ".join(f"{k}:{v:.3f}" for k, v in per_class.items()))
    failed = {int(u): reason for u, reason in r.failed.items()}
    for reason, users in group_failures(failed).items():
        lines.append(f"failed {format_users(users)}: {reason}")
    return "\n".join(lines)


def check_resources(num_gpus: float, cuda_available: bool | None = None) -> None:
    """Refuse GPU client resources on a machine without CUDA (Ray would fail obscurely)."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if num_gpus > 0 and not cuda_available:
        raise ValueError(
            f"simulation.num_gpus={num_gpus} but this machine has no CUDA device; "
            "use simulation=cpu (Ray cannot place GPU clients here)"
        )


#: Messages waiting in the SuperLink per client that the simulation runs at a time.
MESSAGES_PER_CLIENT_SLOT = 4
#: The window on a Ray cluster joined by address, whose CPUs this machine does not know.
CLUSTER_SEND_WINDOW = 64


def send_window(simulation: SimulationSpec, cpus: int | None = None) -> int:
    """How many messages may wait in the SuperLink of a simulation (see ``SimulationGrid``).

    ``simulation.send_window`` when set (0: no window); else enough for every client slot
    (CPUs / ``num_cpus`` of this machine) to find its next message waiting, or
    :data:`CLUSTER_SEND_WINDOW` on a Ray cluster joined by address.
    """
    if simulation.send_window is not None:
        return simulation.send_window
    joined = simulation.ray_address not in (None, "local") or (
        simulation.ray_address is None and bool(os.environ.get("RAY_ADDRESS"))
    )
    if joined:
        return CLUSTER_SEND_WINDOW
    slots = max(1, int((cpus or os.cpu_count() or 1) // simulation.num_cpus))
    return MESSAGES_PER_CLIENT_SLOT * slots


def clients_at_once(exp: Experiment, cpus: int | None = None) -> int:
    """How many clients this machine trains at once (Ray's slots, at most one per user)."""
    slots = max(1, int((cpus or os.cpu_count() or 1) // exp.simulation.num_cpus))
    return min(slots, len(exp.assignment))


class ResultsOfRun:
    """``done`` check for :func:`~.simulation.run_app`: ``path`` holds this run's results.

    The ServerApp writes ``results.json`` atomically as its last step, with the Flower run
    id; a file left by an earlier run in the same folder does not count. The file is read
    again only when it changed (the check runs every 0.1 s).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None

    def __call__(self, run_id: int) -> bool:
        """Whether the results file now holds the results of run ``run_id``."""
        try:
            stamp = file_stamp(self.path)
        except OSError:  # unreadable for now: not this run's results yet
            return False
        if stamp is None or stamp == self._seen:
            return False
        self._seen = stamp
        try:
            return read_results(self.path).flower_run_id == run_id
        except ValueError:  # being replaced, or not a results file: not this run's
            return False


def run_experiment(cfg: DictConfig, out_dir: Path) -> RunResult:
    """Validate ``cfg``, run it through ``flwr run``, and return the results."""
    start = time.time()
    # Fail fast on a bad config, before Flower starts. Building the recipe's optimiser takes
    # 1-2 s (torch imports its compiler on the first one): that check runs while the
    # SuperLink and the Ray head boot, and a bad recipe stops them before any run starts.
    exp = build_experiment(cfg, check_recipe=False)
    check_resources(exp.simulation.num_gpus)
    check_data(exp)
    check_memory(exp, clients_at_once(exp))
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "experiment.yaml"
    OmegaConf.save(cfg, config_path, resolve=True)
    checked = hashlib.sha256(config_path.read_bytes()).hexdigest()
    # One writer per filter (core/filter/lock.py): a second run on this run's filter folder stops
    # here in one line, before any Flower or Ray process starts, or waits for the first
    # (strategy.lock_wait_s). The lock is held until run_app has stopped them all; the
    # ServerApp takes the folder's writer lock itself (this process cannot hold it for it).
    workflow = exp.workflow
    with workflow.run_lock(out_dir) if isinstance(workflow, Docl) else nullcontext():
        run_app(
            app_dir=PROJECT_ROOT,
            flwr_home=PROJECT_ROOT / ".flwr",
            run_config={
                keys.RUN_CONFIG_PATH: str(config_path),
                keys.RUN_CONFIG_CHECKED: checked,
                keys.RUN_OUT_DIR: str(out_dir),
                keys.RUN_SEND_WINDOW: send_window(exp.simulation),
            },
            federation_config={
                "num-supernodes": len(exp.assignment),
                "client-resources-num-cpus": exp.simulation.num_cpus,
                "client-resources-num-gpus": exp.simulation.num_gpus,
            },
            timeout_s=float(cfg.run_timeout_s),
            ray_address=exp.simulation.ray_address,
            preflight=lambda: check_train_recipe(exp),
            done=ResultsOfRun(out_dir / RESULTS_FILE),
            last_line=lambda line: keys.RESULTS_LOGGED in line,
        )
    results_path = out_dir / RESULTS_FILE
    if not results_path.is_file():
        raise FlowerRunError(f"the run completed but wrote no {results_path}")
    results = read_results(results_path)
    results.wall_seconds = time.time() - start
    write_results(results_path, results)
    return results


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    """Run one experiment in the Hydra run directory; return the overall accuracy."""
    out_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    try:
        results = run_experiment(cfg, out_dir)
    except FlowerRunError as err:
        log.error("run failed: %s", err)
        raise SystemExit(f"docl-flower: {err}") from err
    except ValueError as err:  # a bad config (found before Flower starts): one line
        raise SystemExit("docl-flower: " + " ".join(str(err).split())) from None
    print(format_table(results))
    print(f"results: {out_dir / RESULTS_FILE}")
    return results.overall_accuracy


def cli() -> None:
    """Console script ``docl-flower``: Hydra overrides, ``filter check`` or ``filter serve``.

    SIGINT, SIGTERM and SIGHUP stop every process the command started (SuperLink, ``flwr
    run``, the simulation, Ray) and exit with status 128 + the signal's number (130, 143, 129);
    if the command is killed (SIGKILL), its watchdog stops them. ``filter serve`` handles
    SIGINT and SIGTERM itself: it answers the requests in flight and exits 0.
    """
    if sys.argv[1:3] == ["filter", "serve"]:
        from .serve import main as serve_main

        sys.exit(serve_main(sys.argv[3:]))
    with exit_on_signals():
        if sys.argv[1:3] == ["filter", "check"]:
            from .check import main as check_main

            sys.exit(check_main(sys.argv[3:]))
        hydra_main()
    sys.exit(0)
