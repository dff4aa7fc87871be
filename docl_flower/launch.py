"""Launch a Flower simulation through ``flwr run`` with a project-local FLWR_HOME.

The command starts its own simulation SuperLink on free loopback ports, runs the app, reads
the run's final status (``flwr run --stream`` exits 0 even when the run failed), and always
stops the SuperLink it started.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CONNECTION = "docl-sim"


class FlowerRunError(RuntimeError):
    """The Flower run did not complete."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """Path of a console script of this environment (falls back to PATH)."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise FlowerRunError(f"`{name}` not found; is flwr installed in this environment?")
    return found


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def format_config(values: Mapping[str, object]) -> str:
    """``k=v`` pairs in TOML syntax for ``--run-config`` / ``--federation-config``."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


@dataclass
class LocalSuperLink:
    """A simulation SuperLink owned by this process."""

    process: subprocess.Popen[bytes]
    control_address: str
    log_path: Path

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the SuperLink and everything it spawned (its process group)."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=grace_s)
        except ProcessLookupError:
            pass


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


@contextmanager
def local_superlink(flwr_home: Path, startup_s: float = 60.0) -> Iterator[LocalSuperLink]:
    """Start a simulation SuperLink on free ports; stop it on exit, also on error."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    control = f"127.0.0.1:{port}"  # 1.42 serves the Control, Fleet and Runtime APIs on one port
    log_path = flwr_home / f"superlink-{port}.log"
    cmd = [
        _bin("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            env=flwr_env(flwr_home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    link = LocalSuperLink(proc, control, log_path)
    try:
        host, cport = control.split(":")
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise FlowerRunError(
                    f"flower-superlink exited with code {proc.returncode}; see {log_path}"
                )
            try:
                with socket.create_connection((host, int(cport)), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise FlowerRunError(f"SuperLink did not start in {startup_s:.0f}s") from None
                time.sleep(0.2)
        yield link
    finally:
        link.stop()


def write_connection(flwr_home: Path, control_address: str) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one insecure connection to the local SuperLink."""
    text = (
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{control_address}"\n'
        "insecure = true\n"
    )
    (flwr_home / "config.toml").write_text(text, encoding="utf-8")


def run_status(
    flwr_home: Path, run_id: int | None, connection: str = CONNECTION
) -> tuple[int, str]:
    """Return ``(run_id, status)`` of the given run, or of the latest run when ``None``."""
    cmd = [_bin("flwr"), "list", connection, "--format", "json"]
    if run_id is not None:
        cmd += ["--run-id", str(run_id)]
    out = subprocess.run(
        cmd, env=flwr_env(flwr_home), capture_output=True, text=True, timeout=60, check=False
    )
    try:
        payload = json.loads(out.stdout)
        runs = payload["runs"]
    except (json.JSONDecodeError, KeyError) as err:
        raise FlowerRunError(f"cannot read run status: {out.stdout} {out.stderr}") from err
    if not runs:
        raise FlowerRunError("the SuperLink knows no run")
    run = max(runs, key=lambda r: int(r["run-id"]))
    return int(run["run-id"]), str(run["status"])


def run_app(
    app_dir: Path,
    flwr_home: Path,
    run_config: Mapping[str, object],
    federation_config: Mapping[str, object],
    timeout_s: float = 3600.0,
) -> int:
    """Run the Flower app in simulation and return its run id; raise if it did not complete."""
    with local_superlink(flwr_home) as link:
        write_connection(flwr_home, link.control_address)
        cmd = [
            _bin("flwr"),
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
        returncode, last_error = _stream(cmd, flwr_env(flwr_home), timeout_s)
        if returncode != 0:
            raise FlowerRunError(f"flwr run exited with code {returncode}: {last_error}")
        run_id, status = run_status(flwr_home, None)
        if status != "finished:completed":
            raise FlowerRunError(
                f"Flower run {run_id} ended with status {status!r}"
                + (f": {last_error}" if last_error else "")
                + f" (full log above; SuperLink log {link.log_path})"
            )
        return run_id


_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception)): (.*)$")


def _stream(cmd: list[str], env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """Run ``cmd``, echo its output, and return its exit code and the last exception line."""
    last_error = ""
    deadline = time.monotonic() + timeout_s
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if match := _ERROR_LINE.match(line.rstrip()):
                last_error = f"{match.group(1)}: {match.group(3)}"
            if time.monotonic() > deadline:
                proc.kill()
                raise FlowerRunError(f"flwr run did not finish in {timeout_s:.0f}s")
        return proc.wait(), last_error
