"""The saved filter: round trip, one atomic unit, integrity (SHA-256 + HMAC), stable keys."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from docl_flower.core.filter.store import (
    KEY_ENV,
    META_FILE,
    PersistentFilter,
    canonical,
    content_hash,
    filter_key_path,
    key_id,
    load_filter,
    load_history,
    save_filter,
    tensors_file,
)

from .conftest import random_registration

CONFIG = {"features": {"_target_": "docl_flower.core.features.Deskew"}, "guard": {"alpha": 1.5}}


@pytest.fixture(autouse=True)
def filter_key(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A key file of this test only (never the real ``~/.config``)."""
    path = tmp_path_factory.mktemp("key") / "filter.key"
    monkeypatch.setenv(KEY_ENV, str(path))
    return path


def _saved(folder: Path, users: int = 3) -> list[Any]:
    rng = np.random.default_rng(0)
    regs = [random_registration(rng, u, u) for u in range(users)]
    extra = {k: {"node_id": 100 + k, "trained_on": [k]} for k in range(users)}
    save_filter(folder, regs, extra, info={"config": CONFIG})
    return regs


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _meta(folder: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((folder / META_FILE).read_text())
    return meta


def _write_meta(folder: Path, meta: dict[str, Any], redigest: bool = False) -> None:
    """Write ``meta`` back; with ``redigest``, recompute its SHA-256 as one without the key can."""
    if redigest:
        body = {k: v for k, v in meta.items() if k != "integrity"}
        meta["integrity"]["sha256"] = hashlib.sha256(canonical(body)).hexdigest()
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


# ---------------------------------------------------------------- round trip


def test_saved_filter_round_trips_with_metadata(tmp_path):
    rng = np.random.default_rng(0)
    regs = [random_registration(rng, u, u) for u in range(3)]
    save_filter(tmp_path / "f", regs, extra={1: {"node_id": 42}}, info={"config": CONFIG})
    loaded, meta = load_filter(tmp_path / "f")
    assert [(r.user_id, r.label, r.err_mean, r.err_std, r.num_examples) for r in loaded] == [
        (r.user_id, r.label, r.err_mean, r.err_std, r.num_examples) for r in regs
    ]
    for a, b in zip(regs, loaded, strict=True):
        assert content_hash(a.params) == content_hash(b.params)
    assert meta["entries"][1]["node_id"] == 42 and meta["config"] == CONFIG
    assert [e["user_id"] for e in meta["entries"]] == [0, 1, 2]
    assert meta["format"] == 3 and set(meta["integrity"]) == {"sha256", "hmac_sha256", "key_id"}


def test_the_first_save_creates_a_private_key(tmp_path, filter_key):
    assert not filter_key.exists()
    _saved(tmp_path / "f", users=1)
    assert len(filter_key.read_bytes()) == 32
    assert stat.S_IMODE(filter_key.stat().st_mode) == 0o600
    assert filter_key_path() == filter_key


def test_the_key_defaults_to_the_user_config_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert filter_key_path() == tmp_path / "xdg" / "docl-flower" / "filter.key"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert filter_key_path() == tmp_path / "home" / ".config" / "docl-flower" / "filter.key"


def test_an_empty_filter_and_history_round_trip(tmp_path):
    save_filter(tmp_path / "f", [], info={"config": CONFIG})
    regs, meta = load_filter(tmp_path / "f")
    assert regs == [] and meta["tensors"] == [] and load_history(tmp_path / "f", meta) == []
    assert sorted(_files(tmp_path / "f")) == [META_FILE]


def test_reserved_names_in_metadata_are_refused(tmp_path):
    reg = random_registration(np.random.default_rng(0), 0, 0)
    with pytest.raises(ValueError, match="entries"):
        save_filter(tmp_path, [reg], info={"entries": []})
    with pytest.raises(ValueError, match="user_id"):
        save_filter(tmp_path, [reg], extra={0: {"user_id": 5}})


# ---------------------------------------------------------------- one atomic unit


def test_one_tensors_file_named_by_its_hash_and_leftovers_are_removed_by_the_next_save(tmp_path):
    _saved(tmp_path)
    path = tensors_file(tmp_path)
    assert path is not None
    assert path.name == f"autoencoders-{hashlib.sha256(path.read_bytes()).hexdigest()}.safetensors"
    stray = tmp_path / f"autoencoders-{'0' * 64}.safetensors"
    stray.write_bytes(b"left by a crash")
    (tmp_path / f".{META_FILE}.abc.tmp").write_text("{")
    (tmp_path / f".{path.name}.abc.tmp").write_bytes(b"half")
    assert len(load_filter(tmp_path)[0]) == 3  # leftovers are harmless
    _saved(tmp_path, users=2)
    assert sorted(_files(tmp_path)) == sorted([META_FILE, tensors_file(tmp_path).name])  # type: ignore[union-attr]


def test_a_missing_or_empty_folder_is_a_new_filter(tmp_path):
    assert PersistentFilter(tmp_path / "missing", {}).entries == []
    (tmp_path / "empty").mkdir()
    assert PersistentFilter(tmp_path / "empty", {}).entries == []
    with pytest.raises(FileNotFoundError):
        load_filter(tmp_path / "empty")


BROKEN_META: dict[str, Callable[[Path], None]] = {
    "missing": lambda p: p.unlink(),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "garbage": lambda p: p.write_bytes(b"\x00\xffnot json"),
    "empty": lambda p: p.write_bytes(b""),
    "not an object": lambda p: p.write_text("[]"),
}


@pytest.mark.parametrize("damage", list(BROKEN_META))
def test_tensors_without_a_readable_filter_json_are_refused_and_kept(tmp_path, damage):
    # Prepare
    _saved(tmp_path)
    BROKEN_META[damage](tmp_path / META_FILE)
    before = _files(tmp_path)
    # Execute / Assert
    with pytest.raises(ValueError, match=META_FILE):
        load_filter(tmp_path)
    with pytest.raises(ValueError, match=META_FILE):
        PersistentFilter(tmp_path, {})
    with pytest.raises(ValueError, match=META_FILE):
        save_filter(tmp_path, [random_registration(np.random.default_rng(1), 5, 5)])
    assert _files(tmp_path) == before


# ---------------------------------------------------------------- integrity


def _edit_entry(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        meta["entries"][1][field] = value

    return edit


def _remove(meta: dict[str, Any]) -> None:
    del meta["entries"][1]


def _swap(meta: dict[str, Any]) -> None:
    e = meta["entries"]
    e[0], e[1] = e[1], e[0]


def _features(meta: dict[str, Any]) -> None:
    meta["config"]["features"] = {"_target_": "docl_flower.core.features.Identity"}


def _alpha(meta: dict[str, Any]) -> None:
    meta["config"]["guard"]["alpha"] = 1000.0


TAMPER: dict[str, Callable[[dict[str, Any]], None]] = {
    "user_id": _edit_entry("user_id", 7),
    "label": _edit_entry("label", 7),
    "err_mean": _edit_entry("err_mean", 99.0),
    "err_std": _edit_entry("err_std", 99.0),
    "num_examples": _edit_entry("num_examples", 1),
    "free metadata": _edit_entry("node_id", 1),
    "config.features": _features,
    "config.guard": _alpha,
    "removed entry": _remove,
    "swapped entries": _swap,
}


@pytest.mark.parametrize("edit", list(TAMPER))
def test_an_edited_filter_json_fails_its_digest(tmp_path, edit):
    _saved(tmp_path)
    meta = _meta(tmp_path)
    TAMPER[edit](meta)
    _write_meta(tmp_path, meta)
    with pytest.raises(ValueError, match="fails its SHA-256 digest"):
        load_filter(tmp_path)
    with pytest.raises(ValueError, match="fails its SHA-256 digest"):
        load_filter(tmp_path, verify_key=False)  # the unkeyed level catches it too
    with pytest.raises(ValueError, match="SHA-256 digest"):
        PersistentFilter(tmp_path, {})


@pytest.mark.parametrize("edit", list(TAMPER))
def test_an_edit_with_a_recomputed_digest_fails_the_hmac(tmp_path, edit):
    _saved(tmp_path)
    meta = _meta(tmp_path)
    TAMPER[edit](meta)
    _write_meta(tmp_path, meta, redigest=True)
    with pytest.raises(ValueError, match="fails its HMAC-SHA256"):
        load_filter(tmp_path)


def _flip_a_tensor_byte(folder: Path) -> Path:
    path = tensors_file(folder)
    assert path is not None
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's float32 data
    path.write_bytes(bytes(data))
    return path


def test_a_changed_tensor_byte_fails_the_tensors_file_hash(tmp_path):
    _saved(tmp_path)
    _flip_a_tensor_byte(tmp_path)
    with pytest.raises(ValueError, match=r"tensors file .* fails its SHA-256"):
        load_filter(tmp_path)


def test_a_changed_tensor_with_updated_hashes_fails_the_hmac_then_the_content_hash(tmp_path):
    _saved(tmp_path)
    path = _flip_a_tensor_byte(tmp_path)
    meta = _meta(tmp_path)
    meta["tensors"][-1]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    _write_meta(tmp_path, meta, redigest=True)
    with pytest.raises(ValueError, match="HMAC"):
        load_filter(tmp_path)
    with pytest.raises(ValueError, match="fails its content hash"):
        load_filter(tmp_path, verify_key=False)


def test_a_tensor_rewritten_by_safetensors_is_detected(tmp_path):
    _saved(tmp_path, users=1)
    path = tensors_file(tmp_path)
    assert path is not None
    tensors = load_file(str(path))
    name = next(n for n in tensors if n.endswith("decoder.bias"))
    tensors[name][0] += 1.0
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="SHA-256"):
        load_filter(tmp_path)


def test_a_missing_tensors_file_is_refused(tmp_path):
    _saved(tmp_path)
    tensors_file(tmp_path).unlink()  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="is missing"):
        load_filter(tmp_path)


