"""Hydra entry point (``docl-flower``): resolve the config, launch the Flower run, report."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import keys
from .config import PROJECT_ROOT, build_experiment
from .launch import FlowerRunError, run_app

log = logging.getLogger(__name__)


def format_table(results: dict[str, Any]) -> str:
    """The short table printed at the end of a run."""
    rows = [
        ("method", str(results.get("method", "?"))),
        ("overall accuracy", f"{results['overall_accuracy']:.4f}"),
    ]
    if results.get("guarded_accuracy") is not None:
        guarded = f"{results['guarded_accuracy']:.4f}"
        rows.append((f"guarded accuracy (alpha={results['alpha']})", guarded))
    if results.get("acceptance_rate") is not None:
        rows.append(("acceptance rate (Fashion-MNIST)", f"{results['acceptance_rate']:.4f}"))
    if results.get("ood_auroc") is not None:
        rows.append(("OOD AUROC (min error)", f"{results['ood_auroc']:.4f}"))
    rows.append(("rounds", f"{results.get('rounds', 1)}"))
    down = results.get("bytes_downloaded", {})
    rows.append(("max bytes downloaded per user", f"{max(down.values(), default=0)}"))
    rows.append(("registered users", f"{len(results['registered'])}"))
    rows.append(("failed users", f"{len(results['failed'])}"))
    rows.append(("wall seconds", f"{results.get('wall_seconds', float('nan')):.1f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    per_class = results["per_class_accuracy"]
    lines.append("per-class accuracy: " + "  ".join(f"{k}:{v:.3f}" for k, v in per_class.items()))
    for user, reason in results["failed"].items():
        lines.append(f"failed user {user}: {reason}")
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


def run_experiment(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Validate ``cfg``, run DOCL through ``flwr run``, and return the results."""
    start = time.time()
    exp = build_experiment(cfg)  # fail fast on a bad config, before Flower starts
    check_resources(exp.simulation.num_gpus)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "experiment.yaml"
    OmegaConf.save(cfg, config_path, resolve=True)
    num_users = len(exp.assignment)
    run_app(
        app_dir=PROJECT_ROOT,
        flwr_home=PROJECT_ROOT / ".flwr",
        run_config={keys.RUN_CONFIG_PATH: str(config_path), keys.RUN_OUT_DIR: str(out_dir)},
        federation_config={
            "num-supernodes": num_users,
            "client-resources-num-cpus": exp.simulation.num_cpus,
            "client-resources-num-gpus": exp.simulation.num_gpus,
        },
        timeout_s=float(cfg.run_timeout_s),
    )
    results_path = out_dir / "results.json"
    if not results_path.is_file():
        raise FlowerRunError(f"the run completed but wrote no {results_path}")
    results: dict[str, Any] = json.loads(results_path.read_text())
    results["wall_seconds"] = time.time() - start
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    return results


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    """Run one experiment in the Hydra run directory; return the overall accuracy."""
    out_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    try:
        results = run_experiment(cfg, out_dir)
    except (FlowerRunError, ValueError) as err:
        log.error("run failed: %s", err)
        raise SystemExit(f"docl-flower: {err}") from err
    print(format_table(results))
    print(f"results: {out_dir / 'results.json'}")
    return float(results["overall_accuracy"])


def cli() -> None:
    """Console script ``docl-flower``: Hydra overrides, or ``filter check`` (a saved filter)."""
    if sys.argv[1:3] == ["filter", "check"]:
        from .check import main as check_main

        sys.exit(check_main(sys.argv[3:]))
    hydra_main()
    sys.exit(0)
