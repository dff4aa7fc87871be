"""Save and load a global filter as one atomic, integrity-checked unit (no Flower).

Layout of ``PATH`` (a folder), format 2
---------------------------------------
- ``autoencoders-<sha256>.safetensors``: every autoencoder's four float32 tensors, named
  ``"{key}/encoder.weight"``, ``"{key}/encoder.bias"``, ``"{key}/decoder.weight"``,
  ``"{key}/decoder.bias"``. The file is named by the SHA-256 of its bytes, so a save never
  overwrites the tensors the current ``filter.json`` points to. The ``key`` of a registration
  is ``"u{user_id}/c{label}/{content hash}"`` (:func:`registration_key`): it does not depend on
  the position in the filter, so it stays the same when other users join or leave.
- ``filter.json``: ``{"format": 2, "tensors": {"file", "sha256"}, "entries": [...],
  "history": [...], <info, e.g. "config">, "integrity": {...}}``. Each entry holds ``key``,
  ``user_id``, ``label``, ``err_mean``, ``err_std``, ``num_examples``, ``sha256`` (the
  :func:`content_hash` of its four tensors) and free metadata (``node_id``, ``trained_on``,
  ...). ``tensors`` is null for a filter without any autoencoder.

One atomic unit
---------------
A save (:func:`save_filter`) writes the new tensors file (temporary name, fsync, rename, fsync
of the folder), then replaces ``filter.json`` the same way: that rename is the commit point.
Only then are tensor files that ``filter.json`` no longer names (and temporary files left by an
interrupted save) deleted. A crash at any point leaves the old filter or the new one, plus at
most a harmless unreferenced file that the next save removes. The first save of a folder
commits an empty ``filter.json`` before writing any tensors, so a tensors file never lies in a
folder without a ``filter.json``: a folder that holds ``*.safetensors`` files but no readable
``filter.json`` is refused (:class:`ValueError`), never treated as empty and overwritten. A
missing or empty folder is a new, empty filter. One process writes a folder at a time.

Integrity
---------
Everything that decides a block is covered: user id, class, ``err_mean``, ``err_std``,
``num_examples`` and order of every entry (and of the history), the filter-wide info (the run's
``config``: feature extractor and its scaling, guard, ...), and, through the SHA-256 of the
tensors file and each entry's content hash, every tensor. The canonical serialisation of
``filter.json`` without its ``integrity`` block (JSON, sorted keys, no spaces, UTF-8) is

(a) always hashed (``integrity.sha256``): catches accidents (truncation, a stray edit);
(b) authenticated with HMAC-SHA256 under a secret key (``integrity.hmac_sha256``, with
    ``integrity.key_id``, a fingerprint of the key): catches edits by anyone without the key.

The key is the content of the file named by the environment variable ``DOCL_FLOWER_FILTER_KEY``
if set, else ``$XDG_CONFIG_HOME/docl-flower/filter.key``, else
``~/.config/docl-flower/filter.key`` (:func:`filter_key_path`). It is created (32 random
bytes, mode 0600) when missing by :func:`save_filter` and when a :class:`PersistentFilter` is
opened (so that a run fails before training, not at its first registration). Every save signs.

On load (:func:`load_filter`), the digest, the HMAC, the tensors file's SHA-256 and every
entry's content hash are checked; any failure raises a :class:`ValueError` that says which.
A filter whose key file is missing here, that was signed with another key, or that carries no
HMAC is refused unless the caller passes ``verify_key=False``: then only the unkeyed checks (a)
run, e.g. to read a filter copied from another machine whose origin one trusts.

What this does **not** protect against: anyone who can read the key file (they can re-sign an
edited filter), so keep it away from the filter when that matters (by default it sits on the
same machine, under the same user, which stops accidental or casual edits and edits of a copy
elsewhere, not an attacker with that user's access); replacing the folder by an older filter
that was validly signed with the same key (rollback); deleting the folder (a missing filter is
a new one); and whether the autoencoders themselves are honest (that is the server's upload
check). Format 1 filters (one ``autoencoders.safetensors`` with index keys, hashes over tensors
only) are refused: their metadata was never covered by any check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as dump_tensors

from .files import create_file_atomic, fsync_dir, write_bytes_atomic, write_text_atomic
from .filter import Registration
from .model import PARAM_NAMES

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
META_FILE = "filter.json"
#: Tensor files are named ``TENSORS_PREFIX + sha256 + TENSORS_SUFFIX`` (:func:`tensors_file`).
TENSORS_PREFIX = "autoencoders-"
TENSORS_SUFFIX = ".safetensors"
#: The single tensors file of format 1 (removed by the first format-2 save over it).
LEGACY_TENSORS_FILE = "autoencoders.safetensors"
#: Environment variable naming the key file (see the module docstring).
KEY_ENV = "DOCL_FLOWER_FILTER_KEY"
KEY_BYTES = 32
#: Shortest key file accepted.
MIN_KEY_BYTES = 16

_TENSORS_NAME = re.compile(
    re.escape(TENSORS_PREFIX) + r"[0-9a-f]{64}" + re.escape(TENSORS_SUFFIX) + r"\Z"
)
#: Top-level keys of ``filter.json`` written by the store (``info`` may not use them).
RESERVED = frozenset({"format", "tensors", "entries", "history", "integrity"})
#: Keys of an entry that describe the registration itself (the rest is free metadata).
ENTRY_KEYS = frozenset({"key", "user_id", "label", "err_mean", "err_std", "num_examples", "sha256"})


# ---------------------------------------------------------------- hashes and names


def content_hash(params: Mapping[str, NDArray[np.float32]]) -> str:
    """SHA-256 of one autoencoder's tensors (raw float32 bytes, in :data:`PARAM_NAMES` order)."""
    digest = hashlib.sha256()
    for name in PARAM_NAMES:
        digest.update(np.ascontiguousarray(params[name], dtype=np.float32).tobytes())
    return digest.hexdigest()


