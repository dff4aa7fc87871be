"""Scale: many users per class, owner accuracy, the send window, the plain loop, tree memory,
and the scale benchmark's figures, table, targets and report (experiments/scale.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import Message

from docl_flower.core.data.partitions import Partition, owner_shards, users_per_class_partition
from docl_flower.core.evaluation.metrics import evaluate, owner_accuracy, owner_guarded_accuracy
from docl_flower.core.evaluation.results import RunResult
from docl_flower.core.filter.global_filter import ArgminGuard, ScoredFilter
from docl_flower.core.pipeline.config import compose_config
from docl_flower.core.pipeline.plain import concurrency, run_plain, train_user
from docl_flower.experiments import scale
from docl_flower.federation.components import build_experiment
from docl_flower.federation.grids import SimulationGrid, StreamingGrid
from docl_flower.operations.main import send_window
from docl_flower.operations.memory import TreeMemory, descendants
from docl_flower.operations.runs import TreeUsage

from .conftest import PROJECT_ROOT

# ------------------------------------------------------------------ partition and owners


def test_users_per_class_gives_each_user_a_disjoint_shard_of_one_class():
    part = users_per_class_partition(users_per_class=4, num_classes=3)
    table = part.assignment(3)
    assert table == {u: (u // 4,) for u in range(12)}
    labels = np.repeat(np.arange(3), 40)
    exp_shards = part.shards
    from docl_flower.core.data.partitions import user_class_indices

    held = [user_class_indices(labels, u // 4, u, seed=0, shards=exp_shards) for u in range(12)]
    assert all(idx.size == 10 for idx in held)
    assert len(np.unique(np.concatenate(held))) == 120  # disjoint and complete
    owners = owner_shards(labels, table, exp_shards, seed=0)
    for u, idx in enumerate(held):
        assert (owners[idx] == u).all()  # the test split is cut by the same rule


def test_class_shards_keep_the_shard_size_and_leave_the_rest_without_owner():
    part = users_per_class_partition(users_per_class=2, num_classes=2, class_shards=10)
    labels = np.repeat(np.arange(2), 100)
    owners = owner_shards(labels, part.assignment(2), part.shards, seed=3)
    assert (owners >= 0).sum() == 40 and sorted(np.unique(owners)) == [-1, 0, 1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"users_per_class": 0}, "users_per_class must be >= 1"),
        ({"users_per_class": 2, "class_shards": 1}, "class_shards=1 must be 0 or >="),
        ({"users_per_class": 2, "classes": [1, 1]}, "distinct"),
        ({"users_per_class": 2, "classes": []}, "distinct"),
    ],
)
def test_bad_users_per_class_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        users_per_class_partition(num_classes=3, **kwargs).assignment(3)


def test_a_hand_made_partition_that_breaks_the_blocks_is_refused():
    part = Partition(
        num_users=4, user_classes=[[0], [1], [0], [1]], shared_classes=True, users_per_class=2
    )
    with pytest.raises(ValueError, match="must own the one class of users"):
        part.assignment(2)


class _Filter(ScoredFilter):
    def __init__(self) -> None:
        # Two users of class 0 (users 0, 1), one of class 1 (user 2).
        super().__init__(
            torch.tensor([0, 0, 1]),
            torch.tensor([0, 1, 2]),
            torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
            torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64),
        )


def test_owner_accuracy_asks_for_the_owners_autoencoder_not_just_the_class():
    flt = _Filter()
    scores = torch.tensor(
        [
            [0.9, 3.0, 5.0],  # owner 0, best: user 0 (right owner, inside)
            [0.9, 3.0, 5.0],  # owner 1, best: user 0 (right class, wrong owner)
            [5.0, 5.0, 9.0],  # owner 2, best: user 0 (wrong class, outside the interval)
            [5.0, 5.0, 0.2],  # no owner: not counted
        ]
    )
    owners = torch.tensor([0, 1, 2, -1])
    assert owner_accuracy(flt, scores, owners) == pytest.approx(1 / 3)
    guard = ArgminGuard(alpha=1.5, sided="one")
    assert owner_guarded_accuracy(flt, guard, scores, owners) == pytest.approx(1 / 3)
    ev = evaluate_scores(flt, guard, scores, torch.tensor([0, 0, 1, 1]), owners)
    assert ev.owner_accuracy == pytest.approx(1 / 3)
    assert ev.overall_accuracy == pytest.approx(3 / 4)  # rows 0, 1 and 3
    with pytest.raises(ValueError, match="no test image has an owner"):
        owner_accuracy(flt, scores, torch.full((4,), -1))


def evaluate_scores(flt, guard, scores, labels, owners):
    class Fixed(_Filter):
        def scores(self, x: torch.Tensor) -> torch.Tensor:
            return scores

    return evaluate(Fixed(), guard, scores, labels, None, (), owners)


# ------------------------------------------------------------------ the send window


def _reply(message_id: str, node: int) -> Mock:
    m = Mock(spec=Message)
    m.metadata.reply_to_message_id = message_id
    m.metadata.src_node_id = node
    return m


def test_a_send_window_keeps_few_messages_in_flight_and_sends_them_all():
    inner = Mock()
    in_flight: list[str] = []
    most = [0]
    counter = iter(range(1000))

    def push(batch):
        ids = [f"m{next(counter)}" for _ in batch]
        for i, m in zip(ids, batch, strict=True):
            in_flight.append(i)
            nodes[i] = m.metadata.dst_node_id
        most[0] = max(most[0], len(in_flight))
        return ids

    def pull(ids):
        # One reply per poll, the oldest message first.
        if not in_flight:
            return []
        i = in_flight.pop(0)
        return [_reply(i, nodes[i])]

    nodes: dict[str, int] = {}
    inner.push_messages.side_effect = push
    inner.pull_messages.side_effect = pull
    seen: list[tuple[int, int | None]] = []
    grid = StreamingGrid(
        SimulationGrid(inner, 3), lambda m, d: seen.append((m.metadata.src_node_id, d)), poll_s=0.0
    )
    sent = []
    for node in range(10):
        m = Mock()
        m.metadata.dst_node_id = node
        sent.append(m)
    replies = list(grid.send_and_receive(sent, timeout=10.0))
    assert len(replies) == 10 and most[0] == 3
    assert seen == [(n, n) for n in range(10)]


def test_the_window_follows_the_client_slots_and_is_wider_on_a_joined_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    exp = build_experiment(compose_config([]))
    assert send_window(exp.simulation, cpus=2) == 8
    assert send_window(exp.simulation, cpus=16) == 64
    joined = build_experiment(compose_config(["simulation.ray_address=auto"]))
    assert send_window(joined.simulation, cpus=2) == 64
    fixed = build_experiment(compose_config(["simulation.send_window=0"]))
    assert send_window(fixed.simulation, cpus=2) == 0
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert send_window(exp.simulation, cpus=2) == 64


# ------------------------------------------------------------------ the plain loop


def test_the_plain_loop_trains_every_user_and_evaluates_with_owners(tiny_root):
    exp = build_experiment(
        compose_config(
            [
                "partition=users_per_class",
                "partition.users_per_class=2",
                "partition.classes=[0,1]",
                "train=scale",
                "train.min_steps=20",
                f"data_root={tiny_root}",
                "dataset.verify=false",
                "dataset.harmless.verify=false",
            ]
        )
    )
    assert concurrency(exp, cpus=2) == (2, 1)
    run = run_plain(exp)
    assert sorted(r.user_id for r in run.registrations) == [0, 1, 2, 3]
    assert [r.num_examples for r in run.registrations] == [30] * 4  # 60 per class, 2 users
    assert run.evaluation.owner_accuracy is not None
    assert 0.5 < run.evaluation.overall_accuracy <= 1.0
    assert set(run.phase_seconds) == {"startup", "training", "evaluation", "total"}
    # The same seeds give the same autoencoder in this process as in the pool's workers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = train_user(exp.client_spec, 2)
    finally:
        torch.set_num_threads(threads)
    (first,) = [r for r in run.registrations if r.user_id == 2]
    assert again.registrations[0].err_mean == first.err_mean


# ------------------------------------------------------------------ memory of a tree


def test_tree_memory_counts_children_and_grandchildren():
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'b = bytearray(200 * 1024 * 1024); import time; time.sleep(30)'])\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        memory = TreeMemory(proc.pid, interval_s=0.1).start()
        deadline = time.time() + 20
        while memory.peak_rss < 200 * 1024 * 1024 and time.time() < deadline:
            time.sleep(0.2)
        memory.stop()
        assert len(descendants(proc.pid)) == 2
        assert memory.peak_rss >= 200 * 1024 * 1024 and memory.peak_processes == 2
        assert memory.peak_pss > 150 * 1024 * 1024
    finally:
        for pid in descendants(proc.pid):
            subprocess.run(["kill", str(pid)], check=False)
        proc.wait()


def test_tree_memory_reads_pss_only_every_pss_interval(monkeypatch):
    from docl_flower.operations import memory as memory_module

    reads = []
    monkeypatch.setattr(memory_module, "_pss_bytes", lambda pid: reads.append(pid) or 1)
    memory = TreeMemory(os.getpid(), interval_s=0.01, pss_interval_s=3600.0)
    memory.sample()
    first = len(reads)  # one read per process of the tree (this one, and any child)
    assert first >= 1
    for _ in range(4):
        memory.sample()
    assert len(reads) == first and memory.samples == 5  # the first sample only
    memory.sample(pss=True)
    assert len(reads) > first and memory.peak_pss >= 1


# ------------------------------------------------------------------ the benchmark's report


def _row(name, users, wall, pss, ratio=None):
    r = {
        "name": name,
        "users": users,
        "flower_wall_seconds": wall,
        "flower_seconds_per_user": wall / users,
        "peak_rss_gib": pss * 1.5,
        "peak_pss_gib": pss,
        "bytes_uploaded_per_user": 203968.0,
        "bytes_downloaded_total": 0,
        "class_accuracy": 0.96,
        "owner_accuracy": 0.1,
        "flower_breakdown": {
            "before_first_message": 30.0,
            "registration": wall - 40,
            "server_handling": 1.0,
            "evaluation": 5.0,
        },
    }
    if ratio is not None:
        r.update({"overhead_ratio": ratio, "plain_seconds": wall / ratio})
    return r


def test_the_targets_are_judged_from_the_measured_rows():
    rows = [
        _row("users-10", 10, 60.0, 2.0),
        _row("users-1000", 1000, 1900.0, 9.0, ratio=1.4),
        _row("default-10", 10, 100.0, 2.0, ratio=1.35),
    ]
    checks = scale.verdicts(rows)
    assert checks["1000 users: wall minutes"]["holds"] is False  # 31.7 min
    assert checks["1000 users: peak memory GiB (PSS)"]["holds"] is False
    assert checks["1000 users: Flower / plain"]["holds"] is True
    assert checks["s/user at 1000 / s/user at 10"]["value"] == pytest.approx(1.9 / 6.0)
    assert checks["10 users, default recipe: Flower / plain"]["holds"] is False
    text = scale.table(rows)
    assert text.count("\n") == 4 and "| users-1000 | 1000 | 1900.0 |" in text
    with pytest.raises(scale.ScaleError, match="multiple of 10"):
        scale.size_overrides(15, 100, [])
    with pytest.raises(scale.ScaleError, match="at most 10 \\* 100"):
        scale.size_overrides(1010, 100, [])
    assert scale.size_overrides(1000, 100, ["seed=3"]) == [
        "partition=users_per_class",
        "partition.users_per_class=100",
        "partition.class_shards=100",
        "train=scale",
        "seed=3",
    ]


def test_repeated_default_runs_are_judged_on_their_median_and_all_shown():
    rows = [
        _row("default-10", 10, 60.0, 2.0, ratio=1.37),
        _row("default-10 #2", 10, 54.0, 2.0, ratio=1.25),
        _row("default-10 #3", 10, 55.0, 2.0, ratio=1.21),
    ]
    checks = scale.verdicts(rows)
    [(name, check)] = checks.items()
    assert name.endswith("(median of 3 paired runs: 1.21-1.37)")
    assert check["value"] == pytest.approx(1.25) and check["holds"] is True
    # Two slow runs of three fail it: a median, not the best run.
    rows[1]["overhead_ratio"] = 1.31
    assert scale.verdicts(rows)[name]["holds"] is False
    assert scale.table(rows).count("| default-10") == 3


def _result(**extra):
    return RunResult.from_dict(
        {
            "method": "docl",
            "overall_accuracy": 0.9,
            "per_class_accuracy": {"0": 0.9},
            "rounds": 1,
            "registered": [0, 1, 2, 3],
            "failed": {"4": "timeout"},
            "bytes_uploaded": {"0": 100, "1": 300, "2": 200, "3": 200},
            "bytes_downloaded": {"0": 0, "1": 0, "2": 5, "3": 0},
            "receives_others_parameters": False,
            "train_seconds": {"0": 1.0, "1": 2.0, "2": 3.0, "3": 4.0},
            "owner_accuracy": 0.25,
            "wall_seconds": 80.0,
            "server_seconds": 60.0,
            "phase_seconds": {
                "setup": 2.0,
                "wait_for_nodes": 3.0,
                "registration": 40.0,
                "server_handling": 1.5,
                "evaluation": 6.0,
            },
            **extra,
        }
    )


USAGE = TreeUsage(3 * 2**30, 2 * 2**30, 12, 100, 85.0)


def test_a_row_is_computed_from_the_runs_results_and_its_process_tree():
    row = scale.flower_figures("users-10", ["seed=1"], _result(), USAGE)
    assert row["users"] == 4 and row["failed"] == 1
    assert row["flower_wall_seconds"] == 80.0  # the run's own clock, not the launcher's
    assert row["flower_seconds_per_user"] == 20.0
    assert (row["peak_rss_gib"], row["peak_pss_gib"], row["peak_processes"]) == (3.0, 2.0, 12)
    assert row["bytes_uploaded_per_user"] == 200.0 and row["bytes_downloaded_total"] == 5
    # Outside the ServerApp (80 - 60) plus its setup (2) and the wait for the nodes (3).
    assert row["flower_breakdown"]["before_first_message"] == 25.0
    assert row["flower_breakdown"]["client_train_seconds_sum"] == 10.0
    plain = Mock(workers=2, phase_seconds={"training": 32.0, "total": 50.0})
    plain.evaluation.overall_accuracy = 0.91
    more = scale.plain_figures(row, plain, 2**30, {"max_abs_mu_difference": 0.0})
    assert more["overhead_ratio"] == 80.0 / 50.0 and more["plain_peak_pss_gib"] == 1.0
    assert more["per_message_overhead_seconds"] == (40.0 - 32.0) / 4
    assert more["max_abs_mu_difference"] == 0.0 and more["plain_class_accuracy"] == 0.91
    # Without its own clock the launcher's counts; a run that timed nothing is refused.
    assert (
        scale.flower_figures("x", [], _result(wall_seconds=None), USAGE)["flower_wall_seconds"]
        == 85.0
    )
    with pytest.raises(scale.ScaleError, match="2 users were already registered"):
        scale.flower_figures("x", [], _result(already_registered=[5, 6]), USAGE)


def test_the_benchmark_runs_its_rows_in_order_and_writes_json_and_summary(tmp_path):
    settings = scale.ScaleSettings(
        users=(10, 1000), out=tmp_path, default_repeats=2, extra=("a=1",)
    )
    seen, shown = [], []

    def measure(name, overrides, settings, folder):
        seen.append((name, overrides[-1], folder))
        users = 1000 if name == "users-1000" else 10
        return _row(name, users, 1500.0 if users == 1000 else 60.0, 3.0, ratio=1.2)

    report = scale.run_scale(settings, progress=shown.append, measure=measure)
    assert seen == [
        ("users-10", "a=1", "users-10"),
        ("users-1000", "a=1", "users-1000"),
        ("default-10", "a=1", "default-10"),
        ("default-10 #2", "a=1", "default-10-2"),
    ]
    assert len(shown) == 4 and shown[-1].count("\n") == 5  # the table after every row
    written = json.loads((tmp_path / "bench_scale.json").read_text())
    assert set(written) == {"machine", "rows", "targets"} == set(report)
    assert {"cpu", "cores", "memory_gib", "load_average_start", "load_average_end"} <= set(
        written["machine"]
    )
    assert [r["name"] for r in written["rows"]] == [name for name, *_ in seen]
    assert written["targets"]["1000 users: wall minutes"] == {
        "value": 25.0,
        "limit": 30.0,
        "holds": True,
    }
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# Scale benchmark (`make scale`)")
    assert "| 1000 users: wall minutes | 25.000 | 30.0 | yes |" in summary
    assert "| s/user at 1000 / s/user at 10 | 0.250 | 1.5 | yes |" in summary


def test_the_script_refuses_bad_settings_before_any_run(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_scale", PROJECT_ROOT / "scripts" / "bench_scale.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for argv, message in (
        (["--users", "15"], "multiple of 10"),
        (["--users", "--default-repeats", "0"], "at least 1"),
    ):
        with pytest.raises(SystemExit, match=message):
            script.main([*argv, "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_the_run_table_shows_owner_accuracy_and_dp_when_present():
    from docl_flower.core.evaluation.results import RunResult
    from docl_flower.operations.main import format_table

    base = {
        "method": "docl",
        "overall_accuracy": 0.9,
        "per_class_accuracy": {"0": 0.9},
        "rounds": 1,
        "registered": [0, 1],
        "failed": {},
        "bytes_uploaded": {"0": 1, "1": 1},
        "bytes_downloaded": {"0": 0, "1": 0},
        "receives_others_parameters": False,
        "train_seconds": {},
    }
    plain = format_table(RunResult.from_dict(base))
    assert "owner accuracy" not in plain and "DP epsilon" not in plain
    dp = {"0": {"epsilon": 7.99, "delta": 1e-5, "noise_multiplier": 1.2}}
    text = format_table(RunResult.from_dict({**base, "owner_accuracy": 0.25, "dp": dp}))
    assert "owner accuracy" in text and "0.2500" in text
    assert "DP epsilon, delta (max over users)  7.990, 1e-05" in text
