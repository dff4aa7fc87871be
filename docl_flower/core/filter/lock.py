"""One writer per saved filter: an exclusive ``flock`` next to the filter's folder (no Flower).

A :class:`~.store.PersistentFilter` saves after every registration; two runs that wrote one
folder at once would each overwrite the other's ``filter.json`` and silently drop its users.
So the process that writes a folder first takes the folder's *writer lock*, before it reads
the filter, and holds it while it writes; a second writer fails with one line that names the
holder (:class:`FilterLockedError`), or waits for the lock up to ``wait_s`` seconds when asked
to (``strategy.lock_wait_s``).

Two locks, two files next to the folder ``PARENT/NAME``
--------------------------------------------------------
- ``PARENT/.NAME.writer.lock``: held by the process that writes the filter (the ServerApp,
  through :class:`~.store.PersistentFilter`), from before it loads the filter until it closes it.
- ``PARENT/.NAME.run.lock``: held by a command that starts such a run (``docl-flower``) for the
  whole run (:func:`run_lock`), from before any Flower or Ray process starts until they are
  stopped. It cannot hold the writer lock itself: the ServerApp is another process and would
  be refused. A second ``docl-flower`` on the same folder therefore fails within a second,
  before it starts anything, for as long as the first one runs; while it holds the run lock it
  also checks, by taking and releasing it, that no writer that it did not start (a deployment's
  ServerApp, one left by a killed command) holds the writer lock. A writer that takes the
  writer lock after that check is still caught: the run's own ServerApp is then refused (or
  waits) with the same line, later.

The files lie next to the folder, not in it, so that a filter's folder holds the filter's
files only (copies, digests of its bytes and listings are unchanged by locking). They are never
deleted: deleting a lock file races with a process that has it open. While held, a lock file
holds its holder's pid, host and start time (JSON), read only for the message of a refused
acquirer; released, it is empty. ``flock`` is released by the kernel when its holder exits in
any way (SIGKILL included), so a crashed run never leaves a stale lock. It locks between
processes of one machine (on Linux also across NFS clients, where ``flock`` is emulated with
byte-range locks); it is advisory: only code that takes it is kept out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import numbers
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

#: Lock file of the process that writes a filter folder (:func:`lock_path`).
WRITER = "writer"
#: Lock file of the command that starts a run writing a filter folder (:func:`run_lock`).
RUN = "run"
KINDS = (WRITER, RUN)
#: How often a waiting acquirer tries the lock again (seconds).
POLL_S = 0.2
#: Most bytes of a lock file read for the holder's description.
HOLDER_MAX_BYTES = 4096
#: How long a refused acquirer waits for the holder to write its description (seconds): it
#: writes it just after it took the lock, so one that lost a race by microseconds finds the
#: file still empty.
HOLDER_WAIT_S = 0.5
#: How often it reads the file again meanwhile (seconds).
HOLDER_POLL_S = 0.01
#: Longest host name shown in a message (the DNS limit).
HOST_MAX_CHARS = 253
#: The setting a refused run is told about.
WAIT_SETTING = "strategy.lock_wait_s"

_HOST_CHARS = re.compile(r"[^A-Za-z0-9._-]")
#: What ``flock(LOCK_NB)`` fails with when another holds the lock (EACCES: some file systems).
_HELD = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})


class FilterLockedError(ValueError):
    """Another run holds the lock of a filter folder (a :class:`ValueError`).

    A ``ValueError`` because ``docl-flower`` reports a bad value found before Flower starts
    as one line (``docl-flower: MESSAGE``): a filter folder in use is one.
    """


def check_wait(wait_s: object) -> float:
    """``wait_s`` as seconds to wait for a lock: a finite number >= 0 (not a bool).

    Raises
    ------
    ValueError
        ``"lock_wait_s must be a finite number >= 0, got VALUE"``.
    """
    if isinstance(wait_s, bool) or not isinstance(wait_s, numbers.Real):
        raise ValueError(f"lock_wait_s must be a finite number >= 0, got {wait_s!r}")
    seconds = float(wait_s)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"lock_wait_s must be a finite number >= 0, got {wait_s!r}")
    return seconds


def lock_path(folder: Path, kind: str = WRITER) -> Path:
    """The lock file of ``kind`` (:data:`WRITER` or :data:`RUN`) of the filter in ``folder``.

    ``PARENT/.NAME.KIND.lock`` for the folder's absolute path ``PARENT/NAME`` (symbolic links
    resolved, so that two paths to one folder share its locks; ``~`` is not expanded, as the
    store does not expand it).
    """
    if kind not in KINDS:
        raise ValueError(f"lock kind must be one of {list(KINDS)}, got {kind!r}")
    where = folder.resolve()
    return where.parent / f".{where.name}.{kind}.lock"


def _describe_holder(path: Path) -> str:
    """``pid P on HOST since T`` from the lock file at ``path``, or ``holder unknown``.

    Reads the file again for up to :data:`HOLDER_WAIT_S` while it holds no description.
    """
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        shown = _read_holder(path)
        if shown is not None or time.monotonic() >= deadline:
            return shown or "holder unknown"
        time.sleep(HOLDER_POLL_S)


def _read_holder(path: Path) -> str | None:
    """The holder's description in the lock file at ``path`` now, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, HOLDER_MAX_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        info = json.loads(raw)
        pid, host, since = info["pid"], info["host"], info["since"]
    except (ValueError, TypeError, KeyError):  # empty: the holder has not written it yet
        return None
    if isinstance(pid, bool) or not isinstance(pid, int) or not isinstance(host, str):
        return None
    if isinstance(since, bool) or not isinstance(since, int | float) or not math.isfinite(since):
        return None
    shown = _HOST_CHARS.sub("?", host)[:HOST_MAX_CHARS] or "?"
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    except (OverflowError, OSError, ValueError):
        return None
    return f"pid {pid} on {shown} since {started}"


