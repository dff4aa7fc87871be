"""One writer per filter: the folder's locks (core/filter/lock.py), the store, two runs at once."""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from docl_flower.core.filter.lock import (
    RUN,
    WRITER,
    FilterLock,
    FilterLockedError,
    lock_path,
    run_lock,
)
from docl_flower.core.filter.store import META_FILE, PersistentFilter, load_filter, segment_files
from docl_flower.core.pipeline.config import compose_config
from docl_flower.federation.components import build_experiment
from docl_flower.federation.workflows.docl import Docl
from docl_flower.operations import main

from .conftest import PROJECT_ROOT, processes_with, random_registration

CLI = str(Path(sys.executable).parent / "docl-flower")
#: Users each writer registers in the concurrent-process tests.
USERS_PER_WRITER = 5
#: Longest a test waits for a helper process's next line or exit (seconds).
PROCESS_WAIT_S = 120.0
#: How long a holder keeps the lock before a waiting acquirer may get it (seconds).
HOLD_S = 0.6
#: The one-line refusal; group 1 is the holder's pid.
REFUSAL = re.compile(
    r"filter (?P<folder>\S+) is being written by another run \(pid (?P<pid>\d+) on "
    r"(?P<host>\S+) since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)"
    r"(, still after waiting [0-9.]+ s)?; wait for it or use strategy\.lock_wait_s=SECONDS"
)
HOST = re.sub(r"[^A-Za-z0-9._-]", "?", socket.gethostname())


def _refused_by(message: str, pid: int, folder: Path) -> bool:
    found = REFUSAL.fullmatch(message)
    return (
        found is not None
        and int(found["pid"]) == pid
        and found["host"] == HOST
        and found["folder"] == str(folder)
    )


# ---------------------------------------------------------------- the lock module


def test_a_second_acquirer_is_refused_in_one_line_naming_the_holder(tmp_path):
    # Prepare
    folder = tmp_path / "filter"
    # Execute
    with FilterLock(folder), pytest.raises(FilterLockedError) as err:
        FilterLock(folder)
    # Assert: one line with this process's pid and host, and how to wait.
    assert _refused_by(str(err.value), os.getpid(), folder), str(err.value)
    assert isinstance(err.value, ValueError)  # docl-flower prints a ValueError as one line


def test_the_lock_is_released_by_release_and_by_the_end_of_a_with_block(tmp_path):
    # Prepare
    folder = tmp_path / "filter"
    first = FilterLock(folder)
    # Execute
    first.release()
    first.release()  # a second release is a no-op
    with FilterLock(folder) as second:
        held = second.held
    # Assert: free again, and the released lock file holds no holder.
    assert held and not second.held
    FilterLock(folder).release()
    assert lock_path(folder).read_bytes() == b""


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    # Prepare: a holder process that takes the lock and sleeps.
    folder = tmp_path / "filter"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from docl_flower.core.filter.lock import FilterLock\n"
        "lock = FilterLock(Path(sys.argv[1]))\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(FilterLockedError) as err:
            FilterLock(folder)
        assert _refused_by(str(err.value), holder.pid, folder), str(err.value)
        # Execute
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=PROCESS_WAIT_S)
        # Assert: the kernel released it with the process; the stale holder is overwritten.
        with FilterLock(folder):
            info = json.loads(lock_path(folder).read_text())
        assert info["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_a_waiting_acquirer_gets_the_lock_once_the_holder_releases_it(tmp_path):
    # Prepare: the holder releases after HOLD_S seconds.
    folder = tmp_path / "filter"
    holder = FilterLock(folder)
    timer = threading.Timer(HOLD_S, holder.release)
    timer.start()
    # Execute
    start = time.monotonic()
    try:
        with FilterLock(folder, wait_s=PROCESS_WAIT_S) as waiter:
            waited = time.monotonic() - start
            held = waiter.held
    finally:
        timer.join()
    # Assert: it waited for the release, not for its whole allowance.
    assert held and HOLD_S * 0.5 <= waited < PROCESS_WAIT_S / 2


def test_a_waiting_acquirer_gives_up_after_its_wait_in_one_line(tmp_path):
    # Prepare
    folder = tmp_path / "filter"
    with FilterLock(folder):
        # Execute
        start = time.monotonic()
        with pytest.raises(FilterLockedError) as err:
            FilterLock(folder, wait_s=HOLD_S)
        waited = time.monotonic() - start
    # Assert
    assert waited >= HOLD_S
    assert _refused_by(str(err.value), os.getpid(), folder), str(err.value)
    assert f"after waiting {HOLD_S:g} s" in str(err.value)


@pytest.mark.parametrize("value", [-1, -0.5, math.nan, math.inf, True, "1", None])
def test_bad_wait_values_are_refused_naming_the_setting(tmp_path, value):
    with pytest.raises(ValueError, match=r"^lock_wait_s must be a finite number >= 0, got "):
        FilterLock(tmp_path / "filter", wait_s=value)
    assert not lock_path(tmp_path / "filter").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "strategy.lock_wait_s must be a finite number >= 0, got -1"),
        ("abc", "strategy.lock_wait_s must be a finite number, got 'abc'"),
        ("inf", "strategy.lock_wait_s must be a finite number, got inf"),
        ("true", "strategy.lock_wait_s must be a finite number, got True"),
    ],
)
def test_a_bad_lock_wait_setting_fails_in_one_line_naming_the_key(value, message):
    cfg = compose_config([f"strategy.lock_wait_s={value}"])
    with pytest.raises(ValueError) as err:
        build_experiment(cfg)
    assert str(err.value) == message


