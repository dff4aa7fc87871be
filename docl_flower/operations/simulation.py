"""Launch a Flower simulation through ``flwr run`` with a project-local FLWR_HOME.

The command starts its own simulation SuperLink on a free loopback port, runs the app, and
always stops the SuperLink it started and every process below it (SuperExec, the simulation
process, Ray's daemons and workers). The run is over when the app says its work is done (a
``done`` check: ``docl-flower``'s is ``results.json`` holding this run's id), or else when
``flwr run`` ends, and then the run's final status decides. Signals: the entry point runs
inside :func:`~.processes.exit_on_signals`, which turns SIGINT/SIGTERM/SIGHUP into an
exception so that the ``finally`` blocks here run (and whose watchdog stops these processes
if the command is killed).

Start-up is what a short simulation pays on top of its training, so the slow parts run side
by side: unless the run joins a Ray cluster, a Ray head of the run's own starts together with
the SuperLink (Flower's simulation connects to it instead of starting Ray itself later, while
a core idled), a ``preflight`` check runs meanwhile, and ``flwr run`` bundles a copy of the
app's own files (:func:`stage_app`) instead of walking the whole project folder, virtual
environment included.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator, Mapping
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
    stop_trees,
    stream_flwr_run,
    wait_for_port,
    write_connection,
)

log = logging.getLogger(__name__)

CONNECTION = "docl-sim"

__all__ = [
    "CONNECTION",
    "FlowerRunError",
    "LocalSuperLink",
    "RayHead",
    "ray_head",
    "run_app",
    "stage_app",
]


@dataclass
class LocalSuperLink:
    """A simulation SuperLink owned by this process."""

    process: Popen[bytes]
    control_address: str
    log_path: Path

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the SuperLink and everything it spawned (SuperExec, simulation, Ray, ...)."""
        stop_tree(self.process, grace_s=grace_s)


def _start_superlink(
    flwr_home: Path, log_dir: Path | None, env: Mapping[str, str]
) -> tuple[LocalSuperLink, int]:
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
    return LocalSuperLink(start_process(cmd, log_path, env), f"127.0.0.1:{port}", log_path), port


