"""What a short simulation pays before and after its training, and that the shortcuts are safe.

``docl-flower`` starts a private Ray head next to the SuperLink, has ``flwr run`` bundle a
copy of the app's files, checks the training recipe while those start, and stops the run's
processes as soon as the ServerApp has written this run's results. Each shortcut must change
no result and leave nothing running.
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pytest
import torch

from docl_flower.core.evaluation.results import RunResult, write_results
from docl_flower.core.pipeline import config as config_module
from docl_flower.core.pipeline.config import compose_config
from docl_flower.federation.client_tasks import threads_from_environment
from docl_flower.federation.components import load_experiment
from docl_flower.operations import main as main_module
from docl_flower.operations import processes
from docl_flower.operations.main import ResultsOfRun
from docl_flower.operations.processes import DRAIN_S, process_table, stream_flwr_run
from docl_flower.operations.simulation import (
    private_head_wanted,
    ray_head,
    stage_app,
)

from .conftest import PROJECT_ROOT, processes_with
from .test_e2e import run_cli, small_run_args


def _fab_files(app: Path) -> dict[str, str]:
    """Path -> SHA-256 of every file of the bundle ``flwr run`` builds from ``app``."""
    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as fab:
        return {n: hashlib.sha256(fab.read(n)).hexdigest() for n in fab.namelist()}


def test_the_staged_app_bundles_exactly_what_the_project_folder_bundles(tmp_path):
    # Execute
    staged = stage_app(PROJECT_ROOT, tmp_path / "app")
    # Assert: same files with the same bytes, and none of the virtual environment.
    assert staged == tmp_path / "app"
    assert _fab_files(staged) == _fab_files(PROJECT_ROOT)
    copied = {p.relative_to(staged).parts[0] for p in staged.rglob("*") if p.is_file()}
    assert copied <= {"pyproject.toml", ".gitignore", "docl_flower", "conf"}
    assert (staged / "docl_flower" / "federation" / "server_app.py").is_file()


def test_an_app_without_fab_include_is_run_from_its_own_folder(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert stage_app(app, tmp_path / "staged") == app
    assert not (tmp_path / "staged").exists()


@pytest.mark.parametrize(
    ("address", "env", "wanted"),
    [
        (None, {}, True),
        (None, {"RAY_ADDRESS": "10.0.0.1:6379"}, False),
        ("local", {}, False),
        ("auto", {}, False),
        ("127.0.0.1:6379", {}, False),
    ],
)
def test_only_a_run_that_joins_no_cluster_gets_a_private_head(address, env, wanted):
    assert private_head_wanted(address, env) is wanted


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("", None), ("0", None), ("x", None)])
def test_the_client_runs_on_the_threads_its_runtime_gives_it(monkeypatch, value, expected):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        threads_from_environment()
        assert torch.get_num_threads() == (expected if expected is not None else 2)
    finally:
        torch.set_num_threads(before)


def _saved(tmp_path: Path, overrides: list[str]) -> tuple[Path, str]:
    from omegaconf import OmegaConf

    path = tmp_path / "experiment.yaml"
    OmegaConf.save(compose_config(overrides), path, resolve=True)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_config_checked_by_docl_flower_is_not_checked_again_while_unchanged(
    tmp_path, monkeypatch
):
    # Prepare: a saved config whose recipe only a build finds bad (an argument Adam does not
    # take), and a spy on the recipe check.
    path, digest = _saved(tmp_path, ["+train.optimizer.bogus=1"])
    calls = []
    real = config_module._check_recipe
    monkeypatch.setattr(config_module, "_check_recipe", lambda t: (calls.append(t), real(t)))
    # Execute / Assert: with its digest the recipe is not built again ...
    load_experiment(path, digest)
    assert calls == []
    # ... a changed file, a wrong digest or none: everything is checked, and the bad rate fails.
    for checked in (None, "0" * 64, digest[:-1] + ("0" if digest[-1] != "0" else "1")):
        with pytest.raises(ValueError, match=r"^train\.optimizer"):
            load_experiment(path, checked)
    path.write_text(path.read_text() + "\n# edited\n")
    with pytest.raises(ValueError, match=r"^train\.optimizer"):
        load_experiment(path, digest)
    assert len(calls) == 4


def test_a_bad_recipe_stops_the_superlink_and_ray_head_before_any_run(tmp_path, monkeypatch):
    # Prepare: a marker in the environment that every process the command starts inherits.
    name, value = "DOCL_TEST_MARKER", uuid.uuid4().hex
    marker = f"{name}={value}"
    monkeypatch.setenv(name, value)
    # Execute
    proc = run_cli("+train.optimizer.bogus=1", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    # Assert: one line naming the key, no run, nothing left running.
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode != 0
    assert len(output.splitlines()) == 1 and output.startswith("docl-flower: train.optimizer")
    assert "flwr run" not in (tmp_path / "run" / "main.log").read_text()
    assert not (tmp_path / "run" / "results.json").exists()
    assert processes_with(marker) == []


def test_the_private_ray_head_is_killed_with_its_workers_and_session_folder(tmp_path):
    # Execute: a head, one driver task in it, then the end of the block.
    with ray_head(tmp_path) as head:
        assert head.process.poll() is None
        assert head.temp_dir.is_dir()
        code = (
            f"import ray; ray.init(address={head.address!r}); "
            "print(ray.get(ray.remote(lambda: 41 + 1).remote()))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
        )
        assert out.stdout.strip().endswith("42"), out.stderr[-2000:]
    # Assert: the head and everything it started are gone, and so is its session folder.
    assert head.process.poll() is not None
    assert head.process.returncode == -signal.SIGKILL
    assert not head.temp_dir.exists()
    left = []
    for pid in process_table():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if head.temp_dir.name.encode() in cmdline:
            left.append(pid)
    assert left == [], left


@pytest.mark.slow
def test_a_run_gets_its_own_ray_head_and_the_same_results(multirun, tiny_root, tmp_path):
    """The default (a private head: the shared multirun's first job) and
    ``simulation.ray_address=local`` agree on everything."""
    assert multirun.proc.returncode == 0, multirun.proc.stderr[-3000:]
    private = json.loads((multirun.sweep / "0" / "results.json").read_text())
    out = tmp_path / "local"
    args = small_run_args(tiny_root, out)
    proc = run_cli(*args, "guard.alpha=1.0", "simulation.ray_address=local")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    local = json.loads((out / "results.json").read_text())
    for key in ("overall_accuracy", "per_class_accuracy", "guarded_accuracy", "registered"):
        assert private[key] == local[key], key
    assert private["ray_cluster"]["alive_nodes"] == 1
    assert private["failed"] == {}


# --- the end of a run: docl-flower stops it once the ServerApp has written its results

_FAKE_FLWR_RUN = """
import sys, time
print("Successfully started run 7", flush=True)
for i in range(600):
    print("log line", i, flush=True)
    time.sleep(0.1)
"""


def test_a_run_whose_app_is_done_is_stopped_without_waiting_for_flower(tmp_path):
    # Prepare: a stand-in for `flwr run --stream` that would stream for a minute, and a
    # done check that holds from the moment a file appears.
    flag = tmp_path / "done"
    asked: list[int] = []

    def done(run_id: int) -> bool:
        asked.append(run_id)
        return flag.exists()

    cmd = [sys.executable, "-c", _FAKE_FLWR_RUN]
    threading.Timer(1.0, flag.touch).start()
    # Execute
    started = time.monotonic()
    run = stream_flwr_run(cmd, {}, timeout_s=120, echo=io.StringIO(), done=done)
    # Assert: stopped within a few polls of the flag, with the run id it printed.
    assert time.monotonic() - started < 10
    assert run.app_done and run.run_id == 7
    assert run.returncode == -signal.SIGKILL
    assert set(asked) == {7}


def test_a_done_run_streams_on_until_the_apps_last_line_then_stops(tmp_path, monkeypatch):
    # Prepare: the app's last line reaches the log stream 0.5 s after its results exist; a
    # drain time long enough that only the last line can stop the run within the 10 s asserted.
    monkeypatch.setattr(processes, "DRAIN_S", 30.0)
    flag = tmp_path / "done"
    script = f"""
import os, time
print("Successfully started run 8", flush=True)
for i in range(600):
    if os.path.exists({str(flag)!r}):
        time.sleep(0.5)
        print("INFO: results written to somewhere", flush=True)
        time.sleep(60)
    print("log line", i, flush=True)
    time.sleep(0.1)
"""
    threading.Timer(0.5, flag.touch).start()
    out = io.StringIO()
    # Execute
    started = time.monotonic()
    run = stream_flwr_run(
        [sys.executable, "-c", script],
        {},
        timeout_s=120,
        echo=out,
        done=lambda _: flag.exists(),
        last_line=lambda line: "results written to" in line,
    )
    # Assert: the last line was streamed, and the run stopped soon after it (not after 60 s).
    assert run.app_done and run.run_id == 8
    assert out.getvalue().rstrip().endswith("results written to somewhere")
    assert time.monotonic() - started < 10


def test_a_done_run_whose_last_line_never_comes_is_stopped_after_the_drain_time(tmp_path):
    started = time.monotonic()
    run = stream_flwr_run(
        [sys.executable, "-c", _FAKE_FLWR_RUN],
        {},
        timeout_s=120,
        echo=io.StringIO(),
        done=lambda _: True,
        last_line=lambda line: False,
    )
    elapsed = time.monotonic() - started
    assert run.app_done and DRAIN_S <= elapsed < DRAIN_S + 8


def test_a_run_that_ends_before_its_app_is_done_reports_flowers_outcome(tmp_path):
    cmd = [sys.executable, "-c", "print('Successfully started run 3'); raise SystemExit(4)"]
    run = stream_flwr_run(cmd, {}, timeout_s=60, echo=io.StringIO(), done=lambda _: False)
    assert not run.app_done
    assert (run.run_id, run.returncode) == (3, 4)


def test_the_done_check_is_never_asked_before_the_run_has_an_id(tmp_path):
    asked: list[int] = []
    cmd = [sys.executable, "-c", "import time; print('no run started'); time.sleep(1)"]
    run = stream_flwr_run(cmd, {}, timeout_s=60, echo=io.StringIO(), done=asked.append)
    assert asked == [] and not run.app_done and run.run_id is None


def _results(run_id: int | None) -> RunResult:
    return RunResult(
        method="docl",
        overall_accuracy=0.5,
        per_class_accuracy={"0": 0.5},
        rounds=1,
        registered=[0],
        failed={},
        bytes_uploaded={},
        bytes_downloaded={},
        receives_others_parameters=False,
        train_seconds={},
        flower_run_id=run_id,
    )


def test_only_results_of_this_run_end_it(tmp_path):
    path = tmp_path / "results.json"
    check = ResultsOfRun(path)
    # No file yet, then an earlier run's file, a file without a run id, and garbage.
    assert not check(11)
    write_results(path, _results(10))
    assert not check(11)
    write_results(path, _results(None))
    assert not check(11)
    path.write_text("{truncated", encoding="utf-8")
    assert not check(11)
    path.write_bytes(b"\xff\x00" * 10)
    assert not check(11)
    # This run's results, written atomically by the ServerApp.
    write_results(path, _results(11))
    assert check(11)


def test_an_unchanged_results_file_is_not_read_again(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_results(path, _results(10))
    reads: list[Path] = []
    real = main_module.read_results

    def counting(p: Path) -> RunResult:
        reads.append(p)
        return real(p)

    monkeypatch.setattr(main_module, "read_results", counting)
    check = ResultsOfRun(path)
    for _ in range(5):
        assert not check(11)
    assert len(reads) == 1