def registration_key(user_id: int, label: int, sha256: str) -> str:
    """Tensor-name prefix of a registration: stable whatever the other entries are."""
    return f"u{user_id}/c{label}/{sha256}"


def tensors_file(folder: Path) -> Path | None:
    """The tensors file that ``folder``'s ``filter.json`` names (not verified), or None.

    None when the filter holds no autoencoder. Raises like :func:`load_filter` when there is
    no readable ``filter.json``.
    """
    ref = _read_meta(folder).get("tensors")
    return folder / str(ref["file"]) if isinstance(ref, dict) else None


def canonical(payload: Mapping[str, Any]) -> bytes:
    """Canonical serialisation that the digest and the HMAC cover (sorted keys, no spaces)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def _body(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "integrity"}


def _mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


# ---------------------------------------------------------------- the key


def filter_key_path() -> Path:
    """Where the HMAC key lives: ``$DOCL_FLOWER_FILTER_KEY``, else the user's config folder."""
    named = os.environ.get(KEY_ENV)
    if named:
        return Path(named).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "docl-flower" / "filter.key"


def key_id(key: bytes) -> str:
    """Public fingerprint of a key (tells "signed with another key" from "edited")."""
    return hashlib.sha256(b"docl-flower filter key id\0" + key).hexdigest()[:16]


def read_filter_key(path: Path | None = None) -> bytes | None:
    """The key in ``path`` (default :func:`filter_key_path`), or None when there is none.

    Raises
    ------
    ValueError
        If the file is shorter than :data:`MIN_KEY_BYTES`.
    """
    path = path or filter_key_path()
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"filter key file {path} holds {len(key)} bytes, fewer than {MIN_KEY_BYTES}"
        )
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        log.warning("filter key file %s is readable by other users (chmod 600 it)", path)
    return key


