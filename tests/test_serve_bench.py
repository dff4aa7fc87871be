"""The upload service's benchmark (experiments/serve_bench.py): its quick mode end to end through
its script against the real `docl-flower filter serve`, the server stopped however it behaves,
and its targets from given figures.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from docl_flower.experiments import serve_bench as bench

from .conftest import PROJECT_ROOT

spec = importlib.util.spec_from_file_location(
    "serve_bench_script", PROJECT_ROOT / "scripts" / "serve_bench.py"
)
assert spec is not None and spec.loader is not None
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie) or its group has a live member."""
    if bench._group_members(pid):
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def test_the_quick_benchmark_measures_every_level_and_stops_its_servers(tmp_path, capsys):
    # Execute: the quick mode through the script (filters of 3 and 24 autoencoders).
    out = tmp_path / "serve"
    start = time.monotonic()
    payload = script.main(["--quick", "--out", str(out)])
    seconds = time.monotonic() - start
    # Assert: what it wrote is what it returned, and the report was printed.
    written = json.loads((out / "bench.json").read_text())
    assert [f["name"] for f in written["filters"]] == [f["name"] for f in payload["filters"]]
    text = capsys.readouterr().out
    assert "| filter | N | c |" in text and "Targets:" in text
    assert (out / "bench.md").read_text().startswith("machine: ")
    # every filter, every level; nothing failed, every answer is the in-process decision
    assert written["quick"] is True
    assert [f["name"] for f in written["filters"]] == ["mnist-3", "mnist-24"]
    for f in written["filters"]:
        assert [lv["concurrency"] for lv in f["levels"]] == [1, 8, 64], f["name"]
        for lv in f["levels"]:
            where = (f["name"], lv["concurrency"])
            assert lv["requests"] == lv["ok"] == 64 and not lv["capped"], where
            assert lv["failed"] == 0 and lv["errors"] == {}, (where, lv["errors"])
            assert lv["mismatched"] == 0, where
            for key in ("ratio", "images_per_second", "in_process_images_per_second"):
                assert math.isfinite(lv[key]) and lv[key] > 0, (where, key, lv[key])
            lat = lv["latency_ms"]
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], where
            assert math.isfinite(lv["p99_over_p50"]) and lv["p99_over_p50"] >= 1, where
            assert lv["mean_batch"] >= 1, where
            assert lv["client_cpu_seconds"] > 0 and lv["service_cpu_seconds"] > 0, where
        one = f["levels"][0]
        assert math.isfinite(one["ratio_to_batch_1"]) and one["ratio_to_batch_1"] > 0
    # the reload phase on the larger filter: every reload swapped a filter one user larger in
    assert written["filters"][0]["reload"] is None
    reload = written["filters"][1]["reload"]
    assert reload["failed"] == 0 and reload["ok"] > 0, reload["errors"]
    assert reload["reloads_ok"] == reload["reloads_asked"] == 2, reload["reloads"]
    assert [r["autoencoders"] for r in reload["reloads"]] == [25, 26]
    assert len(reload["filter_versions"]) >= 2  # answers came from more than one filter
    # the targets are stated with what was measured
    names = [t["target"] for t in written["targets"]]
    assert names[0].startswith("service / in-process >= 0.7 at N=24, c=64")
    assert sum("at c=1" in n for n in names) == 2 and "reloading" in names[-1]
    assert written["targets"][-1]["holds"] is True
    # the machine is stated
    machine = written["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["torch_threads"] >= 1
    assert set(FLAGS) <= set(machine["flags"]), machine["flags"]
    assert all(isinstance(machine["flags"][f], bool) for f in FLAGS)
    assert "gpu" in machine and "GPU: " in text
    assert written["faces"] == {"measured": False, "reason": "not asked (--faces)"}
    # every server it started is gone: stopped by SIGTERM, exit status 0, no decoder left
    servers = written["servers"]
    assert len(servers) == 2
    for s in servers:
        assert (s["exit_code"], s["stopped_by"], s["left_in_group"]) == (0, "sigterm", []), s
        assert not _alive(s["pid"]), s
    assert seconds < 120, seconds


def test_a_server_that_ignores_sigterm_is_killed_with_its_children_in_bounded_time():
    # Prepare: a process that ignores SIGTERM, with a child in its process group.
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True, text=True
    )
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        # Execute
        start = time.monotonic()
        status, how, left = bench.stop_server(proc, timeout_s=1.0)
        seconds = time.monotonic() - start
    finally:  # whatever stop_server did: nothing of the test survives it
        if proc.poll() is None or bench._group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Assert
    assert (status, how, left) == (-signal.SIGKILL, "sigkill", [])  # the group went with it
    assert seconds < 10
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child) and not _alive(proc.pid)


def _level(c: int, ratio: float, tail: float) -> dict:
    return {"concurrency": c, "ratio": ratio, "p99_over_p50": tail}


def test_the_targets_say_whether_each_holds():
    payload = {
        "filters": [
            {
                "name": "mnist-10",
                "autoencoders": 10,
                "levels": [_level(1, 0.1, 1.5)],
                "reload": None,
            },
            {
                "name": "mnist-1000",
                "autoencoders": 1000,
                "levels": [_level(1, 0.9, 2.5), _level(64, 0.69, 1.1), _level(8, 0.8, 1.2)],
                "reload": {"failed": 0, "reloads_ok": 3, "reloads_asked": 3},
            },
        ]
    }
    rows = bench.targets(payload)
    assert [(r["target"], r["value"], r["holds"]) for r in rows] == [
        ("service / in-process >= 0.7 at N=1000, c=64", 0.69, False),
        ("p99 / p50 <= 2 at c=1 (mnist-10)", 1.5, True),
        ("p99 / p50 <= 2 at c=1 (mnist-1000)", 2.5, False),
        ("0 failed requests while reloading (mnist-1000, 3 of 3 reloads done)", 0, True),
    ]
    payload["filters"][1]["reload"] = {"failed": 1, "reloads_ok": 3, "reloads_asked": 3}
    assert bench.targets(payload)[-1]["holds"] is False
    payload["filters"][1]["reload"] = {"failed": 0, "reloads_ok": 2, "reloads_asked": 3}
    assert bench.targets(payload)[-1]["holds"] is False
