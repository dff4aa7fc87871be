"""A real Flower deployment on this machine: one SuperLink and one SuperNode per user.

Used by ``scripts/deploy_demo.py`` (``make deploy-demo``) and by the fault tests. No Flower
import: every component is the installed Flower executable (``flower-superlink``,
``flower-supernode``, ``flwr``), started in its own session so that it can be killed and
restarted like a real device or server; stopping one stops every process it spawned.

Security is on unless ``secure=False``: a private CA and a server certificate for the
SuperLink (TLS), one EC key pair per SuperNode registered with ``flwr supernode register``
(SuperNode authentication). Each registration returns the node id that the SuperLink will give
that key; :meth:`LocalDeployment.write_bindings` writes the operator's node -> user bindings,
which the ServerApp enforces (a node may only register the user it is bound to).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .credentials import make_certificates, make_node_keys
from .processes import (
    FlowerRunError,
    flwr_env,
    free_port,
    run_status,
    start_process,
    stop_tree,
    stop_trees,
    stream_flwr_run,
    wait_for_port,
    write_connection,
)

#: Name of the connection in ``$FLWR_HOME/config.toml``.
CONNECTION = "docl-deploy"


class DeploymentError(RuntimeError):
    """A deployment step failed; the message names the log to read."""


@dataclass
class Node:
    """One SuperNode: the user it serves, its key, its node id and its process."""

    user: int
    node_config: str
    log: Path
    private_key: Path | None = None
    node_id: int | None = None
    insecure: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None


class LocalDeployment:
    """SuperLink + SuperNodes on 127.0.0.1, each a separate process group.

    Parameters
    ----------
    out : Path
        Folder for certificates, keys, logs, the SuperLink database and ``FLWR_HOME``.
    secure : bool
        TLS and SuperNode authentication (default). ``False`` is for debugging only.
    supernode : Path, optional
        The ``flower-supernode`` executable to start (default: the one next to this Python).
    """

    def __init__(self, out: Path, secure: bool = True, supernode: Path | None = None) -> None:
        self.out = out.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.secure = secure
        self.bindir = str(Path(sys.executable).parent)
        self.supernode = str(supernode or Path(self.bindir) / "flower-supernode")
        self.flwr_home = self.out / "flwr-home"
        self.flwr_home.mkdir(exist_ok=True)
        self.env = flwr_env(self.flwr_home)
        self.port = free_port()
        self.database = self.out / "superlink.db"
        self.nodes: dict[int, Node] = {}
        self.superlink: subprocess.Popen[bytes] | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self.ca: Path | None = None
        self._tls: tuple[Path, ...] | None = None
        if secure:
            self._tls = make_certificates(self.out / "certs", ["127.0.0.1", "localhost"])
            self.ca = self._tls[0]

    # ---------------------------------------------------------------- processes
    def _start(
        self, cmd: list[str], log: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        proc = start_process(cmd, log, env or self.env)
        self._procs.append(proc)
        return proc

    @property
    def superlink_log(self) -> Path:
        """The SuperLink's log (appended across restarts)."""
        return self.out / "superlink.log"

    def start_superlink(self, startup_s: float = 60.0) -> None:
        """Start (or restart) the SuperLink on the same port with the same database."""
        cmd = [
            f"{self.bindir}/flower-superlink",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.database),
            "--disable-runtime-dependency-installation",
        ]
        if self._tls is None:
            cmd.append("--insecure")
        else:
            ca, cert, key = self._tls
            cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert)]
            cmd += ["--ssl-keyfile", str(key), "--enable-supernode-auth"]
        self.superlink = self._start(cmd, self.superlink_log)
        try:
            wait_for_port(self.superlink, self.port, self.superlink_log, startup_s)
        except FlowerRunError as err:
            raise DeploymentError(str(err)) from err
        write_connection(self.flwr_home, CONNECTION, f"127.0.0.1:{self.port}", self.ca)

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and every process it spawned (a running ServerApp dies too)."""
        stop_tree(self.superlink, signal.SIGKILL)

    def flwr(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run one ``flwr`` CLI command against this deployment."""
        return subprocess.run(
            [f"{self.bindir}/flwr", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def register_key(self, public_key: Path) -> int:
        """``flwr supernode register``: returns the node id the SuperLink gives that key."""
        res = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        try:
            return int(json.loads(res.stdout)["node-id"])
        except (json.JSONDecodeError, KeyError, ValueError) as err:
            raise DeploymentError(
                f"registering {public_key} failed: {res.stdout} {res.stderr}"
            ) from err

    def online_nodes(self) -> set[int]:
        """Node ids the SuperLink lists as online."""
        res = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        try:
            nodes = json.loads(res.stdout)["nodes"]
        except (json.JSONDecodeError, KeyError) as err:
            raise DeploymentError(f"cannot list nodes: {res.stdout} {res.stderr}") from err
        return {int(n["node-id"]) for n in nodes if n.get("status") == "online"}

    def add_node(
        self,
        user: int,
        node_config: str,
        *,
        register: bool = True,
        insecure: bool = False,
        extra_env: Mapping[str, str] | None = None,
        max_retries: int | None = None,
    ) -> Node:
        """Make a key pair for ``user``'s device, register it (unless told not to), start it.

        ``insecure`` starts the SuperNode without TLS (and without its key), which a secure
        SuperLink must refuse; ``register=False`` leaves the key unknown to the SuperLink.
        """
        node = Node(
            user,
            node_config,
            self.out / f"supernode-{user}.log",
            insecure=insecure or not self.secure,
            extra_env=dict(extra_env or {}),
        )
        if self.secure and not insecure:
            node.private_key, public = make_node_keys(self.out / "keys", f"node-{user}")
            if register:
                node.node_id = self.register_key(public)
        self.nodes[user] = node
        self.start_node(user, max_retries=max_retries)
        return node

    def start_node(self, user: int, max_retries: int | None = None) -> None:
        """Start (or restart) the SuperNode of ``user``."""
        node = self.nodes[user]
        cmd = [
            self.supernode,
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(free_port()),
            "--node-config",
            node.node_config,
        ]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        if node.insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.ca)]
            cmd += ["--auth-supernode-private-key", str(node.private_key)]
        env = {**self.env, **node.extra_env}
        node.proc = self._start(cmd, node.log, env)

    def kill_node(self, user: int) -> None:
        """SIGKILL the SuperNode of ``user`` and its ClientApp (a device that dies)."""
        stop_tree(self.nodes[user].proc, signal.SIGKILL)

    def bindings(self) -> dict[int, int]:
        """Node id -> user id of every registered SuperNode key."""
        return {n.node_id: u for u, n in self.nodes.items() if n.node_id is not None}

    def write_bindings(self, path: Path | None = None) -> Path:
        """Write the node -> user bindings as JSON (``{"<node id>": user id}``)."""
        path = path or self.out / "bindings.json"
        text = json.dumps({str(k): v for k, v in sorted(self.bindings().items())}, indent=2)
        path.write_text(text + "\n", encoding="utf-8")
        return path

    def run(
        self, app_dir: Path, run_config: str, timeout_s: float = 1800.0, echo: bool = False
    ) -> tuple[int | None, str]:
        """``flwr run APP CONNECTION --stream --run-config ...``; returns (run id, status).

        The run's output goes to ``flwr-run.log`` (and to this process's stdout with
        ``echo``). The run id is the one ``flwr run`` reports (None if it started none).
        """
        cmd = [f"{self.bindir}/flwr", "run", str(app_dir), CONNECTION, "--stream"]
        cmd += ["--run-config", run_config]
        if echo:
            print(" ".join(cmd), flush=True)
        try:
            run = stream_flwr_run(
                cmd,
                self.env,
                timeout_s,
                echo=sys.stdout if echo else None,
                log_path=self.out / "flwr-run.log",
            )
        except FlowerRunError as err:
            return None, str(err)
        if run.run_id is None:
            return None, f"not started (flwr run exited with {run.returncode})"
        return run.run_id, self.run_status(run.run_id)

    def run_status(self, run_id: int) -> str:
        """Status of one run as ``flwr list`` reports it (e.g. ``finished:completed``)."""
        try:
            return run_status(self.flwr_home, run_id, connection=CONNECTION)[1]
        except FlowerRunError as err:
            raise DeploymentError(str(err)) from err

    def close(self, grace_s: float = 15.0) -> None:
        """Stop every process this deployment started and all they spawned, all together.

        SIGTERM, up to ``grace_s`` to exit, then SIGKILL. Idempotent.
        """
        stop_trees(reversed(self._procs), signal.SIGTERM, grace_s)

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
