"""SIGTERM / SIGINT / SIGHUP stop every process that `docl-flower` and the deploy demo started.

Each case starts the real command in its own session, waits until a ClientApp trains,
records every descendant of the command (PID and start time, from /proc), signals the command
only, and checks its exit status and that none of the recorded processes (nor any process
naming the run's folder or the SuperLink's address) is left.

A SIGKILL runs no clean-up: the watchdog that the command starts first stops every process
carrying the run's marker, within seconds, and nothing else (the last cases).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from docl_flower.operations.watchdog import MARKER_VAR, carries

from .conftest import processes_with

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc"),
]

BIN = Path(sys.executable).parent
CLI = str(BIN / "docl-flower")
DEMO = str(Path(__file__).resolve().parent.parent / "scripts" / "deploy_demo.py")
#: A long training: the run is still busy when the signal comes.
LONG_TRAINING = ["train.epochs=2000", "train.batch_size=16"]


# ------------------------------------------------------------------------------ /proc helpers
def _stat(pid: int) -> tuple[int, int, str] | None:
    """``(ppid, start time, state)`` of ``pid``, or None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return int(fields[1]), int(fields[19]), fields[0]


def _table() -> dict[int, tuple[int, int, str]]:
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (info := _stat(int(name))) is not None:
            table[int(name)] = info
    return table


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace")


def _descendants(root: int) -> dict[int, int]:
    """PID -> start time of every live descendant of ``root``."""
    table = _table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, int] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = table[pid][1]
        todo.extend(children.get(pid, []))
    return found


def _alive(pid: int, start: int) -> bool:
    """Whether the process that started at ``start`` still runs (a zombie has ended)."""
    info = _stat(pid)
    return info is not None and info[1] == start and info[2] not in ("Z", "X")


def _naming(*needles: str) -> dict[int, str]:
    """Live processes other than this one whose command line contains one of ``needles``."""
    found = {}
    for pid, (_, _, state) in _table().items():
        if pid != os.getpid() and state not in ("Z", "X"):
            cmd = _cmdline(pid)
            if any(needle in cmd for needle in needles):
                found[pid] = cmd
    return found


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            pytest.fail(f"timed out waiting for {what}; output:\n{tail}")
        time.sleep(0.5)


def _kill_leftovers(proc: subprocess.Popen[bytes], seen: dict[int, int]) -> None:
    """Clean up after a failed case: the command's session, then every recorded process."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid, start in seen.items():
        if _alive(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _launch(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a session of its own, its output into ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _see_tree(
    proc: subprocess.Popen[bytes],
    log: Path,
    started: Callable[[Path], bool],
    what: str,
    seen: dict[int, int],
) -> list[str]:
    """Wait for ``started``, then record the tree below ``proc`` in ``seen``; its commands."""
    _wait(lambda: started(log) or proc.poll() is not None, 150, what, log)
    assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
    for _ in range(3):  # the process tree, as complete as it gets
        seen.update(_descendants(proc.pid))
        time.sleep(0.5)
    return [_cmdline(pid) for pid in seen]


def _signal_mid_run(
    cmd: list[str],
    tmp_path: Path,
    started: Callable[[Path], bool],
    signals: list[signal.Signals],
) -> tuple[int, float, list[str], dict[int, str]]:
    """Start ``cmd``, wait for ``started``, send ``signals`` to it (1 s apart).

    Returns the exit status, the seconds from the first signal to the exit, the command lines
    of the processes it had started, and the processes left: those it had started and those
    naming ``tmp_path`` or the SuperLink's address.
    """
    log = tmp_path / "command.log"
    env = {**os.environ, "RAY_DISABLE_DOCKER_CPU_WARNING": "1", "PYTHONUNBUFFERED": "1"}
    seen: dict[int, int] = {}
    proc = _launch(cmd, log, env)
    try:
        commands = _see_tree(proc, log, started, "training to start", seen)
        assert any("flower-superlink" in c for c in commands), commands
        port = next(c.split("--port ")[1].split()[0] for c in commands if "flower-superlink" in c)
        begin = time.monotonic()
        for number, sig in enumerate(signals):
            if number:
                time.sleep(1.0)
            proc.send_signal(sig)
        returncode = proc.wait(timeout=90)
        elapsed = time.monotonic() - begin
        left = _naming(str(tmp_path), f"127.0.0.1:{port}")
        left.update({pid: _cmdline(pid) for pid, start in seen.items() if _alive(pid, start)})
        return returncode, elapsed, commands, left
    finally:
        _kill_leftovers(proc, seen)


#: A process tree that escapes its process group: a session of its own (as flower-superexec),
#: an orphan left in the session, and an orphan in a session of its own; the root exits.
TREE = """
sh -c 'tail -f "$1" &' sh "$1"
setsid sh -c 'tail -f "$1" & wait' sh "$1" &
sleep 3
"""

#: A command that starts TREE like the Flower executables are started, then waits.
COMMAND = """
import os, sys, time
from pathlib import Path
from docl_flower.operations.processes import exit_on_signals, start_process
out = Path(sys.argv[2])
with exit_on_signals():
    cmd = ["sh", "-c", sys.argv[1], "sh", str(out / "marker")]
    start_process(cmd, out / "tree.log", os.environ)
    time.sleep(600)