def test_without_the_key_file_a_signed_filter_is_refused(tmp_path, filter_key):
    _saved(tmp_path)
    filter_key.unlink()
    with pytest.raises(ValueError, match=re.escape(f"key file {filter_key} is missing")):
        load_filter(tmp_path)
    assert len(load_filter(tmp_path, verify_key=False)[0]) == 3


def test_with_another_key_the_filter_is_refused(tmp_path, filter_key):
    _saved(tmp_path)
    filter_key.write_bytes(os.urandom(32))
    with pytest.raises(ValueError, match="signed with another key"):
        load_filter(tmp_path)
    with pytest.raises(ValueError, match="another key"):
        PersistentFilter(tmp_path, {})


def test_a_forged_key_id_still_fails_the_hmac(tmp_path, filter_key):
    _saved(tmp_path)
    meta = _meta(tmp_path)
    filter_key.write_bytes(os.urandom(32))
    meta["integrity"]["key_id"] = key_id(filter_key.read_bytes())
    _write_meta(tmp_path, meta)
    with pytest.raises(ValueError, match="fails its HMAC-SHA256"):
        load_filter(tmp_path)


def test_an_unsigned_filter_is_refused_unless_the_caller_opts_out(tmp_path):
    _saved(tmp_path)
    meta = _meta(tmp_path)
    del meta["integrity"]["hmac_sha256"], meta["integrity"]["key_id"]
    _write_meta(tmp_path, meta)
    with pytest.raises(ValueError, match=r"no HMAC.*verify_key=False"):
        load_filter(tmp_path)
    regs, _ = load_filter(tmp_path, verify_key=False)
    assert [r.user_id for r in regs] == [0, 1, 2]


