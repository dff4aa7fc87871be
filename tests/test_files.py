"""core/common/files.py: content hashes cached per process, and crash-safe writes."""

from __future__ import annotations

import hashlib
import os

import pytest

from docl_flower.core.common.files import (
    atomic_write,
    cached_digest,
    file_sha256,
    write_bytes_atomic,
)


def _counting(calls):
    def compute(path):
        calls.append(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    return compute


def test_a_cached_digest_is_computed_once_until_the_file_is_replaced(tmp_path):
    # Prepare
    path = tmp_path / "weights.bin"
    write_bytes_atomic(path, b"first")
    calls = []
    compute = _counting(calls)

    # Execute
    first = cached_digest("test-replace", path, compute)
    again = cached_digest("test-replace", path, compute)
    write_bytes_atomic(path, b"other")  # a new inode
    replaced = cached_digest("test-replace", path, compute)

    # Assert
    assert first == again == hashlib.sha256(b"first").hexdigest()
    assert replaced == hashlib.sha256(b"other").hexdigest()
    assert len(calls) == 2


def test_a_file_rewritten_in_place_is_hashed_again(tmp_path):
    # Prepare: the same inode, rewritten (another size) with its old modification time.
    path = tmp_path / "data.bin"
    path.write_bytes(b"aaaa")
    before = file_sha256(path)
    st = path.stat()
    path.write_bytes(b"bbbbb")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    # Execute
    after = file_sha256(path)

    # Assert: the size differs, so the stamp does too.
    assert before == hashlib.sha256(b"aaaa").hexdigest()
    assert after == hashlib.sha256(b"bbbbb").hexdigest()


def test_cached_digests_of_different_kinds_do_not_mix(tmp_path):
    # Prepare
    path = tmp_path / "f"
    path.write_bytes(b"x")

    # Execute
    one = cached_digest("test-kind-a", path, lambda p: "a")
    two = cached_digest("test-kind-b", path, lambda p: "b")

    # Assert
    assert (one, two) == ("a", "b")


def test_hashing_a_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        file_sha256(tmp_path / "absent")


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    # Prepare
    path = tmp_path / "filter.json"
    path.write_text("old")

    def crash(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    # Execute
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash)

    # Assert
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["filter.json"]
