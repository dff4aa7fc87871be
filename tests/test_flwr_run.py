"""`flwr run .` in the project root, as a Flower user starts any app (fresh FLWR_HOME)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def flwr(home: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),  # an active venv
        "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    }
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def statuses(home: Path) -> list[str]:
    listed = flwr(home, "list", "local", "--format", "json", timeout=60)
    return [r["status"] for r in json.loads(listed.stdout)["runs"]]


@pytest.fixture
def flwr_home(tmp_path):
    home = tmp_path / "flwr-home"
    yield home
    # Flower's managed local SuperLink outlives `flwr run`: whoever starts it stops it, and
    # waits until it is gone (its fixed ports free) before the next test starts one.
    subprocess.run(["pkill", "-f", str(home)], check=False)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-f", str(home)], capture_output=True).returncode == 0:
        if time.monotonic() > deadline:
            subprocess.run(["pkill", "-KILL", "-f", str(home)], check=False)
            break
        time.sleep(0.2)


def test_plain_flwr_run_refuses_bad_overrides_then_composes_the_config_and_follows_the_federation(
    tiny_root, tmp_path, flwr_home
):
    # One managed local SuperLink for both runs (starting one costs about 20 s).
    # Prepare
    out = tmp_path / "run"
    overrides = (
        f"data_root={tiny_root} dataset.verify=false dataset.harmless.verify=false "
        "train.epochs=10 train.batch_size=16 train.min_steps=0"
        # weak autoencoders of tiny data (few steps on 60 images) hold more than 2% of the
        # tiny harmless set; the probe check has tests of its own
        " strategy.max_block_share=0.5"
    )
    # Execute: first a run whose overrides the ServerApp refuses.
    bad = flwr(
        flwr_home,
        "run",
        ".",
        "--stream",
        "--run-config",
        f"overrides='num_users=2 guard.alpha=0' out-dir='{tmp_path / 'bad'}'",
    )
    # Assert: it fails with the reason, and writes no results.
    assert "docl-flower: " in bad.stdout + bad.stderr and "alpha" in bad.stdout + bad.stderr
    assert statuses(flwr_home) == ["finished:failed"]
    assert not (tmp_path / "bad" / "results.json").exists()
    # Execute: the default local federation of flwr 1.42 has 2 simulated nodes.
    proc = flwr(
        flwr_home,
        "run",
        ".",
        "--stream",
        "--run-config",
        f"overrides='{overrides}' out-dir='{out}'",
    )
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["users_from_federation"] is True
    assert results["failed"] == {}
    assert results["config"]["num_users"] == 2 and results["registered"] == [0, 1]
    assert results["config"]["train"]["epochs"] == 10
    assert (out / "experiment.yaml").is_file() and (out / "filter" / "filter.json").is_file()
    assert sorted(statuses(flwr_home)) == ["finished:completed", "finished:failed"]
