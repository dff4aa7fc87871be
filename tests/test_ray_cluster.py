"""A simulation on a Ray cluster that is already running (``simulation.ray_address``).

One test starts a one-node Ray head on loopback (``ray start --head --block``, the same head
that ``docl-flower`` starts for a run of its own: tracked as a process tree and killed at the
end, never ``ray stop``, which would stop every Ray instance of this user), runs a 3-user
experiment that joins it, and checks that the run's clients ran there: the ServerApp's Ray
runtime reports that head's address, and the clients' log lines are in the head's session
logs. The same run covers many users per class: 3 users share
class 0 and owner accuracy is reported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from docl_flower.operations.simulation import ray_head

from .test_e2e import run_cli, small_run_args

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path):
    """A Ray head on 127.0.0.1 with 2 CPUs and its own short temp folder (Ray's sockets)."""
    with ray_head(tmp_path, num_cpus=2) as head:
        yield head.address, head.temp_dir


def _session_logs(temp: Path) -> str:
    text = []
    for path in temp.glob("session_*/logs/worker-*"):
        text.append(path.read_text(errors="replace"))
    return "\n".join(text)


def test_a_run_joins_an_existing_ray_cluster_and_reports_owner_accuracy(
    cluster, tiny_root, tmp_path
):
    address, temp = cluster
    out = tmp_path / "run"
    args = [
        a
        for a in small_run_args(tiny_root, out)
        if not a.startswith(("num_users=", "train.min_steps="))
    ]  # the partition sets the users
    proc = run_cli(
        *args,
        f"simulation.ray_address={address}",
        "partition=users_per_class",
        "partition.users_per_class=3",
        "partition.classes=[0]",
        "train=scale",
        "train.min_steps=50",
        "train.calibration=train",
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    # Ray names the head by this machine's address, whatever interface it was reached on.
    assert results["ray_cluster"]["gcs_address"].rsplit(":", 1)[1] == address.rsplit(":", 1)[1]
    assert results["ray_cluster"]["alive_nodes"] == 1
    assert results["ray_cluster"]["cpus"] == 2.0
    assert results["registered"] == [0, 1, 2]
    assert results["registered_classes"] == {"0": [0], "1": [0], "2": [0]}
    assert results["per_class_accuracy"].keys() == {"0"}
    # Owner accuracy: the 30 test images of class 0 are split between the three users.
    assert 0.0 <= results["owner_accuracy"] <= 1.0
    assert 0.0 <= results["owner_guarded_accuracy"] <= results["owner_accuracy"]
    assert {"setup", "registration", "evaluation"} <= results["phase_seconds"].keys()
    # The clients ran as workers of that cluster: their log lines are in its session logs.
    lines = [f"user {u}: training class 0" for u in range(3)]
    deadline = time.time() + 20
    while not all(line in _session_logs(temp) for line in lines) and time.time() < deadline:
        time.sleep(1)
    logs = _session_logs(temp)
    assert all(line in logs for line in lines), logs[-2000:]


@pytest.mark.parametrize("address", ["not an address", "", "ray://", "host:port", "1.2.3.4"])
def test_a_bad_ray_address_is_refused_with_the_key(address):
    from docl_flower.core.pipeline.config import compose_config
    from docl_flower.federation.components import build_experiment

    cfg = compose_config([])
    cfg.simulation.ray_address = address
    with pytest.raises(ValueError, match=r"simulation\.ray_address must be"):
        build_experiment(cfg)


def test_ray_env_sets_or_clears_the_address():
    from docl_flower.operations.simulation import ray_env

    base = {"RAY_ADDRESS": "10.0.0.1:6379", "X": "1"}
    assert ray_env(base, None) == base
    assert ray_env(base, "local") == {"X": "1"}
    assert ray_env(base, "auto")["RAY_ADDRESS"] == "auto"
