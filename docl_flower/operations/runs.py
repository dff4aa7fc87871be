"""Launch ``docl-flower`` runs for the experiment scripts (figures, comparison), one way.

Each run is the ``docl-flower`` command in a subprocess (a fresh Hydra and Flower per run),
writing into its own run folder; a finished run can be reused instead of repeated.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from docl_flower.core.evaluation.results import RESULTS_FILE, RunResult, read_results

log = logging.getLogger(__name__)


class RunFailedError(RuntimeError):
    """A ``docl-flower`` run exited with an error."""


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
    cmd = [
        str(Path(sys.executable).parent / "docl-flower"),
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]
    print("running:", " ".join(cmd), flush=True)
    start = time.time()
    code = subprocess.run(cmd, check=False, env=os.environ.copy()).returncode
    if code != 0:
        raise RunFailedError(f"{' '.join(cmd)} failed with code {code}")
    print(f"finished in {time.time() - start:.0f}s", flush=True)
    return read_results(results)
