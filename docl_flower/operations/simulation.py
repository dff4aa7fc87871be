"""Launch a Flower simulation through ``flwr run`` with a project-local FLWR_HOME.

The command starts its own simulation SuperLink on a free loopback port, runs the app, reads
the run's final status, and always stops the SuperLink it started and every process below it
(SuperExec, the simulation process, Ray's daemons and workers). Signals: the entry point runs
inside :func:`~.processes.exit_on_signals`, which turns SIGINT/SIGTERM into an exception so
that the ``finally`` blocks here run.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

from .processes import (
    FlowerRunError,
    flwr_bin,
    flwr_env,
    format_config,
    free_port,
    run_status,
    start_process,
    stop_tree,
    stream_flwr_run,
    wait_for_port,
    write_connection,
)

log = logging.getLogger(__name__)

CONNECTION = "docl-sim"

__all__ = ["CONNECTION", "FlowerRunError", "LocalSuperLink", "local_superlink", "run_app"]


@dataclass
class LocalSuperLink:
    """A simulation SuperLink owned by this process."""

    process: Popen[bytes]
    control_address: str
    log_path: Path

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the SuperLink and everything it spawned (SuperExec, simulation, Ray, ...)."""
        stop_tree(self.process, grace_s=grace_s)


@contextmanager
def local_superlink(
    flwr_home: Path,
    startup_s: float = 60.0,
    log_dir: Path | None = None,
    ray_address: str | None = None,
) -> Iterator[LocalSuperLink]:
    """Start a simulation SuperLink on a free port; stop it on exit, also on error.

    ``ray_address`` (see :func:`ray_env`) chooses the Ray cluster of the simulation it runs.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = (log_dir or flwr_home) / f"superlink-{port}.log"
    cmd = [
        flwr_bin("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),  # 1.42 serves the Control, Fleet and Runtime APIs on one port
        "--disable-runtime-dependency-installation",
    ]
    link = LocalSuperLink(
        start_process(cmd, log_path, ray_env(flwr_env(flwr_home), ray_address)),
        f"127.0.0.1:{port}",
        log_path,
    )
    try:
        wait_for_port(link.process, port, log_path, startup_s)
        yield link
    finally:
        link.stop()


def ray_env(env: Mapping[str, str], ray_address: str | None) -> dict[str, str]:
    """``env`` with the Ray cluster that the simulation's ``ray.init()`` joins.

    ``None`` keeps Ray's own rule (``RAY_ADDRESS`` if the environment sets it, else a new
    local Ray instance for the run); ``"local"`` always starts a new local instance;
    ``"auto"`` joins the cluster started on this machine with ``ray start``; ``HOST:PORT``
    joins the cluster whose head listens there. Flower's simulation backend calls
    ``ray.init()`` without an address, and Ray reads it from ``RAY_ADDRESS``.
    """
    out = dict(env)
    if ray_address == "local":
        out.pop("RAY_ADDRESS", None)
    elif ray_address is not None:
        out["RAY_ADDRESS"] = ray_address
    return out


def run_app(
    app_dir: Path,
    flwr_home: Path,
    run_config: Mapping[str, object],
    federation_config: Mapping[str, object],
    timeout_s: float = 3600.0,
    ray_address: str | None = None,
) -> int:
    """Run the Flower app in simulation and return its run id; raise if it did not complete.

    Each call gets a FLWR_HOME of its own below ``flwr_home`` (removed at the end; the
    SuperLink's log stays in ``flwr_home``), so that concurrent runs never read each other's
    connection from ``config.toml``.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    own_home = Path(tempfile.mkdtemp(prefix="sim-", dir=flwr_home))
    try:
        return _run_app(
            app_dir, own_home, run_config, federation_config, timeout_s, flwr_home, ray_address
        )
    finally:
        shutil.rmtree(own_home, ignore_errors=True)


def _run_app(
    app_dir: Path,
    flwr_home: Path,
    run_config: Mapping[str, object],
    federation_config: Mapping[str, object],
    timeout_s: float,
    log_dir: Path,
    ray_address: str | None,
) -> int:
    with local_superlink(flwr_home, log_dir=log_dir, ray_address=ray_address) as link:
        write_connection(flwr_home, CONNECTION, link.control_address)
        cmd = [
            flwr_bin("flwr"),
            "run",
            str(app_dir),
            CONNECTION,
            "--stream",
            "--run-config",
            format_config(run_config),
            "--federation-config",
            format_config(federation_config),
        ]
        log.info("%s", " ".join(cmd))
        run = stream_flwr_run(cmd, flwr_env(flwr_home), timeout_s, echo=sys.stdout)
        if run.returncode != 0:
            raise FlowerRunError(f"flwr run exited with code {run.returncode}: {run.last_error}")
        run_id, status = run_status(flwr_home, run.run_id, CONNECTION)
        if status != "finished:completed":
            raise FlowerRunError(
                f"Flower run {run_id} ended with status {status!r}"
                + (f": {run.last_error}" if run.last_error else "")
                + f" (full log above; SuperLink log {link.log_path})"
            )
        return run_id
