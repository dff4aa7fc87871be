"""ServerApp: run the configured workflow (DOCL or a baseline) and write ``results.json``."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..core.config import load_experiment
from ..core.logs import setup_logging
from ..core.results import RESULTS_FILE, write_results
from . import keys
from .workflows import as_workflow

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Load the experiment the Hydra entry point wrote, run its workflow, write the results."""
    setup_logging()
    started = time.time()
    config_path = str(context.run_config[keys.RUN_CONFIG_PATH])
    out_dir = Path(str(context.run_config[keys.RUN_OUT_DIR]))
    if not config_path:
        raise ValueError("run config 'config-path' is empty: launch through `docl-flower`")
    exp = load_experiment(Path(config_path))
    result = as_workflow(exp.workflow).run(grid, exp, out_dir)
    result.server_seconds = time.time() - started
    result.config = exp.config
    write_results(out_dir / RESULTS_FILE, result)
    log.info("results written to %s", out_dir / RESULTS_FILE)
