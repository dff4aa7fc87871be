"""Process plumbing shared by simulations and deployments, written once.

Starting a Flower executable in its own process group, waiting for its port, stopping the
process and everything it spawned, writing ``$FLWR_HOME/config.toml``, streaming ``flwr run``
and reading a run's final status (``flwr run --stream`` exits 0 even when the run failed).

Stopping is by process *tree*, not by process group: Flower starts ``flower-superexec``,
``flwr-serverapp`` and ``flwr-simulation`` in new sessions, and Ray daemons may do the same,
so a group kill leaves them running. Every started process is tracked: a background thread
records its descendants (PID and start time, read from ``/proc``) while it runs, so that a
process whose parent died (reparented to init) is still known. :func:`stop_trees` signals
every recorded process that is still alive, the descendants found at stop time and the
members of the sessions and groups they lead, waits a grace period, then SIGKILLs the rest.

:func:`exit_on_signals` turns SIGINT, SIGTERM and SIGHUP (a closed terminal or SSH
connection) into :class:`SignalExit` (exit code 128 + signal number) so that ``finally``
blocks and context managers run; critical sections (:func:`deferred_signals`, used while
starting and stopping processes) postpone the exception until they end, and a second signal
during the clean-up only hurries it (SIGKILL at once).

A command that is killed (SIGKILL, the OOM killer) runs no clean-up, so two more mechanisms
stop its processes then. :func:`exit_on_signals` first starts a :class:`~.watchdog.Watchdog`,
a separate process that outlives the command and stops every process carrying this run's
environment marker once the command is gone (Ray's daemons and Flower's SuperExec included,
whatever session they moved to). And on Linux every process started here gets a parent-death
signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)``, :func:`parent_death_signal`): the kernel
tells it at once when the command's main thread ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from .watchdog import Watchdog

log = logging.getLogger(__name__)


class FlowerRunError(RuntimeError):
    """A Flower process or run did not do what it should; the message says what and where."""


# ------------------------------------------------------------------------------------ signals
#: Signals that :func:`exit_on_signals` turns into a clean exit (SIGHUP where it exists: a
#: closed terminal or SSH connection).
EXIT_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGINT,
    signal.SIGTERM,
    *(getattr(signal, name) for name in ("SIGHUP",) if hasattr(signal, name)),
)


class SignalExit(SystemExit):
    """Raised in the main thread when an exit signal arrives; exit status ``128 + signum``.

    Parameters
    ----------
    signum : int
        The signal that ended the command.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


@dataclass
class _SignalState:
    depth: int = 0  # nesting of deferred_signals() in the main thread
    pending: int | None = None  # a signal that arrived inside deferred_signals()
    exiting: bool = False  # SignalExit raised: later signals only hurry the clean-up


