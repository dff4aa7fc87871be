"""Resident memory of a whole process tree, sampled while it runs (Linux ``/proc``).

A Flower simulation is many processes: ``docl-flower``, the SuperLink, SuperExec, the
simulation process (ServerApp and Ray driver), Ray's daemons (GCS, raylet, ...) and one worker
per client actor. :class:`TreeMemory` samples, in a background thread, every process below a
root PID (children by ``/proc/<pid>/stat``'s parent, and processes seen once below it that were
re-parented since) and keeps the peak of the sums:

- ``rss``: sum of resident set sizes (counts shared pages, e.g. torch's libraries mapped by
  every worker, once per process: an upper bound);
- ``pss``: sum of proportional set sizes from ``smaps_rollup`` (shared pages split between
  the processes that map them: what the tree costs the machine).

Reading ``smaps_rollup`` makes the kernel walk every mapping: about 50 ms of CPU for the 16
processes of a 10-user simulation, so PSS is read every ``pss_interval_s`` (2 s) and RSS every
``interval_s`` (0.5 s); sampling both every 0.5 s took 5% of a 2-core machine from the run it
measured.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")


def _parents() -> dict[int, int]:
    """PID -> parent PID of every process visible now."""
    out: dict[int, int] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(entry.name)] = int(fields[1])
    return out


def descendants(root: int, parents: dict[int, int] | None = None) -> set[int]:
    """``root`` and every process below it."""
    parents = _parents() if parents is None else parents
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    seen = {root} if root in parents else set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def _rss_bytes(pid: int) -> int:
    try:
        return int((PROC / str(pid) / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _pss_bytes(pid: int) -> int:
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class TreeMemory:
    """Peak memory of the tree below ``root``, sampled every ``interval_s`` until :meth:`stop`."""

    root: int
    interval_s: float = 0.5
    pss_interval_s: float = 2.0
    peak_rss: int = 0
    peak_pss: int = 0
    peak_processes: int = 0
    samples: int = 0
    _known: set[int] = field(default_factory=set)
    _pss_at: float = float("-inf")
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self, pss: bool | None = None) -> None:
        """Take one sample now: RSS, and PSS when ``pss`` or its interval has passed."""
        parents = _parents()
        tree = descendants(self.root, parents)
        # A process seen below the root stays counted while alive (re-parented daemons).
        self._known |= tree
        self._known &= parents.keys()
        pids = self._known
        self.peak_rss = max(self.peak_rss, sum(_rss_bytes(p) for p in pids))
        now = time.monotonic()
        if pss or (pss is None and now - self._pss_at >= self.pss_interval_s):
            self._pss_at = now
            self.peak_pss = max(self.peak_pss, sum(_pss_bytes(p) for p in pids))
        self.peak_processes = max(self.peak_processes, len(pids))
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def start(self) -> TreeMemory:
        """Sample in a background thread."""
        self._thread = threading.Thread(target=self._loop, name="tree-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (after one last sample)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.root in _parents():
            self.sample(pss=True)