def ensure_filter_key(path: Path | None = None) -> bytes:
    """The key in ``path`` (default :func:`filter_key_path`), created when missing.

    A new key is :data:`KEY_BYTES` random bytes in a file of mode 0600 (its folder 0700 when
    created); a racing process that creates it first wins and both use its key.

    Raises
    ------
    ValueError
        If the key file cannot be created (with the reason and how to choose another path).
    """
    path = path or filter_key_path()
    key = read_filter_key(path)
    if key is not None:
        return key
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if create_file_atomic(path, secrets.token_bytes(KEY_BYTES), mode=0o600):
            log.info("created the filter key %s (HMAC-SHA256 of saved filters)", path)
    except OSError as err:
        raise ValueError(
            f"cannot create the filter key file {path} ({err}); set {KEY_ENV} to a writable path"
        ) from err
    key = read_filter_key(path)
    if key is None:  # removed between creation and reading
        raise ValueError(f"filter key file {path} disappeared while it was created")
    return key


# ---------------------------------------------------------------- saving


def _entry(reg: Registration, extra: Mapping[str, Any]) -> dict[str, Any]:
    clash = sorted(ENTRY_KEYS & set(extra))
    if clash:
        raise ValueError(f"entry metadata may not set {clash} (user {reg.user_id})")
    digest = content_hash(reg.params)
    return {
        "key": registration_key(reg.user_id, reg.label, digest),
        "user_id": reg.user_id,
        "label": reg.label,
        "err_mean": reg.err_mean,
        "err_std": reg.err_std,
        "num_examples": reg.num_examples,
        "sha256": digest,
        **dict(extra),
    }


