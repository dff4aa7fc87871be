"""Launch ``docl-flower`` runs for the experiment scripts (figures, comparison, scale), one way.

Each run is the ``docl-flower`` command in a subprocess (a fresh Hydra and Flower per run),
writing into its own run folder; a finished run can be reused instead of repeated.
:func:`launch` returns the run's results; :func:`launch_measured` starts it the same way and
also samples the memory of its whole process tree (:class:`~.memory.TreeMemory`), logs its
output to ``run.log`` and keeps the figures in ``memory.json`` (for ``reuse``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from docl_flower.core.evaluation.results import RESULTS_FILE, RunResult, read_results
from docl_flower.operations.memory import TreeMemory

log = logging.getLogger(__name__)

#: The output of a measured run (its absence marks a folder that no benchmark wrote).
LOG_FILE = "run.log"
#: The measured run's memory figures, kept for ``reuse``.
MEMORY_FILE = "memory.json"


class RunFailedError(RuntimeError):
    """A ``docl-flower`` run exited with an error."""


@dataclass(frozen=True)
class TreeUsage:
    """What a measured run's process tree took: peak memory (sums over the tree), wall time."""

    peak_rss_bytes: int
    peak_pss_bytes: int
    peak_processes: int
    samples: int
    measured_wall_seconds: float

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TreeUsage:
        """Read the figures written by :meth:`to_dict` (``memory.json``)."""
        return cls(
            int(raw["peak_rss_bytes"]),
            int(raw["peak_pss_bytes"]),
            int(raw["peak_processes"]),
            int(raw["samples"]),
            float(raw["measured_wall_seconds"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready values."""
        return asdict(self)


def command(overrides: Sequence[str], run_dir: Path) -> list[str]:
    """The ``docl-flower`` command line of a run into ``run_dir``."""
    return [
        str(Path(sys.executable).parent / "docl-flower"),
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]


def fresh_run_dir(run_dir: Path) -> None:
    """An empty ``run_dir``: an earlier measured run there is removed.

    A run folder keeps its saved filter, and a run into it skips every user already
    registered there: it would time nothing. Only a folder that an earlier measured run wrote
    (its ``run.log``) is removed; any other non-empty folder is refused (``FileExistsError``).
    """
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / LOG_FILE).is_file():
            raise FileExistsError(f"{run_dir} is not empty and holds no earlier benchmark run")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _execute(
    cmd: list[str], output: IO[bytes] | None, measure: bool
) -> tuple[int, TreeMemory | None, float]:
    """Run ``cmd`` (output to ``output``, or inherited); its exit code, memory and seconds."""
    print("running:", " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.Popen(
        cmd,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        env=os.environ.copy(),
    )
    memory = TreeMemory(proc.pid).start() if measure else None
    try:
        code = proc.wait()
    except BaseException:  # Ctrl-C or a signal turned exception: the run goes too
        proc.kill()
        proc.wait()
        raise
    finally:
        if memory is not None:
            memory.stop()
    seconds = time.time() - start
    if code == 0:
        print(f"finished in {seconds:.0f}s", flush=True)
    return code, memory, seconds


def launch(
    overrides: Sequence[str], run_dir: Path, reuse: bool = False, needs: Sequence[str] = ()
) -> RunResult:
    """Run ``docl-flower OVERRIDES hydra.run.dir=RUN_DIR`` and return its results.

    With ``reuse``, a run folder that already holds ``results.json`` (and every file or
    folder named in ``needs``) is read instead of run again.
    """
    results = run_dir / RESULTS_FILE
    if reuse and results.is_file() and all((run_dir / n).exists() for n in needs):
        log.info("reusing %s", run_dir)
        return read_results(results)
    cmd = command(overrides, run_dir)
    code, _, _ = _execute(cmd, None, measure=False)
    if code != 0:
        raise RunFailedError(f"{' '.join(cmd)} failed with code {code}")
    return read_results(results)


def launch_measured(
    overrides: Sequence[str], run_dir: Path, reuse: bool = False
) -> tuple[RunResult, TreeUsage]:
    """:func:`launch` in a fresh ``run_dir``, its process tree's memory sampled while it runs.

    The output goes to ``RUN_DIR/run.log``, the figures to ``RUN_DIR/memory.json``; with
    ``reuse``, a folder holding both ``results.json`` and ``memory.json`` is read instead.
    """
    results, memo = run_dir / RESULTS_FILE, run_dir / MEMORY_FILE
    if reuse and results.is_file() and memo.is_file():
        log.info("reusing %s", run_dir)
        return read_results(results), TreeUsage.from_dict(json.loads(memo.read_text()))
    cmd = command(overrides, run_dir)
    fresh_run_dir(run_dir)
    with (run_dir / LOG_FILE).open("wb") as output:
        code, memory, seconds = _execute(cmd, output, measure=True)
    if code != 0:
        raise RunFailedError(f"{' '.join(cmd)} failed with code {code}; see {run_dir / LOG_FILE}")
    assert memory is not None
    usage = TreeUsage(
        memory.peak_rss, memory.peak_pss, memory.peak_processes, memory.samples, seconds
    )
    memo.write_text(json.dumps(usage.to_dict(), indent=2))
    return read_results(results), usage
