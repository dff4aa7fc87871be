"""ServerApp: run the configured workflow (DOCL or a baseline) and write ``results.json``."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from . import keys
from .config import build_experiment
from .logs import setup_logging

log = logging.getLogger(__name__)

app = ServerApp()


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(tmp, path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Load the experiment the Hydra entry point wrote, run its workflow, write the results."""
    setup_logging()
    started = time.time()
    config_path = str(context.run_config[keys.RUN_CONFIG_PATH])
    out_dir = Path(str(context.run_config[keys.RUN_OUT_DIR]))
    if not config_path:
        raise ValueError("run config 'config-path' is empty: launch through `docl-flower`")
    cfg = OmegaConf.load(config_path)
    exp = build_experiment(cfg)  # type: ignore[arg-type]
    results = exp.workflow.run(grid, exp, cfg, out_dir)
    results["server_seconds"] = time.time() - started
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    write_json_atomic(out_dir / "results.json", results)
    log.info("results written to %s", out_dir / "results.json")
