"""A real local deployment of DOCL: one SuperLink and N SuperNodes on 127.0.0.1.

TLS and SuperNode authentication are on; the ServerApp and ClientApp are the same as in
simulation.

    python scripts/deploy_demo.py [--users 10] [--out deploy] [--insecure] [HYDRA OVERRIDES...]

Steps (docl_flower/deploy.py): make a private CA and a server certificate for
127.0.0.1/localhost; one EC key pair per SuperNode (OpenSSH format); start `flower-superlink`
with TLS, `--enable-supernode-auth` and `--database`; register every public key with
`flwr supernode register` and write the node -> user bindings that the SuperLink returned;
start each `flower-supernode` with its private key and
`--node-config "user-id=U partition-id=U data-dir=..."`; write the resolved experiment (with
`strategy.bindings_path`, so a node may only register its own user) and run it with `flwr run`
against the named connection; print the results table.
Every process it started is stopped when it ends, also on failure and on SIGINT/SIGTERM/SIGHUP
(exit status 130/143/129); if the demo itself is killed (SIGKILL), its watchdog stops them
within seconds. `--insecure` (no TLS, no authentication) exists only for debugging.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from docl_flower.core.evaluation.results import RESULTS_FILE, read_results, write_results
from docl_flower.core.pipeline.config import PROJECT_ROOT
from docl_flower.federation.components import build_experiment
from docl_flower.operations.deploy import LocalDeployment
from docl_flower.operations.main import format_table
from docl_flower.operations.processes import exit_on_signals


def main() -> None:
    """Parse the command line and run the demo; SIGINT/SIGTERM/SIGHUP stop every process."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("deploy"))
    parser.add_argument("--insecure", action="store_true", help="no TLS, no node auth (debug)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the experiment")
    args = parser.parse_args()
    with exit_on_signals():
        run_demo(args)


def run_demo(args: argparse.Namespace) -> None:
    """Start the deployment, run the experiment on it, print the results; stop it all."""
    start_time = time.time()
    with LocalDeployment(args.out, secure=not args.insecure) as dep:
        # All SuperNodes share this machine's cores: one torch thread each unless overridden.
        threads = (
            []
            if any(o.startswith("train.num_threads") for o in args.overrides)
            else ["train.num_threads=1"]
        )
        with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                "config", overrides=[f"num_users={args.users}", *threads, *args.overrides]
            )
        exp = build_experiment(cfg)
        data_dir = str(Path(exp.dataset.root))
        dep.start_superlink()
        for user in sorted(exp.assignment):
            dep.add_node(
                user,
                f"user-id={user} partition-id={user} num-partitions={args.users} "
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


if __name__ == "__main__":
    main()