@dataclass
class RayHead:
    """A one-node Ray head on loopback, owned by this process (``ray start --head --block``)."""

    process: Popen[bytes]
    address: str
    port: int
    temp_dir: Path
    log_path: Path

    def wait(self, startup_s: float = 120.0) -> None:
        """Wait until the head's GCS accepts connections; raise if it exits or times out."""
        wait_for_port(self.process, self.port, self.log_path, startup_s)

    def stop(self) -> None:
        """Kill the head and every Ray process it started; remove its session folder.

        SIGKILL at once: the head holds nothing to save (its session folder is removed), and
        a graceful SIGTERM takes 3-4 s here. Never ``ray stop``: that would stop every Ray
        instance of this user.
        """
        try:
            stop_tree(self.process, sig=signal.SIGKILL)
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_head(log_dir: Path, num_cpus: int | None = None) -> RayHead:
    """Start a Ray head on 127.0.0.1 (not waiting for it: see :meth:`RayHead.wait`).

    Every port is free or chosen by Ray, so heads of concurrent runs do not collide; its
    session lives in a short temporary folder (Ray's sockets must fit in 107 characters),
    removed by :meth:`RayHead.stop`. Resources are Ray's own detection, as ``ray.init()``
    would find them, unless ``num_cpus`` is given.
    """
    ray = flwr_bin("ray")
    temp = Path(tempfile.mkdtemp(prefix="ray-"))
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"ray-head-{port}.log"
    env = {
        **os.environ,
        "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        # No idle workers started ahead: Flower's actors need workers with its job's runtime
        # environment, so Ray started two more for them and the first two idled (measured:
        # four worker processes for two actors, each loading Python and Ray on a busy core).
        "RAY_enable_worker_prestart": "0",
        "RAY_prestart_worker_first_driver": "0",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        ray,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        # No autoscaler monitor: a one-node head never scales, and the monitor is a Python
        # process importing Ray on a core that the start-up needs (0.4 s of CPU). (The Ray
        # Client server cannot be left out while ``ray[client]`` is installed: ``ray
        # start`` refuses port 0.)
        f"--ray-client-server-port={free_port()}",
        "--no-monitor",
        f"--dashboard-agent-listen-port={free_port()}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    try:
        proc = start_process(cmd, log_path, env)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return RayHead(proc, f"127.0.0.1:{port}", port, temp, log_path)


@contextmanager
def ray_head(
    log_dir: Path, num_cpus: int | None = None, startup_s: float = 120.0
) -> Iterator[RayHead]:
    """A running Ray head for the duration of the block (see :func:`start_ray_head`)."""
    head = start_ray_head(log_dir, num_cpus)
    try:
        head.wait(startup_s)
        yield head
    finally:
        head.stop()


def private_head_wanted(ray_address: str | None, env: Mapping[str, str] = os.environ) -> bool:
    """Whether a run with this ``simulation.ray_address`` gets a Ray head of its own.

    ``None`` (the default) without ``RAY_ADDRESS`` in the environment: yes. ``"local"``
    keeps Flower's own ``ray.init()`` inside the simulation process; ``"auto"``, HOST:PORT
    and ``RAY_ADDRESS`` join an existing cluster.
    """
    return ray_address is None and not env.get("RAY_ADDRESS")


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy the files that ``flwr run`` bundles from ``app_dir`` into ``dest``; return ``dest``.

    ``flwr run DIR`` lists every file below DIR before it applies its include rules: in the
    project folder that is the whole virtual environment (about 48,000 files, 3-4 s on every
    run). The copy holds ``pyproject.toml``, ``.gitignore`` and the files that
    ``[tool.flwr.app] fab-include`` names, so the bundle (and its hash) is the same. Without
    ``fab-include`` there is nothing to narrow: ``app_dir`` itself is returned.
    """
    pyproject = app_dir / "pyproject.toml"
    with pyproject.open("rb") as handle:
        patterns = tomllib.load(handle).get("tool", {}).get("flwr", {}).get("app", {})
    includes = patterns.get("fab-include")
    if not includes:
        return app_dir
    dest.mkdir(parents=True, exist_ok=True)
    files = {pyproject}
    if (app_dir / ".gitignore").is_file():
        files.add(app_dir / ".gitignore")
    for pattern in includes:
        files.update(p for p in app_dir.glob(pattern) if p.is_file() and not p.is_symlink())
    for path in files:
        target = dest / path.relative_to(app_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return dest


def ray_env(env: Mapping[str, str], ray_address: str | None) -> dict[str, str]:
    """``env`` with the Ray cluster that the simulation's ``ray.init()`` joins.

    ``None`` keeps Ray's own rule (``RAY_ADDRESS`` if the environment sets it, else a new
    local Ray instance; :func:`run_app` passes its private head's address instead, see
    :func:`private_head_wanted`); ``"local"`` always starts a new local instance;
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
    preflight: Callable[[], None] | None = None,
    done: Callable[[int], bool] | None = None,
    last_line: Callable[[str], bool] | None = None,
) -> int:
    """Run the Flower app in simulation and return its run id; raise if it did not complete.

    Each call gets a FLWR_HOME of its own below ``flwr_home`` (removed at the end; the
    SuperLink's log stays in ``flwr_home``), so that concurrent runs never read each other's
    connection from ``config.toml``. ``preflight`` runs while the SuperLink (and Ray head)
    start, before the run is submitted; if it raises, they are stopped and nothing runs.

    ``done(run_id)`` is the app's own sign that run ``run_id`` has completed its work (see
    :func:`~.processes.stream_flwr_run`): once it holds, the run counts as completed and
    its processes are killed at once, instead of waiting for Flower to wind down the
    simulation and for ``flwr list`` to report ``finished:completed``. Without it, or when
    ``flwr run`` ends before it holds, the run's status decides. ``last_line`` recognises the
    app's last log line: the run's output is streamed until it has come (at most
    :data:`~.processes.DRAIN_S` seconds).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    own_home = Path(tempfile.mkdtemp(prefix="sim-", dir=flwr_home))
    try:
        return _run_app(
            app_dir,
            own_home,
            run_config,
            federation_config,
            timeout_s,
            flwr_home,
            ray_address,
            preflight,
            done,
            last_line,
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
    preflight: Callable[[], None] | None,
    done: Callable[[int], bool] | None,
    last_line: Callable[[str], bool] | None,
) -> int:
    # The Ray head (if any) and the SuperLink start side by side.
    head = start_ray_head(log_dir) if private_head_wanted(ray_address) else None
    link: LocalSuperLink | None = None
    try:
        env = ray_env(flwr_env(flwr_home), head.address if head else ray_address)
        link, port = _start_superlink(flwr_home, log_dir, env)
        app = stage_app(app_dir, flwr_home / "app")
        if preflight is not None:
            preflight()
        wait_for_port(link.process, port, link.log_path, 60.0)
        if head is not None:
            head.wait()
        write_connection(flwr_home, CONNECTION, link.control_address)
        cmd = [
            flwr_bin("flwr"),
            "run",
            str(app),
            CONNECTION,
            "--stream",
            "--run-config",
            format_config(run_config),
            "--federation-config",
            format_config(federation_config),
        ]
        log.info("%s", " ".join(cmd))
        run = stream_flwr_run(
            cmd, flwr_env(flwr_home), timeout_s, echo=sys.stdout, done=done, last_line=last_line
        )
        if run.app_done and run.run_id is not None:
            # Nothing of the run is kept: kill it all at once (a graceful stop of the
            # simulation, mid-way through Flower's teardown, takes seconds).
            stop_trees([link.process, head.process if head else None], sig=signal.SIGKILL)
            log.info("run %d: the app wrote its results; its processes are stopped", run.run_id)
            return run.run_id
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
    finally:
        try:
            if link is not None:
                link.stop()
        finally:
            if head is not None:
                head.stop()
