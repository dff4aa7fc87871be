"""Faults in a real deployment on loopback: SuperLink + SuperNodes with TLS and node auth.

One deployment, three runs, every fault of the deployment issue:

1. Run 1 with 10 users: users 0-2 honest; user 3's SuperNode is killed while it trains;
   users 4-8 run a tampered ``flwr-clientapp`` (NaN weights, a wrong shape, sigma 0, sigma
   huge, a claim on user 0's id); user 9's key is not registered, and a second device of user
   9 connects without TLS: both are refused by the SuperLink. Users 0-2 register; 3 is
   reported missing by user id; 4-9 are reported with reasons. (A loaded CI host once left
   user 0 without a valid reply in run 1: one honest user may be reported missing, never
   rejected, and must then register in run 3 like user 3.)
2. Run 2 (user 3's node back): the SuperLink is killed (SIGKILL, ServerApp included) while user
   3 trains. The filter on disk is unchanged (same hashes, same bytes).
3. The SuperLink restarts on the same ``--database``; the SuperNodes reconnect with the same
   node ids; run 3 registers the missing users only (user 3), users 0-2 are skipped, no user
   appears twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from docl_flower.core.filter.store import META_FILE, load_filter
from docl_flower.core.pipeline.config import PROJECT_ROOT
from docl_flower.operations.deploy import DeploymentError, LocalDeployment

from . import attacker, quick_heartbeat

pytestmark = pytest.mark.slow

HONEST = (0, 1, 2)
KILLED = 3
TAMPERED = {4: "nan", 5: "shape", 6: "sigma-zero", 7: "sigma-huge", 8: "claim"}
REFUSED = 9
USERS = 10


def _wait(predicate, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {seconds:.0f}s waiting for {what}")
        time.sleep(0.2)


def _training(log: Path, user: int, times: int) -> bool:
    """Whether ``user``'s ClientApp has started training ``times`` times (its log says so)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return text.count(f"user {user}: training class {user}") >= times


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


def _filter_state(folder: Path) -> dict[str, object]:
    """Per-user content hashes of the saved filter, and the digest of its files' bytes."""
    regs, meta = load_filter(folder)  # verifies every content hash
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return {
        "users": sorted(r.user_id for r in regs),
        "hashes": {int(e["user_id"]): e["sha256"] for e in meta["entries"]},
        "bytes": hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest(),
    }


def _experiment(path: Path, tiny_root: Path, filter_dir: Path, bindings: Path) -> None:
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"num_users={USERS}",
                f"data_root={tiny_root}",
                "dataset.verify=false",
                "dataset.harmless.verify=false",
                # ~160 steps: a few seconds per user with 8 training at once on 2 cores, long
                # enough to be killed mid-training (the test waits for the first epoch's line)
                "train.epochs=40",
                "train.batch_size=16",
                "train.min_steps=0",
                "train.num_threads=1",
                # weak autoencoders of tiny data (few steps on 60 images) hold more than 2% of the
                # tiny harmless set; the probe check has tests of its own
                "strategy.max_block_share=0.5",
                f"strategy.filter_path={filter_dir}",
                f"strategy.bindings_path={bindings}",
                "strategy.node_wait_s=90",
                # the killed node's heartbeat verdict (~20 s, see quick_heartbeat) must come
                # first, also on a loaded host
                "strategy.timeout_s=240",
            ],
        )
    OmegaConf.save(cfg, path, resolve=True)


