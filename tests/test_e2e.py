"""End-to-end `flwr run` simulations through the `docl-flower` console script (small data)."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from docl_flower.core.data.idx import IdxDataset
from docl_flower.core.filter import native
from docl_flower.operations import deciding

from .conftest import Multirun, make_tiny_root, processes_with

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "docl-flower")


def run_cli(
    *overrides: str, timeout: float = 400, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``docl-flower OVERRIDES...`` with this environment plus ``env``."""
    full = {**os.environ, "RAY_DISABLE_DOCKER_CPU_WARNING": "1", **(env or {})}
    return subprocess.run(
        [CLI, *overrides], capture_output=True, text=True, timeout=timeout, env=full, check=False
    )


def small_run_args(root: Path, out: Path, users: int = 3) -> list[str]:
    return [
        f"num_users={users}",
        "train.epochs=10",
        "train.batch_size=16",
        # 300 steps as train=scale takes for users of about 60 images (the default 4,000
        # steps cost about 2 s per user and test nothing more).
        "train.min_steps=300",
        # Autoencoders of 60 images: the probe check has tests of its own.
        "strategy.max_block_share=0.5",
        f"data_root={root}",
        "dataset.verify=false",
        "dataset.harmless.verify=false",
        "strategy.node_wait_s=60",
        f"hydra.run.dir={out}",
    ]


def test_a_multirun_runs_each_job_as_one_flower_run_that_writes_its_results(
    multirun: Multirun,
) -> None:
    """Hydra's ``-m``: one Flower run per job (``guard.alpha=1.0,2.0``), each on a Ray head of
    its own, with everything a run must write (checked on the first job)."""
    proc, sweep = multirun.proc, multirun.sweep
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert [r["alpha"] for r in runs] == [1.0, 2.0]
    assert runs[0]["flower_run_id"] != runs[1]["flower_run_id"]
    # The same seeds: the same autoencoders and owners; only the Guard differs.
    for key in ("overall_accuracy", "per_class_accuracy", "registered"):
        assert runs[0][key] == runs[1][key], key
    assert runs[0]["ray_cluster"]["alive_nodes"] == 1
    # The command ended each run once the ServerApp had written that run's results, and
    # nothing it started is left running.
    for i, results in enumerate(runs):
        main_log = (sweep / str(i) / "main.log").read_text()
        assert f"run {results['flower_run_id']}: the app wrote its results" in main_log
    assert processes_with(f"DOCL_TEST_MARKER={multirun.marker}") == []
    results = runs[0]
    assert results["registered"] == [0, 1, 2]
    assert results["failed"] == {}
    assert set(results["per_class_accuracy"]) == {"0", "1", "2"}
    assert 0.5 < results["overall_accuracy"] <= 1.0
    for key in ("alpha", "guarded_accuracy", "acceptance_rate", "ood_auroc", "wall_seconds"):
        assert isinstance(results[key], float), key
    # One upload per user: 4 float32 tensors of the paper's 784-32-784 autoencoder.
    assert results["bytes_uploaded"] == {str(u): 4 * (2 * 784 * 32 + 32 + 784) for u in range(3)}
    # No message sent to a client carried an ArrayRecord: counted by the server on what it
    # sent and by each client on what it received.
    assert results["bytes_downloaded"] == {"0": 0, "1": 0, "2": 0}
    assert results["received_array_records"] == {"0": 0, "1": 0, "2": 0}
    assert results["config"]["num_users"] == 3
    assert all(s > 0 for s in results["train_seconds"].values())
    assert "overall accuracy" in proc.stdout and "results:" in proc.stdout
    # The ServerApp runs from the app bundle, which cannot carry the kernel's C++ source: it
    # must still score with the same kernel as this process.
    assert results["scoring_kernel"] == ("native" if native.load() is not None else "torch")


def test_a_failing_client_is_reported_while_the_others_register(tmp_path):
    # Prepare: user 2's class has no training image, so its ClientApp raises.
    root = make_tiny_root(tmp_path / "data", classes=(0, 1))
    # Execute
    proc = run_cli(*small_run_args(root, tmp_path / "run"))
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["registered"] == [0, 1]
    assert list(results["failed"]) == ["2"]
    assert "no valid reply" in results["failed"]["2"]