"""


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["sigterm", "sigint", "sighup"]
)
def test_a_signal_stops_processes_that_left_the_group_and_were_orphaned(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Prepare
    (tmp_path / "marker").touch()
    proc = subprocess.Popen(
        [sys.executable, "-c", COMMAND, TREE, str(tmp_path)], start_new_session=True
    )
    marker = str(tmp_path / "marker")

    def tails() -> set[int]:
        return {pid for pid, cmd in _naming(marker).items() if cmd.startswith("tail")}

    try:
        _wait(lambda: len(tails()) == 2, 30, "the tree", tmp_path / "tree.log")
        # the root exits after 3 s: the tails are orphans, reparented to init
        orphaned = lambda: len(tails()) == 2 and not tails() & set(_descendants(proc.pid))  # noqa: E731
        _wait(orphaned, 30, "the root to exit", tmp_path / "tree.log")
        # Execute
        proc.send_signal(sig)
        returncode = proc.wait(timeout=30)
        # Assert
        assert returncode == 128 + sig
        assert _naming(str(tmp_path)) == {}
    finally:
        _kill_leftovers(proc, {})
        for pid in _naming(str(tmp_path)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


#: A command that a signal stops, and that gets the same signal again while it exits: after
#: the processes are stopped, and while the interpreter finalises its modules (when Python
#: has already put the default handler back for every signal that had a Python handler).
SIGNAL_WHILE_EXITING = """
import os, signal, sys, time
from docl_flower.operations.processes import exit_on_signals
sig = int(sys.argv[1])

class Late:
    def __del__(self, kill=os.kill, pid=os.getpid(), sleep=time.sleep, sig=sig):
        kill(pid, sig)  # runs when the interpreter clears this module
        sleep(0.3)

late = Late()
try:
    with exit_on_signals():
        os.kill(os.getpid(), sig)
        time.sleep(30)
finally:
    os.kill(os.getpid(), sig)  # the processes are stopped; the command is on its way out
    time.sleep(0.3)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_second_signal_while_exiting_keeps_the_exit_status(sig: signal.Signals) -> None:
    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_WHILE_EXITING, str(int(sig))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Assert: 128 + signal, not death by the signal (-15 / -2)
    assert proc.returncode == 128 + sig, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.count(f"{sig.name} received") == 1, proc.stderr[-2000:]


def _simulation_training(log: Path) -> bool:
    return "training class" in log.read_text(errors="replace")


@pytest.mark.parametrize(
    "signals",
    # SIGINT, SIGTERM and SIGHUP take the same path (the process-tree tests above run all
    # three, and a closed terminal's SIGHUP is tested below); a real run is stopped here by
    # SIGTERM twice, the harder case (the second signal arrives while the first is handled).
    [[signal.SIGTERM, signal.SIGTERM]],
    ids=["sigterm-twice"],
)
def test_a_signal_stops_every_process_of_a_simulation(
    tiny_root: Path, tmp_path: Path, signals: list[signal.Signals]
) -> None:
    # Execute
    cmd = [
        CLI,
        "num_users=3",
        *LONG_TRAINING,
        f"data_root={tiny_root}",
        "dataset.verify=false",
        "dataset.harmless.verify=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    returncode, elapsed, commands, left = _signal_mid_run(
        cmd, tmp_path, _simulation_training, signals
    )
    # Assert: the whole tree was seen (SuperLink, SuperExec, simulation, Ray, ClientApps).
    assert any("flwr-simulation" in c for c in commands), commands
    assert any("raylet" in c for c in commands), commands
    assert any("ClientAppActor" in c for c in commands), commands
    assert returncode == 128 + signals[0], returncode
    assert left == {}, left
    assert elapsed < 60


def test_sigterm_stops_every_process_of_the_deploy_demo(tiny_root: Path, tmp_path: Path) -> None:
    # Execute
    out = tmp_path / "deploy"
    cmd = [
        sys.executable,
        DEMO,
        "--users",
        "2",
        "--out",
        str(out),
        f"data_root={tiny_root}",
        "dataset.verify=false",
        "dataset.harmless.verify=false",
        *LONG_TRAINING,
    ]

    def training(_log: Path) -> bool:
        logs = [out / f"supernode-{user}.log" for user in (0, 1)]
        return any(
            log.exists() and "training class" in log.read_text(errors="replace") for log in logs
        )

    returncode, elapsed, commands, left = _signal_mid_run(cmd, tmp_path, training, [signal.SIGTERM])
    # Assert
    assert any("flwr-clientapp" in c for c in commands), commands
    assert sum("flower-supernode" in c for c in commands) == 2
    assert returncode == 128 + signal.SIGTERM
    assert left == {}, left
    assert elapsed < 60


