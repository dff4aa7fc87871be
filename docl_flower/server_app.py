"""ServerApp: run the register-once strategy, compose the global filter, evaluate, write results."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from hydra.utils import instantiate
from omegaconf import OmegaConf

from . import keys
from .config import Experiment, build_experiment
from .filter import GlobalFilter
from .logs import setup_logging
from .metrics import evaluate
from .store import save_filter
from .strategy import RegisterOnce, RegistrationOutcome, UploadRules

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


def evaluate_outcome(exp: Experiment, outcome: RegistrationOutcome) -> dict[str, Any]:
    """Compose the global filter from the registrations and compute the metrics."""
    if not outcome.registrations:
        raise RuntimeError(f"no autoencoder was registered; failures: {outcome.failed}")
    flt = GlobalFilter(sorted(outcome.registrations, key=lambda r: r.label), exp.scoring)
    test_images, test_labels = exp.dataset.load("test")
    x_test = exp.features(test_images)
    harmless = None
    if exp.harmless is not None:
        h_images, _ = exp.harmless.load("test")
        harmless = exp.features(h_images)
    start = time.perf_counter()
    ev = evaluate(flt, exp.guard, x_test, torch.as_tensor(test_labels), harmless)
    log.info("filter evaluated in %.1fs", time.perf_counter() - start)
    return {
        "overall_accuracy": ev.overall_accuracy,
        "per_class_accuracy": {str(k): v for k, v in ev.per_class_accuracy.items()},
        "alpha": ev.alpha,
        "guard": type(exp.guard).__name__,
        "guarded_accuracy": ev.guarded_accuracy,
        "acceptance_rate": ev.acceptance_rate,
        "ood_auroc": ev.ood_auroc,
        "num_test_images": int(torch.isin(torch.as_tensor(test_labels), flt.labels).sum()),
        "num_harmless_images": None if harmless is None else int(harmless.shape[0]),
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Register every user's autoencoder once, then evaluate the global filter on the server."""
    setup_logging()
    started = time.time()
    config_path = str(context.run_config[keys.RUN_CONFIG_PATH])
    out_dir = Path(str(context.run_config[keys.RUN_OUT_DIR]))
    if not config_path:
        raise ValueError("run config 'config-path' is empty: launch through `docl-flower`")
    cfg = OmegaConf.load(config_path)
    exp = build_experiment(cfg)  # type: ignore[arg-type]
    x_probe = exp.features(exp.dataset.load("test")[0][:1])
    dim = int(x_probe.shape[1])
    rules = UploadRules(shapes=exp.model.shapes(dim), max_error=float(dim))
    strategy: RegisterOnce = instantiate(cfg.strategy, assignment=exp.assignment, rules=rules)
    train_config = ConfigRecord({keys.SPEC: exp.client_spec.to_json()})
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),
        num_rounds=1,
        timeout=float(cfg.strategy_timeout_s),
        train_config=train_config,
    )
    outcome = strategy.outcome
    filter_dir = out_dir / "filter"
    if outcome.registrations:
        regs = sorted(outcome.registrations, key=lambda r: (r.label, r.user_id))
        extra = {
            k: {
                "node_id": outcome.nodes.get(r.user_id),
                "registered_at": outcome.registered_at.get(r.user_id),
                "fraction": exp.client_spec.fraction.get(r.user_id, 1.0),
                "trained_on": sorted({r.label, *exp.client_spec.extra_classes.get(r.user_id, [])}),
            }
            for k, r in enumerate(regs)
        }
        save_filter(filter_dir, regs, extra, info={"config": OmegaConf.to_container(cfg)})
    metrics = evaluate_outcome(exp, outcome)
    results: dict[str, Any] = {
        "method": "docl",
        **metrics,
        "registered": sorted(outcome.registered),
        "registered_classes": {str(u): c for u, c in sorted(outcome.registered.items())},
        "failed": {str(u): r for u, r in sorted(outcome.failed.items())},
        "node_errors": {str(n): r for n, r in outcome.node_errors.items()},
        "bytes_uploaded": {str(u): b for u, b in sorted(outcome.bytes_uploaded.items())},
        "bytes_downloaded": {str(u): b for u, b in sorted(outcome.bytes_downloaded.items())},
        "received_array_records": {
            str(u): n for u, n in sorted(outcome.received_array_records.items())
        },
        "train_seconds": {str(u): s for u, s in sorted(outcome.train_seconds.items())},
        "trained_on_cuda": {str(u): c for u, c in sorted(outcome.cuda.items())},
        "filter_path": str(filter_dir),
        "wall_seconds": time.time() - started,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json_atomic(out_dir / "results.json", results)
    log.info("results written to %s", out_dir / "results.json")
