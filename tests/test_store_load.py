"""Loading a saved filter fast: one read, zero-copy tensors, hashes in parallel; same checks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as dump_tensors

from docl_flower.core.filter import store
from docl_flower.core.filter.global_filter import Registration
from docl_flower.core.filter.store import (
    KEY_ENV,
    META_FILE,
    PersistentFilter,
    content_hash,
    load_filter,
    save_filter,
    segment_files,
)

from .conftest import random_registration


@pytest.fixture(autouse=True)
def filter_key(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path_factory.mktemp("key") / "filter.key"
    monkeypatch.setenv(KEY_ENV, str(path))
    return path


@pytest.fixture(scope="module")
def five_hundred() -> list[Registration]:
    rng = np.random.default_rng(0)
    return [random_registration(rng, u, u % 10, dim=64, hidden=8) for u in range(500)]


def test_a_filter_of_500_autoencoders_round_trips(tmp_path, five_hundred):
    save_filter(tmp_path / "f", five_hundred, {k: {"node_id": k} for k in range(500)})
    loaded = PersistentFilter(tmp_path / "f", {})
    regs = loaded.registrations
    assert [(r.user_id, r.label) for r in regs] == [(r.user_id, r.label) for r in five_hundred]
    for a, b in zip(five_hundred, regs, strict=True):
        for name, value in a.params.items():
            np.testing.assert_array_equal(b.params[name], value)
            assert b.params[name].dtype == np.float32 and b.params[name].flags.writeable
        assert content_hash(b.params) == content_hash(a.params)
    assert loaded.entries[7][1]["node_id"] == 7


def test_a_tampered_tensors_file_of_500_autoencoders_is_refused(tmp_path, five_hundred):
    folder = tmp_path / "f"
    save_filter(folder, five_hundred)
    path = segment_files(folder)[-1]
    data = bytearray(path.read_bytes())
    data[-100] ^= 1  # a bit of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fails its SHA-256"):
        PersistentFilter(folder, {})
    # With the file's digest updated as one without the key could: the HMAC refuses it, and
    # without the key check the content hash of the edited autoencoder does.
    meta = json.loads((folder / META_FILE).read_text())
    meta["tensors"][-1]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    body = {k: v for k, v in meta.items() if k != "integrity"}
    meta["integrity"]["sha256"] = hashlib.sha256(store.canonical(body)).hexdigest()
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="HMAC"):
        load_filter(folder)
    with pytest.raises(ValueError, match="fails its content hash"):
        load_filter(folder, verify_key=False)


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "a/encoder.weight": rng.standard_normal((3, 5), dtype=np.float32),
        "a/encoder.bias": rng.standard_normal(3, dtype=np.float32),
        "b/x": np.zeros((0, 4), np.float32),
        "c/y": rng.standard_normal((2, 2, 2), dtype=np.float32),
    }


def test_the_zero_copy_reader_reads_what_safetensors_reads():
    data = dump_tensors(_tensors(), metadata={"who": "test"})
    got = store._parse_safetensors(bytearray(data))
    want = load_tensors(data)
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)
        assert got[name].shape == value.shape and got[name].dtype == value.dtype
    # other dtypes go through the safetensors reader
    mixed = store._parse_safetensors(bytearray(dump_tensors({"d": np.arange(3.0)})))
    assert mixed["d"].dtype == np.float64


def _with_header(data: bytearray, edit: Callable[[dict[str, Any]], None]) -> bytearray:
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    edit(header)
    raw = json.dumps(header).encode()
    return bytearray(len(raw).to_bytes(8, "little") + raw + data[8 + size :])


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[:5],
        lambda d: bytearray(b"\xff" * 8) + d[8:],
        lambda d: d + b"\0\0\0\0",
        lambda d: _with_header(d, lambda h: h["c/y"].update(shape=[2, 2, 3])),
        lambda d: _with_header(d, lambda h: h["a/encoder.weight"].update(data_offsets=[0, 60])),
        lambda d: _with_header(d, lambda h: h["c/y"].update(data_offsets=[-4, 28])),
        lambda d: _with_header(d, lambda h: h.update({"z": 1})),
    ],
    ids=["truncated", "huge header", "trailing bytes", "shape", "overlap", "negative", "entry"],
)
def test_the_zero_copy_reader_refuses_malformed_files(damage):
    data = bytearray(dump_tensors(_tensors()))
    with pytest.raises(ValueError):
        store._parse_safetensors(damage(data))


def test_an_empty_tensors_file_reads_as_unreadable(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"")
    data = store._read_all(path)
    assert len(data) == 0
    with pytest.raises(ValueError):
        store._parse_safetensors(data)