# --------------------------------------------------------- a closed terminal, SIGKILL: watchdog
def _take_terminal() -> None:
    """In the child: make its stdin (a pseudo-terminal) the session's controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_a_closed_terminal_stops_the_command_and_every_process_it_started(tmp_path: Path) -> None:
    # Prepare: the command runs in a terminal of its own, like a shell over SSH.
    (tmp_path / "marker").touch()
    marker = str(tmp_path / "marker")
    value = uuid.uuid4().hex
    env = {**os.environ, "DOCL_TEST_MARKER": value}
    terminal, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", COMMAND, TREE, str(tmp_path)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
        preexec_fn=_take_terminal,
    )
    os.close(slave)

    def tails() -> set[int]:
        while select.select([terminal], [], [], 0)[0]:  # keep the terminal's buffer empty
            with contextlib.suppress(OSError):
                os.read(terminal, 65536)
        return {pid for pid, cmd in _naming(marker).items() if cmd.startswith("tail")}

    try:
        _wait(lambda: len(tails()) == 2, 30, "the tree", tmp_path / "tree.log")
        # Execute: the terminal goes away (the kernel sends SIGHUP to the command).
        os.close(terminal)
        terminal = -1
        returncode = proc.wait(timeout=30)
        # Assert
        assert returncode == 128 + signal.SIGHUP
        assert _naming(str(tmp_path)) == {}
        assert processes_with(f"DOCL_TEST_MARKER={value}", settle_s=0) == []
    finally:
        if terminal >= 0:
            os.close(terminal)
        _kill_leftovers(proc, {})
        for pid in _naming(str(tmp_path)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _signal_and_watch(
    cmd: list[str],
    tmp_path: Path,
    value: str,
    started: Callable[[Path], bool],
    sig: signal.Signals,
    spare: set[int] | None = None,
) -> tuple[int, float, list[str], dict[int, str], str]:
    """Start ``cmd`` with ``DOCL_TEST_MARKER=value``, wait for ``started``, send it ``sig``.

    Returns the exit status, the seconds from the signal until no process of the run is left
    (one it had started, or one carrying the marker other than ``spare``; waiting up to 15 s
    after a SIGKILL, not at all after another signal), the command lines of the processes it
    had started, the processes left and the command's output.
    """
    marker = f"DOCL_TEST_MARKER={value}"
    spare = spare or set()
    log = tmp_path / "command.log"
    env = {
        **os.environ,
        "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
        "PYTHONUNBUFFERED": "1",
        "DOCL_TEST_MARKER": value,
    }
    seen: dict[int, int] = {}
    proc = _launch(cmd, log, env)
    try:
        commands = _see_tree(proc, log, started, "the command to start", seen)
        begin = time.monotonic()
        proc.send_signal(sig)
        returncode = proc.wait(timeout=90)
        limit_s = 15.0 if sig == signal.SIGKILL else 0.0
        while True:
            elapsed = time.monotonic() - begin
            left = {pid: _cmdline(pid) for pid in processes_with(marker, 0) if pid not in spare}
            left.update({pid: _cmdline(pid) for pid, start in seen.items() if _alive(pid, start)})
            if not left or time.monotonic() - begin > limit_s:
                return returncode, elapsed, commands, left, log.read_text(errors="replace")
            time.sleep(0.1)
    finally:
        _kill_leftovers(proc, seen)
        for pid in set(processes_with(marker, 0)) - spare:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("token", "marked"),
    [("a1", True), ("b2", True), ("c3", True), ("a", False), ("a1:b2", False), ("z9", False)],
)
def test_only_a_run_s_own_token_marks_a_process(token: str, marked: bool) -> None:
    # Prepare: the environment of a process of nested runs a1 > b2 > c3.
    environ = f"PATH=/bin\0{MARKER_VAR}=a1:b2:c3\0OTHER={MARKER_VAR}=z9\0".encode()
    # Execute / Assert
    assert carries(environ, token) is marked


#: A tree that stays: the root waits for a child in a session of its own; an orphan is left
#: in the root's session. Only the root is a direct child of the command.
LASTING_TREE = """
sh -c 'tail -f "$1" &' sh "$1"
setsid sh -c 'tail -f "$1" & wait' sh "$1" &
wait
"""


def test_sigkill_to_the_command_stops_the_processes_of_its_run_and_only_those(
    tmp_path: Path,
) -> None:
    # Prepare: bystanders with the test's marker: one of no run, one of another run.
    (tmp_path / "marker").touch()
    marker = str(tmp_path / "marker")
    value = uuid.uuid4().hex
    bystanders = [
        subprocess.Popen(["sleep", "120"], env={**os.environ, "DOCL_TEST_MARKER": value}),
        subprocess.Popen(
            ["sleep", "120"],
            env={**os.environ, "DOCL_TEST_MARKER": value, MARKER_VAR: "0123456789abcdef"},
        ),
    ]
    spare = {b.pid for b in bystanders}

    def started(_log: Path) -> bool:
        return sum(cmd.startswith("tail") for cmd in _naming(marker).values()) == 2

    try:
        # Execute
        cmd = [sys.executable, "-c", COMMAND, LASTING_TREE, str(tmp_path)]
        returncode, elapsed, commands, left, output = _signal_and_watch(
            cmd, tmp_path, value, started, signal.SIGKILL, spare
        )
        # Assert: the tree was there (and the watchdog), then nothing of it within 10 s.
        assert returncode == -signal.SIGKILL
        assert any(c.startswith("tail") for c in commands), commands  # one is an orphan
        assert any("watchdog.py" in c for c in commands), commands
        assert left == {}, left
        assert elapsed < 10.0
        assert "docl-flower watchdog: the command" in output and "died" in output, output
        assert _naming(marker) == {}
        assert all(b.poll() is None for b in bystanders)
    finally:
        for bystander in bystanders:
            bystander.kill()
            bystander.wait()


#: A command that starts a process behind the trees' back, then leaves normally.
MISSED = """
import subprocess
from docl_flower.operations.processes import exit_on_signals
with exit_on_signals():
    subprocess.Popen(["sleep", "120"], stdout=subprocess.DEVNULL, start_new_session=True)
