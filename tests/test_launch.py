"""The one launch-and-measure path (operations/runs.py) with a stand-in for ``docl-flower``.

The stand-in is a small Python program that holds some memory, prints, counts its starts and
writes a ``results.json``: the path (command, log, memory sampling, reuse, failure) is the
real one, the run costs a second instead of a Flower simulation.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import pytest

from docl_flower.operations import runs
from docl_flower.operations.memory import TreeMemory
from docl_flower.operations.runs import (
    LOG_FILE,
    MEMORY_FILE,
    RunFailedError,
    TreeUsage,
    fresh_run_dir,
    launch,
    launch_measured,
)

#: Memory the stand-in holds while it runs (the sampled peak must see it).
HELD_MIB = 64

STAND_IN = """
import json, sys, time
from pathlib import Path
run_dir = Path(sys.argv[1])
run_dir.mkdir(parents=True, exist_ok=True)
starts = run_dir.parent / (run_dir.name + ".starts")
starts.write_text(str(int(starts.read_text()) + 1 if starts.exists() else 1))
held = bytearray({held} * 1024 * 1024)
print("stand-in started", flush=True)
if "hold" in sys.argv[2:]:
    time.sleep(0.4)  # several samples of the tree (one every 0.05 s here)
if "fail" in sys.argv[2:]:
    sys.exit(3)
(run_dir / "results.json").write_text(json.dumps({{
    "method": "docl", "overall_accuracy": 0.5, "per_class_accuracy": {{"0": 0.5}},
    "rounds": 1, "registered": [0], "failed": {{}}, "bytes_uploaded": {{"0": 7}},
    "bytes_downloaded": {{"0": 0}}, "receives_others_parameters": False,
    "train_seconds": {{"0": 0.1}},
}}))
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    program = tmp_path / "stand_in.py"
    program.write_text(STAND_IN.format(held=HELD_MIB))
    monkeypatch.setattr(runs, "TreeMemory", partial(TreeMemory, interval_s=0.05))
    monkeypatch.setattr(
        runs,
        "command",
        lambda overrides, run_dir: [sys.executable, "-S", str(program), str(run_dir), *overrides],
    )
    return lambda run_dir: int((run_dir.parent / (run_dir.name + ".starts")).read_text())


def test_a_measured_run_logs_samples_its_tree_and_is_reused(tmp_path, stand_in):
    run_dir = tmp_path / "runs" / "users-10"
    # Execute
    result, usage = launch_measured(["hold"], run_dir)
    # Assert: the results, the log, the sampled memory, and the figures kept for reuse.
    assert result.registered == [0] and result.bytes_uploaded == {"0": 7}
    assert "stand-in started" in (run_dir / LOG_FILE).read_text()
    assert usage.peak_rss_bytes >= HELD_MIB * 2**20 and usage.peak_processes >= 1
    assert usage.samples >= 3 and usage.measured_wall_seconds >= 0.4
    assert TreeUsage.from_dict(json.loads((run_dir / MEMORY_FILE).read_text())) == usage
    # A reused folder is read, not run again; without reuse it starts afresh.
    again, same = launch_measured(["hold"], run_dir, reuse=True)
    assert stand_in(run_dir) == 1 and same == usage and again.registered == [0]
    _, other = launch_measured([], run_dir)
    assert stand_in(run_dir) == 2 and other != usage


def test_a_failed_run_names_its_log_and_a_plain_launch_reuses_what_it_needs(tmp_path, stand_in):
    with pytest.raises(RunFailedError, match=r"failed with code 3; see .*run\.log"):
        launch_measured(["fail"], tmp_path / "bad")
    run_dir = tmp_path / "plain"
    assert launch([], run_dir).overall_accuracy == 0.5
    launch([], run_dir, reuse=True)
    assert stand_in(run_dir) == 1
    # A folder that lacks what the caller needs is run again.
    launch([], run_dir, reuse=True, needs=["filter"])
    assert stand_in(run_dir) == 2


def test_a_measured_run_starts_from_an_empty_folder(tmp_path):
    # An earlier run's folder (its saved filter would make the next run skip every user).
    earlier = tmp_path / "users-10"
    (earlier / "filter").mkdir(parents=True)
    (earlier / LOG_FILE).write_text("earlier run")
    fresh_run_dir(earlier)
    assert earlier.is_dir() and list(earlier.iterdir()) == []
    # A folder the benchmark did not write is never removed.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="holds no earlier benchmark run"):
        fresh_run_dir(other)
    assert (other / "notes.txt").read_text() == "keep"


def test_the_command_is_the_installed_docl_flower_into_the_run_folder(tmp_path):
    cmd = runs.command(["seed=1"], tmp_path)
    assert Path(cmd[0]).name == "docl-flower" and Path(cmd[0]).parent == Path(sys.executable).parent
    assert cmd[1:] == ["seed=1", f"hydra.run.dir={tmp_path}"]