def test_a_failed_flower_run_fails_the_command_with_the_reason(tmp_path):
    # Prepare: the data set passes the checks before the start, but holds no training image
    # of either user's class: every client fails, and the ServerApp, with nothing registered,
    # fails the Flower run.
    root = make_tiny_root(tmp_path / "data", classes=(5,))
    # Execute
    proc = run_cli(*small_run_args(root, tmp_path / "run", users=2))
    # Assert: the command fails with Flower's status and the ServerApp's reason; the clients'
    # one error is named once, with both users.
    assert proc.returncode != 0
    assert "finished:failed" in proc.stderr and "no autoencoder was registered" in proc.stderr
    assert proc.stderr.count("Traceback") <= 1, proc.stderr[-3000:]


def test_a_missing_data_set_fails_before_flower_starts(tmp_path):
    proc = run_cli(
        *small_run_args(tmp_path / "missing", tmp_path / "run", users=2),
        "dataset.download=false",
        "dataset.harmless.download=false",
    )
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, lines
    assert "train-images-idx3-ubyte.gz is not in" in lines[0] and "flwr" not in lines[0]


def test_fedavg_family_baseline_runs_end_to_end(tiny_root, tmp_path):
    # FedProx is Flower's FedAvg with the proximal term sent to the clients: one run covers
    # the workflow of both (the term itself: test_baselines; building each: test_config).
    strategy = "fedprox"
    # Execute: 3 users, 2 rounds, one class per user (the paper's setting).
    args = [
        a
        for a in small_run_args(tiny_root, tmp_path / "run")
        if not a.startswith(("train.", "strategy."))
    ]
    proc = run_cli(*args, f"strategy={strategy}", "strategy.num_rounds=2")
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == strategy
    assert [r["round"] for r in results["accuracy_curve"]] == [0, 1, 2]
    assert set(results["per_class_accuracy"]) == {"0", "1", "2"}
    model_bytes = 4 * 199_210  # the 2NN, float32
    # Counted on the messages actually sent: the global model, once per round, to each user.
    assert results["bytes_downloaded"] == {str(u): 2 * model_bytes for u in range(3)}
    assert results["bytes_uploaded"] == {str(u): 2 * model_bytes for u in range(3)}
    assert results["receives_others_parameters"] is True