def _tensor_files(folder: Path) -> list[Path]:
    """Every ``*.safetensors`` file in ``folder`` (none when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(TENSORS_SUFFIX))


def _refuse_headless(folder: Path, why: str) -> ValueError:
    names = ", ".join(p.name for p in _tensor_files(folder))
    return ValueError(
        f"{folder}: {why}, but the folder holds tensors ({names}); refusing to treat it as an "
        f"empty filter (restore {META_FILE}, or move the folder away to start a new filter)"
    )


def _seal(payload: Mapping[str, Any], key: bytes) -> dict[str, Any]:
    """``payload`` (normalised through JSON) with its ``integrity`` block."""
    body: dict[str, Any] = json.loads(json.dumps(payload))
    data = canonical(body)
    return {
        **body,
        "integrity": {
            "sha256": hashlib.sha256(data).hexdigest(),
            "hmac_sha256": _mac(key, data),
            "key_id": key_id(key),
        },
    }


def _commit(folder: Path, meta: Mapping[str, Any]) -> None:
    """Atomically replace ``filter.json`` (the commit point of a save)."""
    write_text_atomic(folder / META_FILE, json.dumps(meta, indent=2) + "\n")


def _is_ours(name: str) -> bool:
    """A tensors file or a temporary file that a save of this module may have left."""
    if name == LEGACY_TENSORS_FILE:
        return True
    if name.startswith(TENSORS_PREFIX) and name.endswith(TENSORS_SUFFIX):
        return True
    return name.endswith(".tmp") and name.startswith((f".{META_FILE}.", f".{TENSORS_PREFIX}"))


def _clean(folder: Path, keep: str | None) -> None:
    """Delete tensor files other than ``keep`` and temporary files of interrupted saves."""
    removed = [p for p in folder.iterdir() if p.name != keep and _is_ours(p.name) and p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
        log.debug("removed %s (no longer referenced)", path)
    if removed:
        fsync_dir(folder)


def save_filter(
    folder: Path,
    registrations: Sequence[Registration],
    extra: Mapping[int, Mapping[str, Any]] | None = None,
    info: Mapping[str, Any] | None = None,
    history: Sequence[tuple[Registration, Mapping[str, Any]]] = (),
) -> None:
    """Atomically replace the filter in ``folder`` by ``registrations`` (see the module doc).

    Parameters
    ----------
    folder : Path
        The filter's folder (created when missing).
    registrations : sequence of Registration
        The autoencoders, in filter order.
    extra : mapping, optional
        Index in ``registrations`` -> free metadata of that entry (``node_id``, ...).
    info : mapping, optional
        Filter-wide metadata written at the top of ``filter.json`` (``{"config": ...}``).
    history : sequence of (Registration, mapping)
        Replaced versions with their metadata, listed in ``filter.json["history"]``.

    Raises
    ------
    ValueError
        If ``folder`` holds tensors without a readable ``filter.json``, if ``info`` or ``extra``
        use reserved keys, or if the key file cannot be created.
    """
    info = dict(info or {})
    clash = sorted(RESERVED & set(info))
    if clash:
        raise ValueError(f"filter info may not set {clash}")
    entries = [_entry(reg, (extra or {}).get(k, {})) for k, reg in enumerate(registrations)]
    past = [_entry(reg, meta_k) for reg, meta_k in history]
    tensors: dict[str, NDArray[np.float32]] = {}
    for entry, reg in zip(
        [*entries, *past], [*registrations, *(r for r, _ in history)], strict=True
    ):
        for name in PARAM_NAMES:
            tensors[f"{entry['key']}/{name}"] = np.ascontiguousarray(
                reg.params[name], dtype=np.float32
            )

    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / META_FILE
    if meta_path.exists():
        try:
            if not isinstance(json.loads(meta_path.read_bytes()), dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            raise ValueError(
                f"{folder}: {META_FILE} is unreadable ({err}); refusing to overwrite it"
            ) from err
    elif _tensor_files(folder):
        raise _refuse_headless(folder, f"{META_FILE} is missing")
    key = ensure_filter_key()
    head = {"format": FORMAT_VERSION}
    if not meta_path.exists():  # a tensors file must never lie here without a filter.json
        _commit(folder, _seal({**head, "tensors": None, "entries": [], "history": [], **info}, key))

    ref: dict[str, str] | None = None
    if tensors:
        data = dump_tensors(tensors)
        digest = hashlib.sha256(data).hexdigest()
        ref = {"file": f"{TENSORS_PREFIX}{digest}{TENSORS_SUFFIX}", "sha256": digest}
        write_bytes_atomic(folder / ref["file"], data)
    _commit(
        folder, _seal({**head, "tensors": ref, "entries": entries, "history": past, **info}, key)
    )
    _clean(folder, ref["file"] if ref else None)
    log.debug("saved %d autoencoders (%d replaced) to %s", len(entries), len(past), folder)


# ---------------------------------------------------------------- loading


def _read_meta(folder: Path) -> dict[str, Any]:
    """The parsed ``filter.json`` of ``folder`` (not verified).

    Raises
    ------
    FileNotFoundError
        If there is no filter at all (no ``filter.json``, no tensors).
    ValueError
        If tensors lie there without a ``filter.json``, or it is unreadable.
    """
    path = folder / META_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if _tensor_files(folder):
            raise _refuse_headless(folder, f"{META_FILE} is missing") from None
        raise FileNotFoundError(f"{folder}: no saved filter ({META_FILE} is missing)") from None
    except OSError as err:
        raise ValueError(f"{folder}: cannot read {META_FILE} ({err})") from err
    try:
        meta = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{folder}: {META_FILE} is truncated or not JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{folder}: {META_FILE} is not a JSON object")
    return meta


def _check_digest(folder: Path, meta: Mapping[str, Any]) -> bytes:
    """Check format and SHA-256 digest of ``meta``; return its canonical body."""
    fmt = meta.get("format")
    if fmt == 1:
        raise ValueError(
            f"{folder}: filter format 1 is no longer read (its user ids, classes and error "
            f"statistics were covered by no integrity check); register the users again into a "
            f"new filter folder"
        )
    if fmt != FORMAT_VERSION:
        raise ValueError(f"{folder}: unknown filter format {fmt!r} (this version reads 2)")
    integrity = meta.get("integrity")
    if not isinstance(integrity, dict) or not isinstance(integrity.get("sha256"), str):
        raise ValueError(f"{folder}: {META_FILE} has no integrity block")
    body = canonical(_body(meta))
    if not hmac.compare_digest(hashlib.sha256(body).hexdigest(), integrity["sha256"]):
        raise ValueError(
            f"{folder}: {META_FILE} fails its SHA-256 digest: entries, their order or the "
            f"config were edited or removed, or the file is damaged"
        )
    if not isinstance(meta.get("entries"), list) or not isinstance(meta.get("history"), list):
        raise ValueError(f"{folder}: {META_FILE} has no lists of entries and history")
    return body


def _check_hmac(folder: Path, meta: Mapping[str, Any], body: bytes) -> None:
    integrity = meta["integrity"]
    mac = integrity.get("hmac_sha256")
    if not isinstance(mac, str):
        raise ValueError(
            f"{folder}: {META_FILE} carries no HMAC (saved without a key); pass "
            f"verify_key=False to read it with its unkeyed SHA-256 digest only"
        )
    path = filter_key_path()
    key = read_filter_key(path)
    if key is None:
        raise ValueError(
            f"{folder}: {META_FILE} is signed (HMAC-SHA256) but the key file {path} is missing; "
            f"set {KEY_ENV} to the key file it was saved with, or pass verify_key=False"
        )
    if integrity.get("key_id") != key_id(key):
        raise ValueError(
            f"{folder}: {META_FILE} was signed with another key (id {integrity.get('key_id')}) "
            f"than the one in {path} (id {key_id(key)})"
        )
    if not hmac.compare_digest(_mac(key, body), mac):
        raise ValueError(
            f"{folder}: {META_FILE} fails its HMAC-SHA256: it was edited by someone without the "
            f"key {path}"
        )


def _load_tensors(folder: Path, meta: Mapping[str, Any]) -> dict[str, NDArray[np.float32]]:
    """The tensors file named by ``meta``, after checking its SHA-256."""
    ref = meta.get("tensors")
    if ref is None:
        if meta.get("entries") or meta.get("history"):
            raise ValueError(f"{folder}: {META_FILE} lists entries but names no tensors file")
        return {}
    if not isinstance(ref, dict) or not _TENSORS_NAME.match(str(ref.get("file"))):
        raise ValueError(f"{folder}: {META_FILE} names no valid tensors file ({ref!r})")
    path = folder / str(ref["file"])
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{folder}: the tensors file {path.name} is missing") from None
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), str(ref.get("sha256"))):
        raise ValueError(f"{folder}: the tensors file {path.name} fails its SHA-256")
    try:
        tensors: dict[str, NDArray[np.float32]] = load_tensors(data)
    except Exception as err:  # safetensors' own error type
        raise ValueError(f"{folder}: the tensors file {path.name} is unreadable ({err})") from err
    return tensors


def _registration(
    folder: Path, tensors: Mapping[str, NDArray[np.float32]], entry: Any, what: str
) -> Registration:
    try:
        user, label, digest = int(entry["user_id"]), int(entry["label"]), str(entry["sha256"])
        key = registration_key(user, label, digest)
        if entry["key"] != key:
            raise ValueError(
                f"{folder}: {what} (user {user}) has key {entry['key']!r}, not {key!r}"
            )
        params = {name: tensors[f"{key}/{name}"] for name in PARAM_NAMES}
        if any(v.dtype != np.float32 for v in params.values()):
            raise ValueError(f"{folder}: {what} (user {user}) has tensors other than float32")
        reg = Registration(
            user,
            label,
            params,
            float(entry["err_mean"]),
            float(entry["err_std"]),
            int(entry["num_examples"]),
        )
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"{folder}: {what} is malformed or its tensors are missing ({err!r})"
        ) from err
    if content_hash(params) != digest:
        raise ValueError(f"{folder}: {what} (user {user}) fails its content hash")
    return reg


def load_filter(
    folder: Path, *, verify_key: bool = True
) -> tuple[list[Registration], dict[str, Any]]:
    """Read a saved filter, verify it, return its registrations and ``filter.json``.

    Parameters
    ----------
    folder : Path
        The filter's folder.
    verify_key : bool
        Check the HMAC with the local key (default). False: check only the unkeyed SHA-256
        digests, for a filter saved elsewhere whose origin one trusts.

    Returns
    -------
    tuple
        The registrations in filter order, and the metadata: ``format``, ``tensors``,
        ``entries`` (dicts in registration order, with their free metadata), ``history``,
        ``integrity`` and the ``info`` given at save (e.g. ``config``).

    Raises
    ------
    FileNotFoundError
        If ``folder`` holds no filter at all.
    ValueError
        If any check fails (the message says which), or tensors lie there without a
        readable ``filter.json``.
    """
    meta = _read_meta(folder)
    body = _check_digest(folder, meta)
    if verify_key:
        _check_hmac(folder, meta, body)
    else:
        log.info("%s: HMAC not checked (verify_key=False)", folder)
    tensors = _load_tensors(folder, meta)
    regs = [_registration(folder, tensors, e, f"entry {i}") for i, e in enumerate(meta["entries"])]
    return regs, meta


def load_history(
    folder: Path, meta: Mapping[str, Any]
) -> list[tuple[Registration, dict[str, Any]]]:
    """Replaced versions kept in a saved filter, with their metadata (hashes checked).

    ``meta`` is the metadata returned by :func:`load_filter` (which checked its HMAC); its
    digest and the tensors file are checked again here.
    """
    _check_digest(folder, meta)
    tensors = _load_tensors(folder, meta)
    return [
        (_registration(folder, tensors, e, f"history entry {i}"), entry_extra(e))
        for i, e in enumerate(meta["history"])
    ]


def entry_extra(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The free metadata of an entry (node id, registration time, ...)."""
    return {k: v for k, v in entry.items() if k not in ENTRY_KEYS}