_SIGNALS = _SignalState()
#: Set by a second signal: stop waiting for grace periods, SIGKILL at once.
_HURRY = threading.Event()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _SIGNALS.exiting or _SIGNALS.pending is not None:
        _HURRY.set()
        log.warning("%s received while stopping: killing the remaining processes now", name)
        return
    if _SIGNALS.depth > 0:
        _SIGNALS.pending = signum
        return
    _SIGNALS.exiting = True
    log.warning("%s received: stopping every process this command started", name)
    raise SignalExit(signum)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Postpone :class:`SignalExit` until the block ends (main thread; elsewhere a no-op).

    Used around starting a process and registering it, and around stopping processes, so
    that a signal cannot interrupt them half-way.
    """
    if not _in_main_thread():
        yield
        return
    _SIGNALS.depth += 1
    try:
        yield
    finally:
        _SIGNALS.depth -= 1
        if _SIGNALS.depth == 0 and _SIGNALS.pending is not None and not _SIGNALS.exiting:
            signum = _SIGNALS.pending
            _SIGNALS.exiting = True
            log.warning(
                "%s received: stopping every process this command started",
                signal.Signals(signum).name,
            )
            raise SignalExit(signum)


@contextlib.contextmanager
def exit_on_signals(signals: Iterable[int] = EXIT_SIGNALS, watchdog: bool = True) -> Iterator[None]:
    """Turn ``signals`` into :class:`SignalExit`; on the way out stop every tracked process.

    For a command's entry point (main thread only; elsewhere it only stops the processes).
    The exception unwinds the stack, so ``finally`` blocks and context managers stop what
    they started; whatever is still tracked afterwards is stopped here. The previous handlers
    are restored at the end, unless a signal started the exit: the processes are stopped by
    then, and later signals of these kinds are ignored (``SIG_IGN``) until the process ends.
    Neither the default nor a Python handler would do: the default lets a second SIGTERM,
    sent while the interpreter shuts down, kill the process by the signal (status -15 instead
    of the promised 143), and the interpreter itself resets Python handlers to the default
    early in its finalisation, while it keeps ``SIG_IGN``.

    With ``watchdog`` (main thread only), a :class:`~.watchdog.Watchdog` is started first:
    if this process is killed, the watchdog stops every process started inside the block
    (they carry its marker). On the way out it is told that the command leaves, sweeps once
    more (stopping whatever the process trees missed) and exits.
    """
    previous: dict[int, Any] = {}
    guard: Watchdog | None = None
    if _in_main_thread():
        if watchdog:
            guard = Watchdog.start()
        previous = {sig: signal.signal(sig, _on_signal) for sig in signals}
    try:
        yield
    finally:
        try:
            with deferred_signals():
                try:
                    stop_all()
                finally:
                    if guard is not None:
                        guard.close()
        finally:
            exiting = _SIGNALS.exiting
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_IGN if exiting else handler)
            if previous:
                _SIGNALS.depth, _SIGNALS.pending, _SIGNALS.exiting = 0, None, False
                _HURRY.clear()


# ------------------------------------------------------------------------- process trees
@dataclass(frozen=True)
class ProcInfo:
    """One line of ``/proc/<pid>/stat``: what identifies a process and its family."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int  # clock ticks after boot: with the PID, identifies the process
    state: str

    @property
    def dead(self) -> bool:
        """A zombie (exited, not yet reaped) or a dying process."""
        return self.state in ("Z", "X", "x")


def proc_info(pid: int) -> ProcInfo | None:
    """The ``/proc`` entry of ``pid``, or None when there is no such process (or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces and ')'
    try:
        return ProcInfo(
            pid, int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]), fields[0]
        )
    except (IndexError, ValueError):
        return None


def process_table() -> dict[int, ProcInfo]:
    """Every process of this machine by PID (empty where there is no ``/proc``)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    table = {}
    for name in names:
        if name.isdigit() and (info := proc_info(int(name))) is not None:
            table[info.pid] = info
    return table


@dataclass
class ProcessTree:
    """A process started here and every process it spawned that was seen so far.

    Parameters
    ----------
    proc : subprocess.Popen
        The started process (the root of the tree).
    own_group : bool
        Whether the root leads its own process group (started with ``start_new_session``).
    """

    proc: subprocess.Popen[Any]
    own_group: bool = True
    #: PID -> start time of every process recorded as part of the tree (dead ones included).
    members: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.proc.poll() is None and (info := proc_info(self.proc.pid)) is not None:
            self.members[info.pid] = info.start

    def _is_member(self, table: Mapping[int, ProcInfo], pid: int) -> bool:
        info = table.get(pid)
        return info is not None and self.members.get(pid) == info.start

    def refresh(self, table: Mapping[int, ProcInfo]) -> None:
        """Record the processes of ``table`` that belong to the tree.

        A process belongs when its parent is a live member, or when its group or session is
        led by a member (a leader that died leaves its PID reserved while the group lives).
        """
        me = os.getpid()
        changed = True
        while changed:
            changed = False
            leaders = {
                pid
                for pid, start in self.members.items()
                if pid not in table or table[pid].start == start
            }
            for info in table.values():
                if info.pid == me or info.dead or self._is_member(table, info.pid):
                    continue
                if self._is_member(table, info.ppid) or info.pgid in leaders or info.sid in leaders:
                    self.members[info.pid] = info.start
                    changed = True
        # Forget members gone for good: reaped and leading no group or session, or PID reused.
        in_use = {info.pgid for info in table.values()} | {info.sid for info in table.values()}
        for pid, start in list(self.members.items()):
            if (pid in table and table[pid].start != start) or (
                pid not in table and pid not in in_use
            ):
                del self.members[pid]

    def alive(self, table: Mapping[int, ProcInfo]) -> list[int]:
        """PIDs of the members that still run (zombies count as gone)."""
        return [pid for pid in self.members if self._is_member(table, pid) and not table[pid].dead]

    def send(self, sig: int, table: Mapping[int, ProcInfo]) -> None:
        """Send ``sig`` to every live member (to the root's group where there is no /proc)."""
        if not table:
            if self.own_group and self.proc.poll() is None:
                signal_group(self.proc, sig)
            return
        for pid in self.alive(table):
            _send(pid, self.members[pid], sig)


