"""A filter that grows one registration at a time writes O(N log N) bytes, not O(N^2)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from docl_flower.core.filter import store as store_module
from docl_flower.core.filter.store import (
    META_FILE,
    PersistentFilter,
    content_hash,
    load_filter,
    save_filter,
    segment_files,
)

from .conftest import random_registration

INFO = {"config": {"seed": 0}}


def _grow(folder: Path, users: int, monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list]:
    """Register ``users`` users one by one; return the bytes each save wrote and the regs."""
    written: list[int] = []
    real = store_module.write_bytes_atomic

    def counting(path: Path, data: bytes) -> None:
        if path.name != META_FILE:  # tensors only (filter.json grows with every entry anyway)
            written[-1] += len(data)
        real(path, data)

    monkeypatch.setattr(store_module, "write_bytes_atomic", counting)
    rng = np.random.default_rng(0)
    pf = PersistentFilter(folder, INFO)
    regs = []
    for user in range(users):
        written.append(0)
        reg = random_registration(rng, user, user % 10)
        regs.append(reg)
        pf.register(user, [reg], [{"node_id": user}])
    return written, regs


def test_each_registration_writes_few_bytes_and_segments_stay_logarithmic(tmp_path, monkeypatch):
    users = 64
    written, regs = _grow(tmp_path / "f", users, monkeypatch)
    one = written[0]  # one autoencoder's segment
    # A binary counter: N saves write N * (log2(N) / 2 + 1) autoencoders on average; rewriting
    # the whole filter every time would write N (N + 1) / 2 = 2,080 of them here.
    assert sum(written) <= one * users * (math.log2(users) / 2 + 1) * 1.05
    segments = segment_files(tmp_path / "f")
    assert 1 <= len(segments) <= math.log2(users) + 1
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == sorted(
        [META_FILE, *(p.name for p in segments)]
    )
    loaded, meta = load_filter(tmp_path / "f")
    assert [content_hash(r.params) for r in loaded] == [content_hash(r.params) for r in regs]
    assert meta["format"] == 3 and len(meta["tensors"]) == len(segments)
    # Reopened, it keeps growing from the same segments.
    pf = PersistentFilter(tmp_path / "f", INFO)
    assert [s.file for s in pf.segments] == [p.name for p in segments]
    pf.register(users, [random_registration(np.random.default_rng(1), users, 3)], [{}])
    assert len(load_filter(tmp_path / "f")[0]) == users + 1


def test_replacing_a_user_keeps_its_old_version_in_the_history(tmp_path, monkeypatch):
    _grow(tmp_path / "f", 9, monkeypatch)
    pf = PersistentFilter(tmp_path / "f", INFO)
    new = random_registration(np.random.default_rng(5), 4, 4)
    pf.register(4, [new], [{}])
    again = PersistentFilter(tmp_path / "f", INFO)
    assert content_hash(next(r for r in again.registrations if r.user_id == 4).params) == (
        content_hash(new.params)
    )
    assert [r.user_id for r, _ in again.history] == [4]


def test_a_changed_byte_in_an_old_segment_is_refused(tmp_path, monkeypatch):
    _grow(tmp_path / "f", 7, monkeypatch)  # segments of 4, 2 and 1 autoencoders
    oldest = segment_files(tmp_path / "f")[0]
    data = bytearray(oldest.read_bytes())
    data[-5] ^= 0x01
    oldest.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fails its SHA-256"):
        load_filter(tmp_path / "f")
    with pytest.raises(ValueError, match="fails its SHA-256"):
        PersistentFilter(tmp_path / "f", INFO)


def test_a_segment_whose_listed_keys_differ_from_its_tensors_is_refused(tmp_path, monkeypatch):
    _grow(tmp_path / "f", 3, monkeypatch)
    meta_path = tmp_path / "f" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["tensors"][0]["keys"] = meta["tensors"][0]["keys"][:-1]
    meta_path.write_text(json.dumps(meta))
    # Unsigned edit: the digest catches it first; re-sealed (as with the key), the keys check.
    with pytest.raises(ValueError, match="SHA-256 digest"):
        load_filter(tmp_path / "f")
    body = {k: v for k, v in meta.items() if k != "integrity"}
    data = store_module.canonical(body)
    meta["integrity"]["sha256"] = hashlib.sha256(data).hexdigest()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="other keys than listed"):
        load_filter(tmp_path / "f", verify_key=False)


def test_a_format_2_filter_with_one_tensors_file_is_still_read(tmp_path):
    rng = np.random.default_rng(3)
    regs = [random_registration(rng, u, u) for u in range(3)]
    save_filter(tmp_path / "f", regs, info=INFO)
    meta_path = tmp_path / "f" / META_FILE
    meta = json.loads(meta_path.read_text())
    ref = meta["tensors"][0]
    meta["format"] = 2
    meta["tensors"] = {"file": ref["file"], "sha256": ref["sha256"]}
    body = {k: v for k, v in meta.items() if k != "integrity"}
    meta["integrity"]["sha256"] = hashlib.sha256(store_module.canonical(body)).hexdigest()
    del meta["integrity"]["hmac_sha256"]
    meta_path.write_text(json.dumps(meta))
    loaded, _ = load_filter(tmp_path / "f", verify_key=False)
    assert [content_hash(r.params) for r in loaded] == [content_hash(r.params) for r in regs]


# --- saving after every registration: each entry encoded once, the same bytes as before


@pytest.mark.parametrize(
    "payload",
    [
        {"format": 3, "entries": [], "history": [], "tensors": []},
        {"config": {"b": 1, "a": [1.5, -0.0, 1e300, None, True]}, "format": 3},
        {"config": {"ünï": "cödé ✓", "quote": 'a"b\\c', 10: "ten", 9: "nine"}, "z": []},
        {"entries": [{"user_id": 3, "err_mean": 0.1 + 0.2, "trained_on": (1, 2)}], "k": {}},
        {"nan": float("nan"), "inf": float("-inf"), "big": 2**70},
    ],
)
def test_a_filter_body_assembled_from_encoded_parts_is_the_canonical_body(payload):
    normal = store_module._normal(payload)
    parts = {k: store_module.canonical(v) for k, v in normal.items()}
    assert store_module._assemble(parts) == store_module.canonical(normal)
    # And a reader, which parses the file and serialises it again, gets the same bytes.
    assert store_module.canonical(json.loads(store_module._assemble(parts))) == (
        store_module._assemble(parts)
    )


def test_a_filter_saved_after_every_registration_verifies_and_keeps_replaced_versions(tmp_path):
    rng = np.random.default_rng(3)
    pf = PersistentFilter(tmp_path / "f", INFO)
    for user in range(12):
        pf.register(user, [random_registration(rng, user, user % 10)], [{"node_id": user}])
    # A user replaces its autoencoder: the cached encoding of the old entry must not survive.
    new = random_registration(rng, 4, 4)
    pf.register(4, [new], [{"node_id": 99}])
    loaded, meta = load_filter(tmp_path / "f")
    assert [r.user_id for r in loaded] == [*range(4), *range(5, 12), 4]
    assert meta["entries"][-1]["node_id"] == 99
    assert content_hash(loaded[-1].params) == content_hash(new.params)
    assert [e["user_id"] for e in meta["history"]] == [4]
    assert "replaced_at" in meta["history"][0]
    # Reopened: the same entries with the same metadata.
    again = PersistentFilter(tmp_path / "f", INFO)
    assert [e for _, e in again.entries] == [e for _, e in pf.entries]


@pytest.mark.parametrize("damage", ["truncate", "replace"])
def test_a_filter_json_damaged_between_two_saves_is_still_never_overwritten(tmp_path, damage):
    # The store skips re-reading the filter.json it committed itself: only while unchanged.
    rng = np.random.default_rng(4)
    pf = PersistentFilter(tmp_path / "f", INFO)
    pf.register(0, [random_registration(rng, 0, 0)], [{}])
    meta_path = tmp_path / "f" / META_FILE
    if damage == "truncate":
        with meta_path.open("r+b") as handle:
            handle.truncate(meta_path.stat().st_size // 2)
    else:
        meta_path.write_text("[1, 2]", encoding="utf-8")
    before = meta_path.read_bytes()
    with pytest.raises(ValueError, match="unreadable"):
        pf.register(1, [random_registration(rng, 1, 1)], [{}])
    assert meta_path.read_bytes() == before


def test_a_reopened_filter_hashes_only_the_new_autoencoder_at_its_next_save(tmp_path, monkeypatch):
    # Prepare: a filter with a replaced version in its history, reopened
    folder = tmp_path / "f"
    _grow(folder, 6, monkeypatch)
    PersistentFilter(folder, INFO).register(
        2, [random_registration(np.random.default_rng(7), 2, 2)], [{}]
    )
    pf = PersistentFilter(folder, INFO)
    hashed = []
    real = store_module.content_hash

    def counting(params):
        hashed.append(id(params))
        return real(params)

    monkeypatch.setattr(store_module, "content_hash", counting)
    new = random_registration(np.random.default_rng(8), 6, 6)
    # Execute
    pf.register(6, [new], [{}])
    # Assert: the load's verified hashes served every other entry and the history
    assert hashed == [id(new.params)]
    monkeypatch.setattr(store_module, "content_hash", real)
    loaded, meta = load_filter(folder)
    assert [r.user_id for r in loaded] == [0, 1, 3, 4, 5, 2, 6]
    assert [e["user_id"] for e in meta["history"]] == [2]