def test_a_good_lock_wait_setting_builds():
    exp = build_experiment(compose_config(["strategy.lock_wait_s=2.5"]))
    assert isinstance(exp.workflow, Docl) and exp.workflow.lock_wait_s == 2.5
    default = build_experiment(compose_config([]))
    assert isinstance(default.workflow, Docl) and default.workflow.lock_wait_s == 0


def test_a_lock_file_that_is_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path):
    # Prepare: the lock file's name points at another file.
    folder = tmp_path / "filter"
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    lock_path(folder).symlink_to(target)
    # Execute / Assert
    with pytest.raises(ValueError, match="cannot open its lock file"):
        FilterLock(folder)
    assert target.read_text() == "keep me"


def test_a_hostile_holder_description_still_gives_one_line(tmp_path):
    # Prepare: a held lock whose file claims a host name with a line break and a huge pid.
    folder = tmp_path / "filter"
    with FilterLock(folder):
        lock_path(folder).write_text(json.dumps({"pid": 7, "host": "a\nb c", "since": 0.0}))
        with pytest.raises(FilterLockedError) as shown:
            FilterLock(folder)
        lock_path(folder).write_text('{"pid": "x"')
        with pytest.raises(FilterLockedError) as unknown:
            FilterLock(folder)
    # Assert
    assert "\n" not in str(shown.value) and "(pid 7 on a?b?c since " in str(shown.value)
    assert "(holder unknown)" in str(unknown.value) and "\n" not in str(unknown.value)


def test_an_acquirer_that_lost_a_race_by_a_hair_still_names_the_holder(tmp_path):
    # Prepare: the holder has taken the flock but not yet written who it is (it does so a
    # moment later): what a second run started at the same instant finds.
    folder = tmp_path / "filter"
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        holder = {"pid": 4242, "host": HOST, "since": time.time()}
        writer = threading.Timer(0.1, lambda: path.write_text(json.dumps(holder)))
        writer.start()
        # Execute
        try:
            with pytest.raises(FilterLockedError) as err:
                FilterLock(folder)
        finally:
            writer.join()
    # Assert
    assert _refused_by(str(err.value), 4242, folder), str(err.value)


def test_the_run_lock_leaves_the_writer_lock_to_the_run_it_starts(tmp_path):
    # Prepare
    folder = tmp_path / "filter"
    with run_lock(folder):
        # Execute: the run's ServerApp takes the writer lock; a second command is refused.
        with FilterLock(folder, kind=WRITER):
            pass
        with pytest.raises(FilterLockedError) as second, run_lock(folder):
            pass
    # Assert
    assert _refused_by(str(second.value), os.getpid(), folder), str(second.value)
    assert lock_path(folder, RUN) != lock_path(folder, WRITER)


def test_the_run_lock_is_refused_while_another_process_writes_the_filter(tmp_path):
    # Prepare: a writer that no command of ours started (a deployment's ServerApp, say).
    folder = tmp_path / "filter"
    # Execute
    with FilterLock(folder, kind=WRITER), pytest.raises(FilterLockedError) as err, run_lock(folder):
        pass
    # Assert: refused, and the run lock is free again.
    assert _refused_by(str(err.value), os.getpid(), folder), str(err.value)
    with run_lock(folder):
        pass


# ---------------------------------------------------------------- the store and the workflow