def test_deployment_survives_faults(tiny_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    filter_dir = out / "filter"
    bad_bin = attacker.install(tmp_path / "attacker-bin").parent
    supernode = quick_heartbeat.install(tmp_path / "supernode-bin")
    with LocalDeployment(out, supernode=supernode) as dep:
        dep.start_superlink()
        data = f"data-dir='{tiny_root / 'mnist'}'"

        def add(user: int) -> None:
            config = f"user-id={user} {data}"
            if user in TAMPERED:
                env = {
                    "PATH": os.pathsep.join([str(bad_bin), dep.env["PATH"]]),
                    "DOCL_ATTACK": TAMPERED[user],
                    "DOCL_VICTIM": "0",
                }
                dep.add_node(user, config, extra_env=env)
            elif user == REFUSED:
                dep.add_node(user, config, register=False, max_retries=2)
            else:
                dep.add_node(user, config)

        # Keys are registered with one `flwr` command each (~2 s of start-up): a few at once.
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(add, range(USERS)))
        no_tls = dep.add_node(
            100 + REFUSED, f"user-id={REFUSED} {data}", insecure=True, max_retries=2
        )
        bindings = dep.write_bindings()
        assert sorted(dep.bindings().values()) == [u for u in range(USERS) if u != REFUSED]
        experiment = out / "experiment.yaml"
        _experiment(experiment, tiny_root, filter_dir, bindings)

        def run_config(name: str) -> str:
            (out / name).mkdir(exist_ok=True)
            return f"config-path='{experiment}' out-dir='{out / name}'"

        # Refused: the unregistered key and the node without TLS never come online.
        refused = dep.nodes[REFUSED]
        assert refused.proc is not None and refused.proc.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in refused.log.read_text(errors="replace")
        assert "No SuperNode found with the given public key" in dep.superlink_log.read_text()
        bound = set(dep.bindings())
        _wait(lambda: dep.online_nodes() == bound, 90, "the bound nodes online")

        # ---- Run 1: kill user 3's SuperNode while it trains.
        kill_log = dep.nodes[KILLED].log
        with ThreadPoolExecutor(1) as pool:
            run1 = pool.submit(dep.run, PROJECT_ROOT, run_config("run1"), 400)
            _wait(lambda: _training(kill_log, KILLED, 1), 240, "user 3 to start training")
            dep.kill_node(KILLED)
            assert run1.result()[1] == "finished:completed", _tail(out / "flwr-run.log")
        r1 = json.loads((out / "run1" / "results.json").read_text())
        failed = r1["failed"]
        seen = json.dumps({k: r1[k] for k in ("registered", "failed", "node_errors")}, indent=1)
        # A loaded CI host once left user 0 without a valid reply (Flower lost replies in
        # transport there before: the run sends such a message once more, and a second loss
        # is reported). One honest user may be missing, reported as "no valid reply", never
        # rejected; it must then register in run 3: nothing is lost. `seen` says why.
        lost = [u for u in HONEST if str(u) in failed]
        assert len(lost) <= 1, seen
        assert all(failed[str(u)].startswith("no valid reply") for u in lost), seen
        kept = [u for u in HONEST if u not in lost]
        assert r1["registered"] == kept, seen
        assert r1["bindings_enforced"] is True
        assert sorted(int(u) for u in failed) == sorted([*lost, KILLED, *TAMPERED, REFUSED])
        assert failed[str(KILLED)].startswith(f"no valid reply: node {dep.nodes[KILLED].node_id}")
        assert "Node Unavailable" in failed[str(KILLED)]  # Flower's heartbeat verdict
        # (each SuperNode announced the shorter interval, and the SuperLink took it)
        assert "non-finite" in failed["4"]
        assert "shape" in failed["5"]
        assert "err-std 0.0 outside" in failed["6"]
        assert "err-std 1000000000000.0 outside" in failed["7"]
        assert "bound to user 8, its upload claims user 0" in failed["8"]
        assert "no node is bound" in failed[str(REFUSED)]
        assert no_tls.proc is not None and no_tls.proc.poll() is not None
        assert no_tls.proc.returncode != 0
        before = _filter_state(filter_dir)
        assert before["users"] == kept

        # ---- Run 2: the SuperLink dies while user 3 trains; the saved filter is untouched.
        dep.start_node(KILLED)
        _wait(lambda: dep.online_nodes() == bound, 90, "user 3's node back online")
        with ThreadPoolExecutor(1) as pool:
            run2 = pool.submit(dep.run, PROJECT_ROOT, run_config("run2"), 400)
            _wait(lambda: _training(kill_log, KILLED, 2), 240, "user 3 to train again")
            dep.kill_superlink()
            with pytest.raises(DeploymentError):  # its status can no longer be read
                run2.result()
        assert not (out / "run2" / "results.json").exists()
        assert _filter_state(filter_dir) == before

        # ---- Run 3: restart on the same database; only the missing user registers.
        dep.start_superlink()
        _wait(lambda: dep.online_nodes() == bound, 120, "the nodes to reconnect")
        _, status = dep.run(PROJECT_ROOT, run_config("run3"), timeout_s=400)
        assert status == "finished:completed", _tail(out / "flwr-run.log")
        r3 = json.loads((out / "run3" / "results.json").read_text())
        assert r3["registered"] == sorted([*lost, KILLED]), _tail(out / "flwr-run.log")
        assert r3["already_registered"] == kept
        assert r3["filter_users"] == [*HONEST, KILLED]
        after = _filter_state(filter_dir)
        assert after["users"] == [*HONEST, KILLED]  # one entry per user: no duplicates
        hashes = after["hashes"]
        assert isinstance(hashes, dict)
        assert {u: hashes[u] for u in kept} == before["hashes"]
        meta = json.loads((filter_dir / META_FILE).read_text())
        assert meta.get("history", []) == []
    leftover = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, check=False)
    assert leftover.stdout == b""
