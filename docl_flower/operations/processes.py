"""Process plumbing shared by simulations and deployments, written once.

Starting a Flower executable in its own process group, waiting for its port, stopping the
whole group, writing ``$FLWR_HOME/config.toml``, streaming ``flwr run`` and reading a run's
final status (``flwr run --stream`` exits 0 even when the run failed).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO


class FlowerRunError(RuntimeError):
    """A Flower process or run did not do what it should; the message says what and where."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flwr_bin(name: str) -> str:
    """Path of a console script of this environment (falls back to PATH)."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise FlowerRunError(f"`{name}` not found; is flwr installed in this environment?")
    return found


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every flwr command: project-local home, no runtime installs."""
    env = os.environ.copy()
    env["FLWR_HOME"] = str(flwr_home)
    # The SuperLink spawns flower-superexec, flwr-serverapp, ... by name: use this venv's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


def start_process(
    cmd: list[str], log_path: Path, env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new process group, appending its output to ``log_path``."""
    with log_path.open("ab") as handle:
        return subprocess.Popen(
            cmd,
            env=dict(env),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the process group of ``proc`` (gone already: nothing to do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_group(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, grace_s: float = 15.0
) -> None:
    """Send ``sig`` to the process group, wait, then SIGKILL whatever is left of the group."""
    if proc is None:
        return
    if proc.poll() is None:
        signal_group(proc, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)


def wait_for_port(
    proc: subprocess.Popen[bytes], port: int, log_path: Path, startup_s: float = 60.0
) -> None:
    """Wait until ``proc`` listens on 127.0.0.1:``port``; raise if it exits or times out."""
    deadline = time.monotonic() + startup_s
    while True:
        if proc.poll() is not None:
            raise FlowerRunError(f"the process exited with code {proc.returncode}; see {log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise FlowerRunError(
                    f"nothing listens on port {port} after {startup_s:.0f}s; see {log_path}"
                ) from None
            time.sleep(0.2)


def write_connection(
    flwr_home: Path, name: str, address: str, root_certificates: Path | None = None
) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one connection ``name`` (the default one).

    Without ``root_certificates`` the connection is insecure (loopback simulations only).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    text = f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
    if root_certificates is not None:
        text += f"root-certificates = {json.dumps(str(root_certificates))}\n"
    else:
        text += "insecure = true\n"
    (flwr_home / "config.toml").write_text(text, encoding="utf-8")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def format_config(values: Mapping[str, object]) -> str:
    """``k=v`` pairs in TOML syntax for ``--run-config`` / ``--federation-config``."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception)): (.*)$")
_STARTED = re.compile(r"Successfully started run (\d+)")


@dataclass(frozen=True)
class StreamedRun:
    """What ``flwr run --stream`` printed: exit code, run id, last exception line."""

    returncode: int
    run_id: int | None
    last_error: str


def stream_flwr_run(
    cmd: list[str],
    env: Mapping[str, str],
    timeout_s: float,
    echo: TextIO | None = None,
    log_path: Path | None = None,
) -> StreamedRun:
    """Run a ``flwr run ... --stream`` command, copy its output to ``echo`` / ``log_path``.

    Raises :class:`FlowerRunError` when it runs longer than ``timeout_s`` (it is killed).
    """
    run_id: int | None = None
    last_error = ""
    proc = subprocess.Popen(
        cmd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    watchdog = threading.Timer(timeout_s, kill)
    watchdog.start()
    assert proc.stdout is not None
    try:
        with contextlib.ExitStack() as stack:
            log = stack.enter_context(log_path.open("a", encoding="utf-8")) if log_path else None
            for line in proc.stdout:
                if echo is not None:
                    echo.write(line)
                    echo.flush()
                if log is not None:
                    log.write(line)
                if match := _ERROR_LINE.match(line.rstrip()):
                    last_error = f"{match.group(1)}: {match.group(3)}"
                if run_id is None and (found := _STARTED.search(line)):
                    run_id = int(found.group(1))
    finally:
        watchdog.cancel()
        if proc.poll() is None and timed_out.is_set():
            proc.kill()
        returncode = proc.wait()
    if timed_out.is_set():
        raise FlowerRunError(f"flwr run did not finish in {timeout_s:.0f}s")
    return StreamedRun(returncode, run_id, last_error)


def run_status(flwr_home: Path, run_id: int | None, connection: str) -> tuple[int, str]:
    """Return ``(run_id, status)`` of the given run, or of the latest run when ``None``."""
    cmd = [flwr_bin("flwr"), "list", connection, "--format", "json"]
    if run_id is not None:
        cmd += ["--run-id", str(run_id)]
    out = subprocess.run(
        cmd, env=flwr_env(flwr_home), capture_output=True, text=True, timeout=60, check=False
    )
    try:
        runs = json.loads(out.stdout)["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise FlowerRunError(f"cannot read run status: {out.stdout} {out.stderr}") from err
    if not runs:
        raise FlowerRunError("the SuperLink knows no run")
    run = max(runs, key=lambda r: int(r["run-id"]))
    return int(run["run-id"]), str(run["status"])