Entry = tuple[Registration, dict[str, Any]]


class PersistentFilter:
    """The saved global filter of a DOCL deployment: load once, rewrite after each registration.

    Registrations already in the folder stand unless their user registers again; the replaced
    version moves to the file's history (with ``replaced_at``).

    Parameters
    ----------
    folder : Path
        Where the filter lives (created on the first registration). A missing or empty folder
        is a new filter; a folder with tensors but no readable ``filter.json`` is refused.
    info : mapping
        Filter-wide metadata written into ``filter.json`` (the run's config).
    verify_key : bool
        Passed to :func:`load_filter`. Every save signs with the local key (created now when
        missing, so that a run fails early when it cannot be).

    Raises
    ------
    ValueError
        If the saved filter fails a check, or the folder holds tensors without a filter.
    """

    def __init__(self, folder: Path, info: Mapping[str, Any], *, verify_key: bool = True) -> None:
        self.folder = folder
        self.info = dict(info)
        self.entries: list[Entry] = []
        self.history: list[Entry] = []
        if (folder / META_FILE).exists():
            regs, meta = load_filter(folder, verify_key=verify_key)
            self.entries = [(r, entry_extra(e)) for r, e in zip(regs, meta["entries"], strict=True)]
            self.history = load_history(folder, meta)
            log.info("loaded %d autoencoders from %s", len(regs), folder)
        elif _tensor_files(folder):
            raise _refuse_headless(folder, f"{META_FILE} is missing")
        ensure_filter_key()

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
        """Add (or replace) ``user``'s autoencoders with their metadata and save atomically.

        When the save fails, the filter (in memory and on disk) stays as it was.
        """
        if any(r.user_id != user for r in registrations):
            raise ValueError(f"registrations of another user than {user}")
        now = time.time()
        history = self.history + [
            (r, {**e, "replaced_at": now}) for r, e in self.entries if r.user_id == user
        ]
        entries = [(r, e) for r, e in self.entries if r.user_id != user]
        entries += [(r, dict(m)) for r, m in zip(registrations, metas, strict=True)]
        self._write(entries, history)
        self.entries, self.history = entries, history

    def save(self) -> None:
        """Rewrite the folder with the current entries and history."""
        self._write(self.entries, self.history)

    def _write(self, entries: Sequence[Entry], history: Sequence[Entry]) -> None:
        regs = [r for r, _ in entries]
        extra = {k: e for k, (_, e) in enumerate(entries)}
        save_filter(self.folder, regs, extra, info=self.info, history=history)