def test_no_integrity_block_is_refused(tmp_path):
    _saved(tmp_path)
    meta = _meta(tmp_path)
    del meta["integrity"]
    _write_meta(tmp_path, meta)
    with pytest.raises(ValueError, match="no integrity block"):
        load_filter(tmp_path, verify_key=False)


def test_unknown_format_is_refused(tmp_path):
    _saved(tmp_path, users=1)
    meta = _meta(tmp_path)
    meta["format"] = 99
    _write_meta(tmp_path, meta)
    with pytest.raises(ValueError, match="format"):
        load_filter(tmp_path)


def test_format_1_is_refused_with_a_clear_message(tmp_path):
    reg = random_registration(np.random.default_rng(0), 0, 0)
    save_file(
        {f"0/{k}": v for k, v in reg.params.items()}, str(tmp_path / "autoencoders.safetensors")
    )
    entry = {"key": 0, "user_id": 0, "label": 0, "err_mean": 1.0, "err_std": 0.5}
    meta = {
        "format": 1,
        "entries": [{**entry, "num_examples": 10, "sha256": content_hash(reg.params)}],
    }
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 1 is no longer read"):
        load_filter(tmp_path)
    with pytest.raises(ValueError, match="format 1"):
        PersistentFilter(tmp_path, {})