"""


def test_the_watchdog_ends_with_the_command_and_stops_what_the_trees_missed() -> None:
    # Prepare
    value = uuid.uuid4().hex
    env = {**os.environ, "DOCL_TEST_MARKER": value}
    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", MISSED], capture_output=True, text=True, env=env, timeout=60
    )
    # Assert: at once, neither the watchdog nor the untracked process is left.
    left = processes_with(f"DOCL_TEST_MARKER={value}", settle_s=0)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert left == []
    assert "left them running: stopped 1 processes" in proc.stderr, proc.stderr[-2000:]


def test_sigkill_to_docl_flower_leaves_no_process_of_the_run(
    tiny_root: Path, tmp_path: Path
) -> None:
    # Execute
    cmd = [
        CLI,
        "num_users=3",
        *LONG_TRAINING,
        f"data_root={tiny_root}",
        "dataset.verify=false",
        "dataset.harmless.verify=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    returncode, elapsed, commands, left, _ = _signal_and_watch(
        cmd, tmp_path, uuid.uuid4().hex, _simulation_training, signal.SIGKILL
    )
    # Assert: the whole tree was seen (SuperLink, SuperExec, simulation, Ray, ClientApps) ...
    assert any("flower-superlink" in c for c in commands), commands
    assert any("flwr-simulation" in c for c in commands), commands
    assert any("raylet" in c for c in commands), commands
    assert any("ClientAppActor" in c for c in commands), commands
    # ... and nothing of it is left 10 s after the SIGKILL.
    assert returncode == -signal.SIGKILL
    assert left == {}, left
    assert elapsed < 10.0
    print(f"SIGKILL to docl-flower: no process of the run left after {elapsed:.1f} s")


#: A local deployment (the deploy demo's LocalDeployment): a real SuperLink, which starts a
#: SuperExec in a session of its own, and a real SuperNode; it waits until it is stopped.
DEPLOYMENT = """
import sys, time
from pathlib import Path
from docl_flower.operations.deploy import LocalDeployment
from docl_flower.operations.processes import exit_on_signals
with exit_on_signals(), LocalDeployment(Path(sys.argv[1]), secure=False) as dep:
    dep.start_superlink()
    dep.add_node(0, "user-id=0")
    print("deployed", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL], ids=["sighup", "sigkill"])
def test_a_local_deployment_stops_on_sighup_and_after_sigkill(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Prepare
    def started(log: Path) -> bool:
        return "deployed" in log.read_text(errors="replace")

    # Execute
    cmd = [sys.executable, "-c", DEPLOYMENT, str(tmp_path / "deploy")]
    returncode, elapsed, commands, left, output = _signal_and_watch(
        cmd, tmp_path, uuid.uuid4().hex, started, sig
    )
    # Assert
    assert any("flower-superexec" in c for c in commands), commands
    assert any("flower-supernode" in c for c in commands), commands
    assert returncode == (128 + sig if sig != signal.SIGKILL else -sig), output[-3000:]
    assert left == {}, left
    assert elapsed < 10.0
    print(f"{sig.name} to a local deployment: no process left after {elapsed:.1f} s")