def test_a_second_writer_of_a_filter_is_refused_and_the_first_writers_users_all_stay(tmp_path):
    # Prepare: the first run's filter, opened as the DOCL workflow opens it.
    folder = tmp_path / "shared"
    docl = Docl(filter_path=str(folder))
    rng = np.random.default_rng(0)
    with docl.open_filter(tmp_path / "run1", {"run": 1}) as first:
        first.register(0, [random_registration(rng, 0, 0)], [{}])
        # Execute: a second run on the same folder, and one that waits briefly.
        with pytest.raises(FilterLockedError) as refused:
            docl.open_filter(tmp_path / "run2", {"run": 2})
        with pytest.raises(FilterLockedError):
            Docl(filter_path=str(folder), lock_wait_s=HOLD_S).open_filter(tmp_path, {})
        for user in (1, 2):
            first.register(user, [random_registration(rng, user, user)], [{}])
    # Assert: every user of the first run is in the saved filter; its folder holds only the
    # filter's files, the locks lie next to it.
    assert _refused_by(str(refused.value), os.getpid(), folder), str(refused.value)
    regs, meta = load_filter(folder)
    assert sorted(r.user_id for r in regs) == [0, 1, 2] and meta["config"] == {"run": 1}
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [META_FILE, *(p.name for p in segment_files(folder))]
    )
    assert lock_path(folder).parent == folder.parent


def test_a_closed_filter_saves_no_more_and_a_filter_opened_without_a_lock_takes_none(tmp_path):
    # Prepare
    folder = tmp_path / "f"
    rng = np.random.default_rng(1)
    store = PersistentFilter(folder, {}, lock_wait_s=0)
    store.register(0, [random_registration(rng, 0, 0)], [{}])
    # Execute
    store.close()
    # Assert: no write without the lock; a reader-style open (no lock_wait_s) locks nothing.
    with pytest.raises(ValueError, match="was closed"):
        store.register(1, [random_registration(rng, 1, 1)], [{}])
    assert [r.user_id for r in load_filter(folder)[0]] == [0]
    with FilterLock(folder):
        assert PersistentFilter(folder, {}).users == {0}


def test_a_filter_that_fails_to_load_releases_its_lock(tmp_path):
    # Prepare: a damaged filter.json
    folder = tmp_path / "f"
    PersistentFilter(folder, {}).register(
        0, [random_registration(np.random.default_rng(2), 0, 0)], [{}]
    )
    (folder / META_FILE).write_text("{")
    # Execute
    with pytest.raises(ValueError, match="truncated or not JSON"):
        PersistentFilter(folder, {}, lock_wait_s=0)
    # Assert
    FilterLock(folder).release()


# ---------------------------------------------------------------- two concurrent processes

#: A writer process: opens the filter through ``Docl.open_filter`` (as the ServerApp does)
#: once the test creates the ``go`` file, registers USERS_PER_WRITER users, then holds the
#: filter until the ``release`` file exists (if one is named). Prints what it did as JSON.
WRITER_SCRIPT = """
import json, sys, time
from pathlib import Path
import numpy as np
from docl_flower.core.filter.global_filter import Registration
from docl_flower.core.filter.lock import FilterLockedError
from docl_flower.core.training.autoencoder import AutoencoderSpec
from docl_flower.federation.workflows.docl import Docl

folder, first, count, wait_s, go, release = sys.argv[1:]
first, count = int(first), int(count)
docl = Docl(filter_path=folder, lock_wait_s=float(wait_s))
shapes = AutoencoderSpec(hidden=4).shapes(20)
rng = np.random.default_rng(first)
print(json.dumps({"ready": True}), flush=True)
while not Path(go).exists():
    time.sleep(0.01)
try:
    store = docl.open_filter(Path(folder).parent, {"writer": first})
except FilterLockedError as err:
    print(json.dumps({"refused": str(err)}), flush=True)
    sys.exit(3)
with store:
    start = time.monotonic()
    found = sorted(store.users)
    for user in range(first, first + count):
        params = {k: rng.normal(0, 0.5, size=s).astype(np.float32) for k, s in shapes.items()}
        store.register(user, [Registration(user, user % 10, params, 1.0, 0.5, 10)], [{}])
        time.sleep(0.05)
    while release != "-" and not Path(release).exists():
        time.sleep(0.01)
    end = time.monotonic()
print(json.dumps({"found": found, "held": [start, end]}), flush=True)
"""


def _start_writer(folder: Path, first: int, wait_s: float, go: Path, release: str):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER_SCRIPT,
            str(folder),
            str(first),
            str(USERS_PER_WRITER),
            str(wait_s),
            str(go),
            release,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=PROJECT_ROOT,
    )
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline()) == {"ready": True}, proc.stderr
    return proc


def _finish(proc: subprocess.Popen[str]) -> tuple[int, dict[str, object], str]:
    out, err = proc.communicate(timeout=PROCESS_WAIT_S)
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    return proc.returncode, (lines[-1] if lines else {}), err


