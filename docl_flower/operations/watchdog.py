"""A watchdog process that stops a command's processes when the command dies, even by SIGKILL.

A command cannot clean up after a SIGKILL (or an OOM kill, or a crash of the interpreter), and
the processes it started do not all notice: Flower's SuperExec and Ray's daemons run in
sessions of their own, and once their parent died they are reparented to init. So the command
first starts this module as a small separate process (:meth:`Watchdog.start`), and marks
itself: every process it starts from then on inherits ``DOCL_FLOWER_RUN`` in its environment,
holding a token unique to this run (children of children inherit it too, whatever session
they move to). The watchdog holds the read end of a pipe whose write end only the command
holds (it is close-on-exec, so no started program inherits it). The watch ends

- at the first byte on the pipe: the command is leaving normally (:meth:`Watchdog.close`);
- at the end of the pipe: the command died, however it died;
- when the command's PID no longer names the process that started the watchdog (checked
  every :data:`POLL_S` seconds: a child forked without ``exec`` would keep the pipe open).

Then the watchdog stops every process whose ``/proc/<pid>/environ`` carries this run's token:
SIGTERM, up to :data:`GRACE_S` seconds to exit, then SIGKILL, looking again for processes
started meanwhile, for at most :data:`SWEEP_S` seconds in all; it then exits. It never signals
itself, the command, or a process without the token, and a PID is checked again through a
pidfd (which pins it) right before it is signalled.

Linux only (``/proc``); elsewhere :meth:`Watchdog.start` logs a warning and returns None.
This file uses the standard library only: the watchdog runs it by path, with ``python -I -S``,
so that it starts in milliseconds and imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path

log = logging.getLogger(__name__)

#: Environment variable holding the tokens of the runs a process belongs to (``a:b:...``).
MARKER_VAR = "DOCL_FLOWER_RUN"
#: Seconds between two looks at the command's PID while the pipe is quiet.
POLL_S = 0.5
#: Seconds the run's processes get to exit after SIGTERM, before SIGKILL.
GRACE_S = 2.0
#: Longest a sweep lasts (SIGTERM, grace, SIGKILL, looking again), in seconds.
SWEEP_S = 7.0
#: Byte the command writes when it leaves normally.
BYE = b"\x00"


# ------------------------------------------------------------------------------ /proc reading
def _start_time(pid: int) -> tuple[int, str] | None:
    """``(start time in clock ticks after boot, state)`` of ``pid``; None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    try:
        return int(fields[19]), fields[0]
    except (IndexError, ValueError):
        return None


def _running(pid: int, start: int) -> bool:
    """Whether the process that started at ``start`` still runs (a zombie has ended)."""
    info = _start_time(pid)
    return info is not None and info[0] == start and info[1] not in ("Z", "X", "x")


def carries(environ: bytes, token: str) -> bool:
    """Whether a NUL-separated environment block sets :data:`MARKER_VAR` with ``token``."""
    prefix = f"{MARKER_VAR}=".encode()
    wanted = token.encode()
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix) and wanted in entry[len(prefix) :].split(b":"):
            return True
    return False


def _environ(pid: int) -> bytes:
    """The environment ``pid`` was started with (empty when unreadable or a zombie)."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def marked_processes(token: str, exclude: Iterable[int] = ()) -> list[int]:
    """PIDs of the live processes whose environment carries ``token`` (not ``exclude``)."""
    skip = {os.getpid(), *exclude}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    return [
        int(name)
        for name in names
        if name.isdigit() and int(name) not in skip and carries(_environ(int(name)), token)
    ]


def _signal_marked(pid: int, token: str, sig: int) -> None:
    """Send ``sig`` to ``pid`` if, pinned by a pidfd, it still carries ``token``."""
    try:
        fd = os.pidfd_open(pid)  # the PID cannot be reused while the fd is open
    except (OSError, AttributeError):
        fd = None  # gone already, or no pidfd support: a check right before the kill
    try:
        if not carries(_environ(pid), token):
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


# ------------------------------------------------------------------------------ the watchdog
def sweep(
    token: str, exclude: Iterable[int] = (), grace_s: float = GRACE_S, limit_s: float = SWEEP_S
) -> list[int]:
    """Stop every process carrying ``token``: SIGTERM, ``grace_s``, SIGKILL; bounded.

    Looks again every 0.1 s, so that a process started meanwhile is signalled too; returns
    after at most ``limit_s`` seconds, with the PIDs that were signalled.
    """
    skip = set(exclude)
    began = time.monotonic()
    signalled: dict[int, int] = {}  # PID -> the strongest signal sent so far
    while time.monotonic() - began < limit_s:
        found = marked_processes(token, skip)
        if not found:
            break
        sig = signal.SIGTERM if time.monotonic() - began < grace_s else signal.SIGKILL
        for pid in found:
            if signalled.get(pid) != sig:
                _signal_marked(pid, token, sig)
                signalled[pid] = sig
        time.sleep(0.1)
    return sorted(signalled)


def _say(text: str) -> None:
    """One line on stderr (which may be a terminal that is gone)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"docl-flower watchdog: {text}\n")
        sys.stderr.flush()