def test_history_is_covered_too(tmp_path):
    rng = np.random.default_rng(0)
    old, new = random_registration(rng, 0, 0), random_registration(rng, 0, 0)
    save_filter(tmp_path, [new], history=[(old, {"replaced_at": 1.0})])
    meta = _meta(tmp_path)
    meta["history"][0]["err_std"] = 50.0
    _write_meta(tmp_path, meta)
    with pytest.raises(ValueError, match="digest"):
        load_filter(tmp_path)


# ---------------------------------------------------------------- stable keys


def _keys(folder: Path) -> dict[int, str]:
    return {int(e["user_id"]): e["key"] for e in _meta(folder)["entries"]}


def test_keys_do_not_move_when_users_join_leave_or_are_replaced(tmp_path):
    # Prepare
    rng = np.random.default_rng(0)
    store = PersistentFilter(tmp_path, {"config": CONFIG})
    for u in (0, 1, 2):
        store.register(u, [random_registration(rng, u, u)], [{}])
    first = _keys(tmp_path)
    # Execute: user 3 joins, user 1 is replaced (moves to the end), user 0 leaves.
    store.register(3, [random_registration(rng, 3, 3)], [{}])
    store.register(1, [random_registration(rng, 1, 1)], [{}])
    save_filter(tmp_path, store.registrations[1:], info={"config": CONFIG})
    # Assert
    after = _keys(tmp_path)
    assert sorted(after) == [1, 2, 3]
    assert after[2] == first[2] and after[1] != first[1]
    assert all(k.startswith(f"u{u}/c{u}/") for u, k in after.items())
    assert len(load_filter(tmp_path)[0]) == 3


def test_a_failed_save_leaves_the_persistent_filter_unchanged(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    store = PersistentFilter(tmp_path, {})
    store.register(0, [random_registration(rng, 0, 0)], [{}])
    before = _files(tmp_path)

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("docl_flower.core.filter.store.write_bytes_atomic", fail)
    with pytest.raises(OSError, match="disk full"):
        store.register(0, [random_registration(rng, 0, 0)], [{}])
    assert store.users == {0} and store.history == []
    assert _files(tmp_path) == before


def test_a_forged_tensors_file_with_recomputed_hashes_is_refused_without_the_key(tmp_path):
    _saved(tmp_path)
    path = tensors_file(tmp_path)
    assert path is not None
    path.write_bytes(b"not a safetensors file")
    meta = _meta(tmp_path)
    meta["tensors"][-1]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    _write_meta(tmp_path, meta, redigest=True)
    with pytest.raises(ValueError, match="unreadable"):
        load_filter(tmp_path, verify_key=False)