def test_two_concurrent_writers_one_fails_fast_and_the_others_users_all_stay(tmp_path):
    # Prepare: two writer processes, both imported and ready, on one folder (no waiting).
    folder, go, release = tmp_path / "shared", tmp_path / "go", tmp_path / "release"
    procs = [_start_writer(folder, first, 0.0, go, str(release)) for first in (0, 100)]
    try:
        # Execute: both open the filter at once; the winner holds it until the loser is out.
        go.touch()
        deadline = time.monotonic() + PROCESS_WAIT_S
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.02)
        release.touch()
        results = [_finish(p) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    # Assert: exactly one was refused, in one line naming the other; the filter holds all of
    # the winner's users and none of the loser's.
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 3], results
    (winner,) = [k for k, (code, _, _) in enumerate(results) if code == 0]
    loser = 1 - winner
    message = str(results[loser][1]["refused"])
    assert _refused_by(message, procs[winner].pid, folder), message
    first = (0, 100)[winner]
    regs, _ = load_filter(folder)
    assert sorted(r.user_id for r in regs) == list(range(first, first + USERS_PER_WRITER))


def test_two_concurrent_writers_that_wait_take_turns_and_lose_no_user(tmp_path):
    # Prepare: two writer processes on one folder, each allowed to wait for the other.
    folder, go = tmp_path / "shared", tmp_path / "go"
    procs = [_start_writer(folder, first, PROCESS_WAIT_S, go, "-") for first in (0, 100)]
    try:
        # Execute
        go.touch()
        results = [_finish(p) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    # Assert: both succeeded, one after the other, the second on top of the first's filter.
    assert [code for code, _, _ in results] == [0, 0], results
    held = sorted(tuple(r["held"]) for _, r, _ in results)  # type: ignore[arg-type]
    assert held[0][1] <= held[1][0], held
    later = max(results, key=lambda r: r[1]["held"][0])[1]  # type: ignore[index]
    assert len(later["found"]) == USERS_PER_WRITER  # type: ignore[arg-type]
    regs, _ = load_filter(folder)
    assert sorted(r.user_id for r in regs) == [
        *range(USERS_PER_WRITER),
        *range(100, 100 + USERS_PER_WRITER),
    ]


# ---------------------------------------------------------------- docl-flower before Flower


def _args(root: Path, folder: Path, *extra: str) -> list[str]:
    return [
        "num_users=2",
        f"data_root={root}",
        "dataset.verify=false",
        "dataset.harmless.verify=false",
        f"strategy.filter_path={folder}",
        *extra,
    ]


def test_a_second_docl_flower_run_on_a_filter_fails_in_one_line_before_flower_starts(
    tiny_root, tmp_path, monkeypatch
):
    # Prepare: this process holds the folder's run lock, as a running docl-flower does; a
    # marker in the environment that every process the command starts inherits.
    folder = tmp_path / "shared"
    name, value = "DOCL_TEST_MARKER", uuid.uuid4().hex
    monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    with run_lock(folder):
        # Execute: the real console script.
        proc = subprocess.run(
            [CLI, *_args(tiny_root, folder), f"hydra.run.dir={run_dir}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=PROCESS_WAIT_S,
        )
    # Assert: non-zero exit, one line naming this process, no Flower or Ray process started.
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode != 0
    assert len(output.splitlines()) == 1 and output.startswith("docl-flower: filter "), output
    assert _refused_by(output.removeprefix("docl-flower: "), os.getpid(), folder), output
    assert "flwr run" not in (run_dir / "main.log").read_text()
    assert processes_with(f"{name}={value}") == []
    assert not folder.exists()


def test_run_experiment_checks_the_filter_lock_within_a_second_and_holds_it_for_the_run(
    tiny_root, tmp_path, monkeypatch
):
    # Prepare: a stand-in for Flower that records what the ServerApp would find.
    folder = tmp_path / "shared"
    seen: dict[str, object] = {}

    class StopRunError(Exception):
        pass

    def fake_run_app(**_: object) -> int:
        with FilterLock(folder, kind=WRITER):  # the ServerApp's lock: free for it
            seen["writer"] = True
        with pytest.raises(FilterLockedError), run_lock(folder):  # another docl-flower
            pass
        raise StopRunError

    monkeypatch.setattr(main, "run_app", fake_run_app)
    cfg = compose_config(_args(tiny_root, folder))
    # Execute: a ServerApp of another run writes the folder; then it is free.
    with FilterLock(folder, kind=WRITER):
        start = time.monotonic()
        with pytest.raises(FilterLockedError) as refused:
            main.run_experiment(cfg, tmp_path / "run1")
        elapsed = time.monotonic() - start
    with pytest.raises(StopRunError):
        main.run_experiment(cfg, tmp_path / "run2")
    # Assert: refused at once, Flower never asked to start; then run with the lock.
    assert _refused_by(str(refused.value), os.getpid(), folder), str(refused.value)
    assert elapsed < 10.0  # the checks before the start (data hashes) included; no Flower
    assert seen == {"writer": True}
    with run_lock(folder):  # released after the run
        pass