def watch(fd: int, pid: int, start: int, token: str, poll_s: float = POLL_S) -> str:
    """Wait until the command ``pid`` (started at ``start``) leaves or dies; say how."""
    while True:
        try:
            ready, _, _ = select.select([fd], [], [], poll_s)
        except InterruptedError:  # pragma: no cover - select retries by itself (PEP 475)
            continue
        if ready:
            try:
                data = os.read(fd, 1)
            except OSError:
                data = b""
            return "left" if data else "died"
        if not _running(pid, start):
            return "died"


def main(argv: list[str]) -> int:
    """Entry point of the watchdog process: ``FD PID START TOKEN``."""
    for sig in (signal.SIGINT, signal.SIGHUP):  # a terminal's signals are the command's
        signal.signal(sig, signal.SIG_IGN)
    fd, pid, start, token = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    how = watch(fd, pid, start, token)
    killed = sweep(token, exclude=[pid])
    if killed:
        how = "left them running" if how == "left" else "died"
        _say(f"the command (PID {pid}) {how}: stopped {len(killed)} processes of its run {killed}")
    return 0


# ------------------------------------------------------------------------- the command's side
def supported() -> bool:
    """Whether processes can be found by their environment here (Linux ``/proc``)."""
    return Path(f"/proc/{os.getpid()}/environ").is_file() and hasattr(select, "select")


class Watchdog:
    """The command's end of a watchdog process (see the module docstring).

    Parameters
    ----------
    proc : subprocess.Popen
        The watchdog process.
    write_fd : int
        The write end of the pipe that the watchdog reads.
    token : str
        This run's token, in :data:`MARKER_VAR` of every process started from now on.
    previous : str or None
        :data:`MARKER_VAR` before this run added its token (restored by :meth:`close`).
    environ : MutableMapping
        The environment that was marked (``os.environ``).
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        write_fd: int,
        token: str,
        previous: str | None,
        environ: MutableMapping[str, str],
    ) -> None:
        self.proc = proc
        self.write_fd: int | None = write_fd
        self.token = token
        self.previous = previous
        self.environ = environ

    @classmethod
    def start(cls, environ: MutableMapping[str, str] | None = None) -> Watchdog | None:
        """Start the watchdog process and mark ``environ`` (default ``os.environ``).

        Returns None, with a warning, where the watchdog cannot work (no ``/proc``) or cannot
        start: the command still stops its processes when it exits or gets a signal, but
        not when it is killed.
        """
        environ = os.environ if environ is None else environ
        if not supported():
            log.warning(
                "no /proc on this system: the processes of this command are not stopped "
                "if it is killed (SIGKILL)"
            )
            return None
        me = _start_time(os.getpid())
        if me is None:  # pragma: no cover - /proc exists (supported())
            return None
        token = secrets.token_hex(8)
        read_fd, write_fd = os.pipe()  # both close-on-exec: no started program inherits them
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    __file__,
                    *map(str, (read_fd, os.getpid(), me[0])),
                    token,
                ],
                pass_fds=(read_fd,),
                close_fds=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                cwd="/",
                env=_without(environ, MARKER_VAR),
                start_new_session=True,  # a terminal's SIGINT / SIGHUP to the command's group
            )
        except OSError as err:
            os.close(write_fd)
            log.warning(
                "cannot start the watchdog (%s): a killed command leaves its processes", err
            )
            return None
        finally:
            os.close(read_fd)
        previous = environ.get(MARKER_VAR)
        environ[MARKER_VAR] = f"{previous}:{token}" if previous else token
        log.debug("watchdog %d guards the processes marked %s=%s", proc.pid, MARKER_VAR, token)
        return cls(proc, write_fd, token, previous, environ)

    def close(self, timeout_s: float = SWEEP_S + 3.0) -> None:
        """Tell the watchdog that the command leaves; wait for its last sweep; unmark.

        The command has stopped its processes by then: the sweep finds none, or stops what
        the command missed. Idempotent.
        """
        if self.write_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.write_fd, BYE)
            os.close(self.write_fd)
            self.write_fd = None
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the watchdog %d did not finish its sweep: killing it", self.proc.pid)
                self.proc.kill()
                self.proc.wait()
        if self.environ.get(MARKER_VAR, "").split(":")[-1:] == [self.token]:
            if self.previous is None:
                self.environ.pop(MARKER_VAR, None)
            else:
                self.environ[MARKER_VAR] = self.previous


def _without(environ: Mapping[str, str], name: str) -> dict[str, str]:
    return {key: value for key, value in environ.items() if key != name}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
