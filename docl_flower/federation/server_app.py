"""ServerApp: run the configured workflow (DOCL or a baseline) and write ``results.json``.

Two entry points reach it. ``docl-flower`` (Hydra on the command line) resolves the config,
saves it as YAML and passes its path in the run config (``config-path``). ``flwr run .`` (the
Flower way) passes no path: the ServerApp then composes the config from ``conf/`` itself,
with the Hydra overrides of the run-config key ``overrides``; unless they set ``num_users``,
the number of users is the number of nodes in the federation.
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from docl_flower.core.common.logs import setup_logging
from docl_flower.core.evaluation.results import RESULTS_FILE, write_results
from docl_flower.core.pipeline.config import (
    PROJECT_ROOT,
    Experiment,
    compose_config,
    overridden_keys,
)

from . import keys
from .components import build_experiment, load_experiment
from .grids import SimulationGrid
from .nodes import federation_nodes
from .workflows import as_workflow

log = logging.getLogger(__name__)

app = ServerApp()

#: Config file that every run folder holds (the resolved experiment).
EXPERIMENT_FILE = "experiment.yaml"


def experiment_for(
    context: Context, grid: Grid, now: float | None = None
) -> tuple[Experiment, Path, bool]:
    """The experiment of this run, its output folder, and whether users follow the federation.

    Raises ``ValueError`` for a bad config or overrides, with the reason.
    """
    run_config = context.run_config
    config_path = str(run_config.get(keys.RUN_CONFIG_PATH, ""))
    out = str(run_config.get(keys.RUN_OUT_DIR, ""))
    overrides = shlex.split(str(run_config.get(keys.RUN_OVERRIDES, "")))
    if config_path:
        if overrides:
            raise ValueError("give either 'config-path' or 'overrides' in the run config")
        if not out:
            raise ValueError("'config-path' needs 'out-dir' in the run config")
        checked = str(run_config.get(keys.RUN_CONFIG_CHECKED, "")) or None
        return load_experiment(Path(config_path), checked), Path(out), False
    cfg = compose_config(overrides)
    from_federation = "num_users" not in overridden_keys(overrides)
    if from_federation:
        nodes = federation_nodes(grid)
        if not nodes:
            raise ValueError("no node joined the federation: nothing to run")
        log.info("num_users follows the federation: %d nodes", len(nodes))
        cfg.num_users = len(nodes)
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(now))
    out_dir = Path(out) if out else PROJECT_ROOT / "outputs" / "flwr" / stamp
    exp = build_experiment(cfg)  # validate before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / EXPERIMENT_FILE, resolve=True)
    return exp, out_dir, from_federation


def ray_cluster() -> dict[str, object] | None:
    """The Ray cluster this process's simulation ran its clients on, or None (deployment).

    In a simulation the ServerApp shares its process with Flower's Ray backend, so the GCS
    address tells a new local instance from a cluster joined with ``simulation.ray_address``.
    """
    import ray  # Flower's simulation dependency; only asked, never started, here

    if not ray.is_initialized():
        return None
    # ray.nodes and ray.cluster_resources are unannotated in Ray 2.55.
    nodes = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
    resources = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return {
        "gcs_address": ray.get_runtime_context().gcs_address,
        "alive_nodes": len(nodes),
        "cpus": float(resources.get("CPU", 0.0)),
        "gpus": float(resources.get("GPU", 0.0)),
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the experiment, run its workflow, write the results."""
    setup_logging()
    started = time.time()
    try:
        exp, out_dir, from_federation = experiment_for(context, grid)
    except ValueError as err:
        log.error("docl-flower: %s", err)
        raise
    window = int(str(context.run_config.get(keys.RUN_SEND_WINDOW, 0)))
    if window > 0:
        grid = SimulationGrid(grid, window)
    result = as_workflow(exp.workflow).run(grid, exp, out_dir)
    result.flower_run_id = int(context.run_id)
    result.server_seconds = time.time() - started
    result.users_from_federation = from_federation
    result.ray_cluster = ray_cluster()
    result.config = exp.config
    # The last step: once this file holds this run's id, docl-flower stops the run.
    write_results(out_dir / RESULTS_FILE, result)
    log.info("%s %s", keys.RESULTS_LOGGED, out_dir / RESULTS_FILE)
