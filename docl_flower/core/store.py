"""Save and load a global filter: tensors in safetensors, metadata in JSON (no Flower).

Layout of ``PATH`` (a folder):

- ``autoencoders.safetensors``: for registration ``k``, the tensors ``"{k}/encoder.weight"``,
  ``"{k}/encoder.bias"``, ``"{k}/decoder.weight"``, ``"{k}/decoder.bias"`` (float32).
- ``filter.json``: ``{"format": 1, "entries": [{"key", "user_id", "label", "err_mean",
  "err_std", "num_examples", "sha256", ...}], ...}``; ``sha256`` is the content hash of the
  four tensors (their raw bytes in :data:`PARAM_NAMES` order) and is checked on load.

Both files are written to temporary names and renamed, so a reader never sees half a filter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from safetensors.numpy import load_file, save_file

from .files import atomic_write, write_json_atomic
from .filter import Registration
from .model import PARAM_NAMES

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSORS_FILE = "autoencoders.safetensors"
META_FILE = "filter.json"


def content_hash(params: Mapping[str, NDArray[np.float32]]) -> str:
    """SHA-256 of one autoencoder's tensors (raw float32 bytes, in :data:`PARAM_NAMES` order)."""
    digest = hashlib.sha256()
    for name in PARAM_NAMES:
        digest.update(np.ascontiguousarray(params[name], dtype=np.float32).tobytes())
    return digest.hexdigest()


def _entry(key: int | str, reg: Registration, extra: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "key": key,
        "user_id": reg.user_id,
        "label": reg.label,
        "err_mean": reg.err_mean,
        "err_std": reg.err_std,
        "num_examples": reg.num_examples,
        "sha256": content_hash(reg.params),
        **dict(extra),
    }


def save_filter(
    folder: Path,
    registrations: Sequence[Registration],
    extra: Mapping[int, Mapping[str, Any]] | None = None,
    info: Mapping[str, Any] | None = None,
    history: Sequence[tuple[Registration, Mapping[str, Any]]] = (),
) -> None:
    """Write every registration (and optional per-entry ``extra`` metadata) to ``folder``.

    ``history`` holds replaced versions (with their metadata); they are stored under the
    keys ``"history/{k}/..."`` and listed in ``filter.json["history"]``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, NDArray[np.float32]] = {}
    entries = []
    for k, reg in enumerate(registrations):
        for name in PARAM_NAMES:
            tensors[f"{k}/{name}"] = np.ascontiguousarray(reg.params[name], dtype=np.float32)
        entries.append(_entry(k, reg, (extra or {}).get(k, {})))
    past = []
    for k, (reg, meta_k) in enumerate(history):
        for name in PARAM_NAMES:
            tensors[f"history/{k}/{name}"] = np.ascontiguousarray(reg.params[name], np.float32)
        past.append(_entry(f"history/{k}", reg, meta_k))
    atomic_write(folder / TENSORS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    meta = {"format": FORMAT_VERSION, "entries": entries, "history": past, **dict(info or {})}
    write_json_atomic(folder / META_FILE, meta)


#: Keys of an entry that describe the registration itself (the rest is free metadata).
ENTRY_KEYS = frozenset({"key", "user_id", "label", "err_mean", "err_std", "num_examples", "sha256"})


def entry_extra(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The free metadata of an entry (node id, registration time, ...)."""
    return {k: v for k, v in entry.items() if k not in ENTRY_KEYS}


def _registration(
    folder: Path, tensors: Mapping[str, NDArray[np.float32]], entry: Mapping[str, Any]
) -> Registration:
    k = entry["key"]
    params = {name: tensors[f"{k}/{name}"] for name in PARAM_NAMES}
    if content_hash(params) != entry["sha256"]:
        raise ValueError(f"{folder}: entry {k} (user {entry['user_id']}) fails its hash")
    return Registration(
        int(entry["user_id"]),
        int(entry["label"]),
        params,
        float(entry["err_mean"]),
        float(entry["err_std"]),
        int(entry["num_examples"]),
    )


def load_filter(folder: Path) -> tuple[list[Registration], dict[str, Any]]:
    """Read a saved filter and verify every content hash; return registrations and metadata."""
    meta: dict[str, Any] = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{folder}: unknown filter format {meta.get('format')!r}")
    tensors = load_file(str(folder / TENSORS_FILE))
    return [_registration(folder, tensors, e) for e in meta["entries"]], meta


def load_history(
    folder: Path, meta: Mapping[str, Any]
) -> list[tuple[Registration, dict[str, Any]]]:
    """Replaced versions kept in a saved filter, with their metadata (hashes checked)."""
    tensors = load_file(str(folder / TENSORS_FILE))
    return [(_registration(folder, tensors, e), entry_extra(e)) for e in meta.get("history", [])]


Entry = tuple[Registration, dict[str, Any]]


class PersistentFilter:
    """The saved global filter of a DOCL deployment: load once, rewrite after each registration.

    Registrations already in the folder stand unless their user registers again; the replaced
    version moves to the file's history (with ``replaced_at``).

    Parameters
    ----------
    folder : Path
        Where the filter lives (created on the first registration).
    info : mapping
        Filter-wide metadata written into ``filter.json`` (the run's config).
    """

    def __init__(self, folder: Path, info: Mapping[str, Any]) -> None:
        self.folder = folder
        self.info = dict(info)
        self.entries: list[Entry] = []
        self.history: list[Entry] = []
        if (folder / META_FILE).is_file():
            regs, meta = load_filter(folder)
            self.entries = [(r, entry_extra(e)) for r, e in zip(regs, meta["entries"], strict=True)]
            self.history = load_history(folder, meta)
            log.info("loaded %d autoencoders from %s", len(regs), folder)

    @property
    def users(self) -> set[int]:
        """Users with an autoencoder in the filter."""
        return {r.user_id for r, _ in self.entries}

    @property
    def registrations(self) -> list[Registration]:
        """Every registration in the filter, in file order."""
        return [r for r, _ in self.entries]

    def register(
        self, user: int, registrations: Sequence[Registration], metas: Sequence[Mapping[str, Any]]
    ) -> None:
        """Add (or replace) ``user``'s autoencoders with their metadata and save atomically."""
        if any(r.user_id != user for r in registrations):
            raise ValueError(f"registrations of another user than {user}")
        now = time.time()
        self.history += [
            (r, {**e, "replaced_at": now}) for r, e in self.entries if r.user_id == user
        ]
        self.entries = [(r, e) for r, e in self.entries if r.user_id != user]
        self.entries += [(r, dict(m)) for r, m in zip(registrations, metas, strict=True)]
        self.save()

    def save(self) -> None:
        """Rewrite the folder with the current entries and history."""
        regs = self.registrations
        extra = {k: e for k, (_, e) in enumerate(self.entries)}
        save_filter(self.folder, regs, extra, info=self.info, history=self.history)
