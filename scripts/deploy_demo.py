"""A real local deployment of DOCL: one SuperLink and N SuperNodes on 127.0.0.1.

TLS and SuperNode authentication are on; the ServerApp and ClientApp are the same as in
simulation.

    python scripts/deploy_demo.py [--users 10] [--out deploy] [--insecure] [HYDRA OVERRIDES...]

Steps (docl_flower/experiments/launch.py, on docl_flower/operations/deploy.py): make a private
CA and a server certificate for 127.0.0.1/localhost; one EC key pair per SuperNode (OpenSSH
format); start `flower-superlink` with TLS, `--enable-supernode-auth` and `--database`; register
every public key with `flwr supernode register` and write the node -> user bindings that the
SuperLink returned; start each `flower-supernode` with its private key and
`--node-config "user-id=U partition-id=U data-dir=..."`; write the resolved experiment (with
`strategy.bindings_path`, so a node may only register its own user) and run it with `flwr run`
against the named connection; print the results table.
Every process it started is stopped when it ends, also on failure and on SIGINT/SIGTERM/SIGHUP
(exit status 130/143/129); if the demo itself is killed (SIGKILL), its watchdog stops them
within seconds. `--insecure` (no TLS, no authentication) exists only for debugging.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from docl_flower.experiments.launch import DeploySettings, deploy_demo
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
    settings = DeploySettings(args.users, args.out, args.insecure, tuple(args.overrides))
    with exit_on_signals():
        deploy_demo(settings)


if __name__ == "__main__":
    main()