def _send(pid: int, start: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` if it is still the process that started at ``start``."""
    try:
        fd = os.pidfd_open(pid)  # pins the process: its PID cannot be reused meanwhile
    except OSError:
        fd = None  # gone already, or no pidfd support
    try:
        info = proc_info(pid)
        if info is None or info.start != start:
            return
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    finally:
        if fd is not None:
            os.close(fd)


_TREES: dict[int, ProcessTree] = {}
_TREES_LOCK = threading.Lock()
_TRACKER: threading.Thread | None = None
#: Seconds between two looks at the descendants of the tracked processes.
TRACK_INTERVAL_S = 1.0


def _track_loop() -> None:
    while True:
        time.sleep(TRACK_INTERVAL_S)
        with _TREES_LOCK:
            if not _TREES:
                continue
        table = process_table()
        with _TREES_LOCK:
            for tree in _TREES.values():
                tree.refresh(table)


def track(proc: subprocess.Popen[Any], own_group: bool = True) -> ProcessTree:
    """Record ``proc`` and, from now on, the processes it spawns (until it is stopped)."""
    global _TRACKER
    tree = ProcessTree(proc, own_group)
    with _TREES_LOCK:
        _TREES[proc.pid] = tree
        if _TRACKER is None:
            _TRACKER = threading.Thread(target=_track_loop, name="process-tracker", daemon=True)
            _TRACKER.start()
    return tree


def _untrack(proc: subprocess.Popen[Any]) -> ProcessTree:
    with _TREES_LOCK:
        tree = _TREES.pop(proc.pid, None)
    return tree if tree is not None and tree.proc is proc else ProcessTree(proc)


def _wait_gone(trees: list[ProcessTree], timeout_s: float, sig: int | None = None) -> None:
    """Wait until no tree has a live member, at most ``timeout_s`` (a second signal: stop)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for tree in trees:
            tree.proc.poll()  # reap the root as soon as it exits
        table = process_table()
        if not table:  # no /proc: the roots are all we can see
            if all(tree.proc.poll() is not None for tree in trees):
                return
        else:
            for tree in trees:
                known = set(tree.members)
                tree.refresh(table)
                if sig is not None and (new := set(tree.members) - known):
                    for pid in new:  # spawned during the shutdown: tell them too
                        _send(pid, tree.members[pid], sig)
            if not any(tree.alive(table) for tree in trees):
                return
        if time.monotonic() > deadline or (sig != signal.SIGKILL and _HURRY.is_set()):
            return
        time.sleep(0.2)


def stop_trees(
    procs: Iterable[subprocess.Popen[Any] | None],
    sig: int = signal.SIGTERM,
    grace_s: float = 15.0,
) -> None:
    """Stop each process and every process it spawned, all of them together.

    Sends ``sig`` to every live member, waits up to ``grace_s`` for them to exit, then
    SIGKILLs what is left. Idempotent and safe on processes that exited already; signals
    arriving meanwhile are deferred (a second one skips the grace period).
    """
    with deferred_signals():
        trees = [_untrack(proc) for proc in procs if proc is not None]
        if not trees:
            return
        table = process_table()
        for tree in trees:
            tree.refresh(table)
        if sig != signal.SIGKILL and not _HURRY.is_set():
            for tree in trees:
                tree.send(sig, table)
            _wait_gone(trees, grace_s, sig)
        table = process_table()
        for tree in trees:
            tree.refresh(table)
            tree.send(signal.SIGKILL, table)
        _wait_gone(trees, 10.0, signal.SIGKILL)
        table = process_table()
        if left := sorted(pid for tree in trees for pid in tree.alive(table)):
            log.warning("processes still alive after SIGKILL: %s", left)
        for tree in trees:
            with contextlib.suppress(subprocess.TimeoutExpired):
                tree.proc.wait(timeout=1.0)


def stop_tree(
    proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, grace_s: float = 15.0
) -> None:
    """Stop one process and every process it spawned (see :func:`stop_trees`)."""
    stop_trees([proc], sig, grace_s)


#: Former name of :func:`stop_tree` (it stopped the process group only).
stop_group = stop_tree


def stop_all(grace_s: float = 10.0) -> None:
    """Stop every process still tracked (started here and not stopped yet)."""
    with _TREES_LOCK:
        procs = [tree.proc for tree in _TREES.values()]
    if procs:
        log.info("stopping %d process tree(s) still running", len(procs))
        stop_trees(procs, grace_s=grace_s)


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


#: ``PR_SET_PDEATHSIG`` of ``<linux/prctl.h>``.
PR_SET_PDEATHSIG = 1
#: The signal a started process gets when this command's main thread ends.
PARENT_DEATH_SIGNAL = signal.SIGTERM


def _load_prctl() -> Any:
    """The C library's ``prctl`` (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _load_prctl()
_PDEATHSIG_WARNED = threading.Event()


def parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGTERM the child when this command ends.

    ``prctl(PR_SET_PDEATHSIG)`` (Linux; loaded through ctypes, checked at run time). Its
    caveats: it only reaches the direct child (not what that child spawns, which the
    :class:`~.watchdog.Watchdog` stops), and it fires when the *thread* that started the
    child ends, not the process: so it is only set for children started from the main
    thread, which ends with the process. A child whose parent died before the call kills
    itself at once. Returns None (a warning, once) where unsupported, or off the main thread.
    """
    if not _in_main_thread():
        return None
    if _PRCTL is None:
        if not _PDEATHSIG_WARNED.is_set():
            _PDEATHSIG_WARNED.set()
            log.warning(
                "no prctl(PR_SET_PDEATHSIG) here: started processes are not told "
                "when this command dies (the watchdog still stops them)"
            )
        return None
    prctl, parent = _PRCTL, os.getpid()

    def set_death_signal() -> None:  # runs in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0)
        if os.getppid() != parent:  # the command died before the call: too late to be told
            os.kill(os.getpid(), signal.SIGKILL)

    return set_death_signal


def start_process(
    cmd: list[str], log_path: Path, env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session, appending its output to ``log_path``; track it.

    Stop it with :func:`stop_tree` (or :func:`stop_all`), which stops what it spawned too.
    It inherits no file descriptor but its standard streams (the watchdog's pipe stays with
    this command) and gets a :func:`parent_death_signal`.
    """
    with deferred_signals(), log_path.open("ab") as handle:
        proc = subprocess.Popen(
            cmd,
            env=dict(env),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            preexec_fn=parent_death_signal(),
        )
        track(proc)
        return proc


def signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    """Send ``sig`` to the process group of ``proc`` (gone already: nothing to do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


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
    """What ``flwr run --stream`` printed: exit code, run id, last exception line.

    ``app_done``: the caller's ``done`` check said the app's work was complete, and ``flwr
    run`` was stopped then, without waiting for Flower's own teardown (``returncode`` is
    then that of the stopped process).
    """

    returncode: int
    run_id: int | None
    last_error: str
    app_done: bool = False


#: How often :func:`stream_flwr_run` asks its ``done`` check (seconds).
DONE_POLL_S = 0.1
#: How long it streams on, once ``done`` holds, for the app's last line to arrive (seconds).
DRAIN_S = 2.0


def stream_flwr_run(
    cmd: list[str],
    env: Mapping[str, str],
    timeout_s: float,
    echo: TextIO | None = None,
    log_path: Path | None = None,
    done: Callable[[int], bool] | None = None,
    last_line: Callable[[str], bool] | None = None,
) -> StreamedRun:
    """Run a ``flwr run ... --stream`` command, copy its output to ``echo`` / ``log_path``.

    ``flwr run`` runs in its own session and is tracked like every started process: when
    this function is left by an exception (a signal, say) it is stopped, with whatever it
    spawned. Raises :class:`FlowerRunError` when it runs longer than ``timeout_s`` (it is
    killed).

    ``done(run_id)``, asked every :data:`DONE_POLL_S` seconds once the run id is known,
    tells when the app has finished its work (``docl-flower``: its ``results.json`` for
    this run exists). ``flwr run`` is then stopped, and the result says ``app_done``:
    Flower's teardown after the ServerApp (actors, Ray, the run's status, the log stream's
    last polls) took 3-4 s of every run here, and the caller, who owns the SuperLink,
    discards all of it anyway. It is stopped as soon as a line for which ``last_line``
    holds has been streamed (the app's last log line: the output is then complete), at most
    :data:`DRAIN_S` seconds after ``done`` held; at once without ``last_line``.
    """
    run_id: int | None = None
    last_error = ""
    app_done = threading.Event()
    with deferred_signals():
        proc = subprocess.Popen(
            cmd,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            close_fds=True,
            preexec_fn=parent_death_signal(),
        )
        track(proc)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    watchdog = threading.Timer(timeout_s, kill)
    watchdog.start()
    finished = threading.Event()
    drained = threading.Event()  # the app's last line has been streamed
    if last_line is None:
        drained.set()

    def watch() -> None:
        assert done is not None
        while not finished.wait(DONE_POLL_S):
            if run_id is not None and done(run_id):
                app_done.set()
                drained.wait(DRAIN_S)
                with contextlib.suppress(OSError):
                    proc.kill()  # its output ends; the loop below reads it to the end
                return

    watcher = threading.Thread(target=watch, name="flwr-run-done", daemon=True)
    if done is not None:
        watcher.start()
    assert proc.stdout is not None
    streamed = False
    try:
        with contextlib.ExitStack() as stack:
            log_file = (
                stack.enter_context(log_path.open("a", encoding="utf-8")) if log_path else None
            )
            for line in proc.stdout:
                if echo is not None:
                    echo.write(line)
                    echo.flush()
                if log_file is not None:
                    log_file.write(line)
                if match := _ERROR_LINE.match(line.rstrip()):
                    last_error = f"{match.group(1)}: {match.group(3)}"
                if run_id is None and (found := _STARTED.search(line)):
                    run_id = int(found.group(1))
                if last_line is not None and last_line(line):
                    drained.set()
        streamed = True
    finally:
        watchdog.cancel()
        finished.set()
        drained.set()  # the output has ended: nothing more to wait for
        if watcher.is_alive():
            watcher.join()
        try:
            if streamed:  # end of its output: it exits by itself
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=60.0)
        finally:
            try:
                stop_tree(proc, grace_s=5.0)  # left by an exception: stop it (else: a no-op)
            finally:
                proc.stdout.close()
    returncode = proc.wait()
    if timed_out.is_set():
        raise FlowerRunError(f"flwr run did not finish in {timeout_s:.0f}s")
    return StreamedRun(returncode, run_id, last_error, app_done.is_set())


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
