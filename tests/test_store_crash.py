"""A save killed at any step leaves exactly the old filter or exactly the new one.

A child process (``sys.executable -c``) imports the store once, then for every ``k`` copies the
prepared folder and forks a process that runs one save with the step functions (``os.replace``,
``os.fsync``, ``os.unlink`` hence ``Path.unlink``, ``os.link``, ``os.write``, and the file
writes ``Path.write_bytes`` / ``Path.write_text``, which write half their data first) patched
to kill it (``os._exit(1)``) at their ``k``-th call, until a save runs to its end. Each folder
left behind is then loaded here and saved to once more.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from docl_flower.core.filter.global_filter import Registration
from docl_flower.core.filter.store import (
    KEY_ENV,
    META_FILE,
    PersistentFilter,
    content_hash,
    load_filter,
    segment_files,
)

from .conftest import PROJECT_ROOT, random_registration

INFO = {"config": {"features": {"_target_": "docl_flower.core.features.Deskew"}}}

DRIVER = r"""
import json, os, pathlib, pickle, shutil, sys

from docl_flower.core.filter import store

cfg = json.loads(sys.argv[1])
template, out = pathlib.Path(cfg["template"]), pathlib.Path(cfg["out"])
with open(cfg["job"], "rb") as handle:
    job = pickle.load(handle)


def run_save(case):
    folder = case / "filter"
    if job["mode"] == "register":
        pf = store.PersistentFilter(folder, job["info"])  # loads before any step is patched
        arm()
        pf.register(job["user"], job["regs"], [{"node_id": 7}] * len(job["regs"]))
    else:
        arm()
        store.save_filter(folder, job["regs"], info=job["info"])


def arm():
    calls = [0]

    def hit():
        calls[0] += 1
        return calls[0] == K

    def step(fn):
        def wrapped(*args, **kwargs):
            if hit():
                os._exit(1)
            return fn(*args, **kwargs)
        return wrapped

    def half_write(fn):
        def wrapped(self, data, *args, **kwargs):
            if hit():
                raw = data.encode() if isinstance(data, str) else data
                with open(self, "wb") as handle:
                    handle.write(raw[: len(raw) // 2])
                os._exit(1)
            return fn(self, data, *args, **kwargs)
        return wrapped

    for name in ("replace", "fsync", "unlink", "link", "write"):
        setattr(os, name, step(getattr(os, name)))
    pathlib.Path.write_bytes = half_write(pathlib.Path.write_bytes)
    pathlib.Path.write_text = half_write(pathlib.Path.write_text)


results = []
for K in range(1, 200):
    case = out / f"k{K}"
    shutil.copytree(template, case)
    os.environ[store.KEY_ENV] = str(case / "key" / "filter.key")
    pid = os.fork()
    if pid == 0:
        try:
            run_save(case)
        except BaseException:
            os._exit(2)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    results.append([K, os.waitstatus_to_exitcode(status)])
    if results[-1][1] != 1:
        break
print(json.dumps(results))
"""

State = tuple[list[tuple[int, str]], list[tuple[int, str]]]


def _state(case: Path, monkeypatch: pytest.MonkeyPatch) -> State:
    """(user, content hash) of the entries and of the history of the filter in ``case``."""
    monkeypatch.setenv(KEY_ENV, str(case / "key" / "filter.key"))
    store = PersistentFilter(case / "filter", INFO)
    if (case / "filter" / META_FILE).exists():
        load_filter(case / "filter")  # the full check, HMAC included
    return (
        [(r.user_id, content_hash(r.params)) for r in store.registrations],
        [(r.user_id, content_hash(r.params)) for r, _ in store.history],
    )


def _crash_every_step(
    tmp_path: Path, template: Path, job: dict[str, Any]
) -> tuple[list[Path], Path]:
    """Run the driver; return the folders of the crashed saves and of the completed one."""
    (tmp_path / "job.pkl").write_bytes(pickle.dumps(job))
    out = tmp_path / "cases"
    out.mkdir()
    cfg = {"template": str(template), "out": str(out), "job": str(tmp_path / "job.pkl")}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cfg)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [rc for _, rc in results[:-1]] == [1] * (len(results) - 1)
    assert results[-1][1] == 0, f"the save failed (not crashed) at step {results[-1][0]}"
    return [out / f"k{k}" for k, _ in results[:-1]], out / f"k{results[-1][0]}"


def _assert_every_crash_leaves_old_or_new(
    crashed: list[Path], done: Path, old: State, new: State, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _state(done, monkeypatch) == new
    seen = []
    rng = np.random.default_rng(99)
    for case in crashed:
        state = _state(case, monkeypatch)  # never raises
        assert state in (old, new), f"{case.name}: {state}"
        seen.append("old" if state == old else "new")
        # A following normal save works and removes what the crash left in the folder.
        store = PersistentFilter(case / "filter", INFO)
        store.register(50, [random_registration(rng, 50, 5)], [{}])
        regs, _ = load_filter(case / "filter")
        assert [r.user_id for r in regs] == [u for u, _ in state[0]] + [50]
        segments = segment_files(case / "filter")
        assert segments
        assert sorted(p.name for p in (case / "filter").iterdir()) == sorted(
            [META_FILE, *(p.name for p in segments)]
        )
    # The commit point lies inside the save: some crashes keep the old filter, later ones
    # (after the commit, before the clean-up) leave the new one.
    assert "old" in seen and "new" in seen
    assert seen == sorted(seen, key=lambda s: s == "new"), seen  # old ... old new ... new


def _user(rng: np.random.Generator, user: int) -> Registration:
    return random_registration(rng, user, user)


def test_a_crash_at_any_step_of_a_save_leaves_the_old_or_the_new_filter(tmp_path, monkeypatch):
    # Prepare: users 0 and 1 saved; the save registers a new version of user 1.
    rng = np.random.default_rng(0)
    template = tmp_path / "template"
    monkeypatch.setenv(KEY_ENV, str(template / "key" / "filter.key"))
    store = PersistentFilter(template / "filter", INFO)
    first = [_user(rng, 0), _user(rng, 1)]
    for reg in first:
        store.register(reg.user_id, [reg], [{}])
    new1 = _user(rng, 1)
    job = {"mode": "register", "user": 1, "regs": [new1], "info": INFO}
    # Execute
    crashed, done = _crash_every_step(tmp_path, template, job)
    # Assert
    assert len(crashed) >= 8  # every write, fsync, rename and removal of the save
    h = [content_hash(r.params) for r in [*first, new1]]
    old: State = ([(0, h[0]), (1, h[1])], [])
    new: State = ([(0, h[0]), (1, h[2])], [(1, h[1])])
    _assert_every_crash_leaves_old_or_new(crashed, done, old, new, monkeypatch)


def test_a_crash_during_the_first_save_leaves_no_filter_or_the_new_one(tmp_path, monkeypatch):
    # Prepare: an empty folder and no key yet (the save creates it).
    rng = np.random.default_rng(1)
    template = tmp_path / "template"
    (template / "filter").mkdir(parents=True)
    regs = [_user(rng, 0), _user(rng, 1)]
    job = {"mode": "save", "regs": regs, "info": INFO}
    # Execute
    crashed, done = _crash_every_step(tmp_path, template, job)
    # Assert
    assert len(crashed) >= 12  # key creation, empty commit, tensors, commit
    old: State = ([], [])  # never a folder of tensors without a filter.json (refused)
    new: State = ([(r.user_id, content_hash(r.params)) for r in regs], [])
    _assert_every_crash_leaves_old_or_new(crashed, done, old, new, monkeypatch)
