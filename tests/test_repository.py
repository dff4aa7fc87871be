"""The repository holds no link or path of one developer's machine (CI runs elsewhere)."""

from __future__ import annotations

import re
import subprocess

from .conftest import PROJECT_ROOT

#: Absolute paths that only exist on someone's machine.
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:home|Users|root|work|mnt|media)/[\w.-]+")


def tracked() -> list[tuple[str, str]]:
    """(mode, path) of every file git tracks."""
    out = subprocess.run(
        ["git", "ls-files", "-s", "-z"], cwd=PROJECT_ROOT, capture_output=True, check=True
    ).stdout.decode()
    rows = []
    for entry in filter(None, out.split("\0")):
        meta, path = entry.split("\t", 1)
        rows.append((meta.split()[0], path))
    return rows


def machine_paths(text: str) -> list[str]:
    """Absolute machine paths in ``text`` (the checkout's own path included)."""
    found = MACHINE_PATH.findall(text)
    if str(PROJECT_ROOT) in text:
        found.append(str(PROJECT_ROOT))
    return found


def test_no_tracked_symlinks():
    assert [path for mode, path in tracked() if mode == "120000"] == []


def test_no_tracked_file_holds_an_absolute_path_of_this_machine():
    bad = {}
    for _, path in tracked():
        data = (PROJECT_ROOT / path).read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (images, archives)
        found = machine_paths(data.decode("utf-8", errors="replace"))
        if found:
            bad[path] = sorted(set(found))
    assert bad == {}


def test_the_path_check_finds_what_it_looks_for():
    home = "/" + "home/alice"  # split, so that this file does not hold the path itself
    assert machine_paths(f"root: {home}/data/mnist") == [home]
    assert machine_paths(f"see {PROJECT_ROOT}/data") != []
    assert machine_paths("torch.optim.Adam, https://example.org/home/x, ${data_root}/mnist") == []