@contextmanager
def served(folder: Path, workdir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """``docl-flower filter serve FOLDER`` on a free loopback port, checking filter.json every
    0.2 s: its base URL and the bearer header, while it runs (stopped with SIGTERM after).

    It holds the runs' probe records to the runs' own limit (``strategy.max_block_share=0.5``).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    token = workdir / "serve.token"
    log = (workdir / "serve.log").open("w")
    options = ["--port", str(port), "--token-file", str(token), "--poll-s", "0.2"]
    options += ["--max-block-share", "0.5"]  # as the runs below: tiny data, weak autoencoders
    proc = subprocess.Popen(
        [CLI, "filter", "serve", str(folder), *options],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (workdir / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.1)
        yield base, {"Authorization": f"Bearer {token.read_text().strip()}"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_a_new_user_joins_an_existing_filter_without_anyone_retraining(tiny_root, tmp_path):
    # Prepare: users 0 and 1 register into a persistent filter; the Guard is calibrated to a
    # stated acceptance rate at each run.
    shared = tmp_path / "filter"
    calibrated = "guard.target_acceptance=0.9"
    first = run_cli(
        *small_run_args(tiny_root, tmp_path / "run1", users=2),
        f"strategy.filter_path={shared}",
        calibrated,
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = {
        e["user_id"]: e["sha256"]
        for e in json.loads((shared / "filter.json").read_text())["entries"]
    }
    old_version = json.loads((shared / "filter.json").read_text())["integrity"]["sha256"]
    # The upload service serves the filter and a load generator checks digits of class 2 (the
    # new user's) and 0, one request after another (about 15 a second), while the next run
    # registers user 2.
    images, labels = IdxDataset("mnist", str(tiny_root / "mnist"), verify=False).load("test")
    picked = np.concatenate([np.flatnonzero(labels == c)[:6] for c in (2, 0)])
    bodies = [_png(images[i]) for i in picked]
    answers: list[tuple[int, int, dict]] = []  # (image, status, body)
    stop = threading.Event()
    with served(shared, tmp_path) as (base, auth):

        def load() -> None:
            headers = {**auth, "Content-Type": "image/png"}
            with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
                i = 0
                while not stop.is_set():
                    k = i % len(bodies)
                    response = client.post("/v1/check?uploader=-1", content=bodies[k])
                    answers.append((k, response.status_code, response.json()))
                    i += 1
                    stop.wait(0.05)  # a steady load, not a busy one: the run trains beside it

        generator = threading.Thread(target=load)
        generator.start()
        try:
            # Execute: a later run with a third user.
            second = run_cli(
                *small_run_args(tiny_root, tmp_path / "run2", users=3),
                f"strategy.filter_path={shared}",
                calibrated,
            )
            deadline = time.monotonic() + 30
            while httpx.get(f"{base}/v1/filter", headers=auth).json()["users"] != [0, 1, 2]:
                assert time.monotonic() < deadline, "the service kept the old filter"
                time.sleep(0.1)
            seen = len(answers)
            while len(answers) < seen + 2 * len(bodies):  # every image again on the new one
                assert generator.is_alive()
                time.sleep(0.05)
        finally:
            stop.set()
            generator.join(timeout=60)
        reloads = httpx.get(f"{base}/metrics").text
    # Assert
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    results = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert results["registered"] == [2]
    assert results["already_registered"] == [0, 1]
    assert results["filter_users"] == [0, 1, 2]
    assert results["failed"] == {}
    after = {
        e["user_id"]: e["sha256"]
        for e in json.loads((shared / "filter.json").read_text())["entries"]
    }
    assert {u: after[u] for u in (0, 1)} == before and 2 in after
    # Each autoencoder carries the record of the probe check that let it in.
    entries = json.loads((shared / "filter.json").read_text())["entries"]
    assert all(e["probe"]["max_block_share"] == 0.5 for e in entries), entries
    # The Guard was calibrated again for the three users, and the filter holds that alpha.
    cal = results["calibration"]
    saved = json.loads((shared / "filter.json").read_text())["calibration"]
    assert saved == {k: v for k, v in cal.items() if k not in ("test_images", "slack")}
    assert cal["target_acceptance"] == 0.9 and results["alpha"] == cal["alpha"] <= 2.0
    assert cal["test_images"] == results["num_harmless_images"] and cal["images"] >= 10
    assert cal["blocked_bound"] <= 0.1 and cal["calibration_blocked"] <= 0.1
    assert results["acceptance_rate"] >= 0.9 - cal["slack"]
    # The service: no request failed while the filter changed under it. The run saves the
    # filter twice (user 2 registered, then the Guard calibrated again), so answers come from
    # the old filter, perhaps the one in between, then the new one: in that order, never back,
    # one reload per version answered or more.
    assert answers and all(status == 200 for _, status, _ in answers), answers[-3:]
    new_version = json.loads((shared / "filter.json").read_text())["integrity"]["sha256"]
    versions = [body["filter_version"] for _, _, body in answers]
    order = list(dict.fromkeys(versions))  # each version once, in the order it first answered
    assert order[0] == old_version and order[-1] == new_version and len(order) <= 3, order
    assert versions == sorted(versions, key=order.index)
    swap = versions.index(new_version)
    reloaded = re.search(r'^docl_serve_reloads_total\{result="ok"\} (\d+)\.0$', reloads, re.M)
    assert reloaded is not None and len(order) - 1 <= int(reloaded.group(1)) <= 2, reloads
    decided = deciding.decide(deciding.load(shared), images[picked], -1)
    for k, _, body in answers[swap:]:
        d = decided[k]
        assert (body["decision"], body["predicted_owner"], body["score"]) == (
            d.decision,
            d.owner,
            d.score,
        )
    owners_before = {
        body["predicted_owner"]
        for k, _, body in answers
        if k < 6 and body["filter_version"] == old_version
    }
    owners_after = {body["predicted_owner"] for k, _, body in answers[swap:] if k < 6}
    assert 2 not in owners_before and 2 in owners_after


def test_local_deployment_with_tls_and_node_auth(tiny_root, tmp_path):
    # Execute: SuperLink + 3 SuperNodes on loopback, the same apps as in simulation.
    script = Path(__file__).resolve().parent.parent / "scripts" / "deploy_demo.py"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--users",
            "3",
            "--out",
            str(tmp_path / "deploy"),
            f"data_root={tiny_root}",
            "dataset.verify=false",
            "dataset.harmless.verify=false",
            "train.epochs=10",
            "train.batch_size=16",
            "train.min_steps=0",
            # 40 steps on 60 images: weak autoencoders whose regions hold 5-30% of the tiny
            # harmless set; the probe check has tests of its own, this one is about deployment.
            "strategy.max_block_share=0.5",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "deploy" / "run" / "results.json").read_text())
    assert results["registered"] == [0, 1, 2] and results["failed"] == {}
    assert results["bytes_downloaded"] == {"0": 0, "1": 0, "2": 0}
    log = (tmp_path / "deploy" / "superlink.log").read_text()
    assert "https://" in log and log.count("RegisterNode] Created node_id") == 3
    # Every process the demo started has been stopped.
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "deploy")], capture_output=True)
    assert leftover.stdout == b""