def _refusal(folder: Path, path: Path, waited_s: float) -> FilterLockedError:
    waited = f", still after waiting {waited_s:g} s" if waited_s > 0 else ""
    return FilterLockedError(
        f"filter {folder} is being written by another run ({_describe_holder(path)}){waited}; "
        f"wait for it or use {WAIT_SETTING}=SECONDS"
    )


class FilterLock:
    """An exclusive lock of one kind on a filter folder, held from creation to :meth:`release`.

    Parameters
    ----------
    folder : Path
        The filter's folder (need not exist; its parent is created when missing).
    wait_s : float
        How long to wait for the lock (seconds, >= 0); 0: fail at once when it is held.
    kind : str
        :data:`WRITER` (the process that writes the filter) or :data:`RUN` (the command that
        starts such a run).

    Raises
    ------
    FilterLockedError
        If another process holds the lock (after ``wait_s`` seconds), with its pid, host and
        start time.
    ValueError
        If ``wait_s`` is not a finite number >= 0, or the lock file cannot be opened or is not
        a regular file.
    """

    def __init__(self, folder: Path, wait_s: float = 0.0, kind: str = WRITER) -> None:
        wait = check_wait(wait_s)
        self.folder = folder
        self.kind = kind
        self.path = lock_path(folder, kind)
        self._fd: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # No symbolic link followed: the file is truncated, and must be this one.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise ValueError(
                f"filter {folder}: cannot open its lock file {self.path} ({err})"
            ) from err
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"filter {folder}: its lock file {self.path} is not a file")
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as err:
                    if err.errno not in _HELD:
                        raise ValueError(
                            f"filter {folder}: cannot lock {self.path} ({err})"
                        ) from err
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _refusal(folder, self.path, wait) from None
                    time.sleep(min(POLL_S, left))
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode() + b"\n", 0)
        except BaseException:
            os.close(fd)  # closing releases the lock if it was taken
            raise
        self._fd = fd

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (the file stays, empty); a no-op when already released."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> FilterLock:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # A lock object dropped without release (an exception between taking and a ``with``)
        # does not hold the folder until the process ends.
        fd = getattr(self, "_fd", None)
        if fd is not None:
            self._fd = None
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def run_lock(folder: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the run lock of ``folder`` for a command that starts a run writing it.

    Takes the :data:`RUN` lock (waiting up to ``wait_s``), then checks that the
    :data:`WRITER` lock is free by taking and releasing it (waiting for what is left of
    ``wait_s``), and holds the run lock until the block ends. See the module docstring for
    what this does and does not exclude.

    Raises
    ------
    FilterLockedError
        If another command runs on ``folder``, or another process writes it.
    """
    wait = check_wait(wait_s)
    deadline = time.monotonic() + wait
    with FilterLock(folder, wait, RUN):
        FilterLock(folder, max(0.0, deadline - time.monotonic()), WRITER).release()
        yield
