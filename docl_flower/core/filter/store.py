"""Save and load a global filter as one atomic, integrity-checked unit (no Flower).

Layout of ``PATH`` (a folder), format 3
---------------------------------------
- ``autoencoders-<sha256>.safetensors`` (one or more *segments*): float32 tensors named
  ``"{key}/encoder.weight"``, ``"{key}/encoder.bias"``, ``"{key}/decoder.weight"``,
  ``"{key}/decoder.bias"``. A file is named by the SHA-256 of its bytes, so a save never
  overwrites the tensors the current ``filter.json`` points to. The ``key`` of a registration
  is ``"u{user_id}/c{label}/{content hash}"`` (:func:`registration_key`): it does not depend on
  the position in the filter, so it stays the same when other users join or leave.
- ``filter.json``: ``{"format": 3, "tensors": [{"file", "sha256", "keys"}, ...], "entries":
  [...], "history": [...], <info, e.g. "config">, "integrity": {...}}``. Each entry holds
  ``key``, ``user_id``, ``label``, ``err_mean``, ``err_std``, ``num_examples``, ``sha256``
  (the :func:`content_hash` of its four tensors) and free metadata (``node_id``,
  ``trained_on``, ...). ``tensors`` lists the segments with the keys each holds (empty for a
  filter without any autoencoder).

Growing one registration at a time
----------------------------------
A :class:`PersistentFilter` saves after every registration. Rewriting every autoencoder each
time would write O(N^2) bytes (1,000 MNIST users: about 100 GB); instead a save keeps the
segments of the filter it loaded or last saved and writes only the new autoencoders into a new
segment, merged like a binary counter (a new segment absorbs the newest old ones while they are
not larger), so a filter of N autoencoders has at most about log2(N) + 1 segments and N
registrations write O(N log N) bytes. :func:`save_filter` without ``reuse`` writes one segment.
Format 2 filters (one tensors file, ``"tensors": {"file", "sha256"}``) are read as one segment.

One atomic unit
---------------
A save (:func:`save_filter`) writes the new segment (temporary name, fsync, rename, fsync
of the folder), then replaces ``filter.json`` the same way: that rename is the commit point.
Only then are segments that ``filter.json`` no longer names (and temporary files left by an
interrupted save) deleted. A crash at any point leaves the old filter or the new one, plus at
most a harmless unreferenced file that the next save removes. The first save of a folder
commits an empty ``filter.json`` before writing any tensors, so a tensors file never lies in a
folder without a ``filter.json``: a folder that holds ``*.safetensors`` files but no readable
``filter.json`` is refused (:class:`ValueError`), never treated as empty and overwritten. A
missing or empty folder is a new, empty filter. One process writes a folder at a time: a
:class:`PersistentFilter` opened with ``lock_wait_s`` holds the folder's writer lock
(:mod:`.lock`) from before it loads the filter until it is closed, and a second one is refused
with one line that names the holder (or waits for it).

Integrity
---------
Everything that decides a block is covered: user id, class, ``err_mean``, ``err_std``,
``num_examples`` and order of every entry (and of the history), the filter-wide info (the run's
``config``: feature extractor and its scaling, guard, ...), and, through the SHA-256 of each
segment and each entry's content hash, every tensor. The canonical serialisation of
``filter.json`` without its ``integrity`` block (JSON, sorted keys, no spaces, UTF-8) is

(a) always hashed (``integrity.sha256``): catches accidents (truncation, a stray edit);
(b) authenticated with HMAC-SHA256 under a secret key (``integrity.hmac_sha256``, with
    ``integrity.key_id``, a fingerprint of the key): catches edits by anyone without the key.

The key is the content of the file named by the environment variable ``DOCL_FLOWER_FILTER_KEY``
if set, else ``$XDG_CONFIG_HOME/docl-flower/filter.key``, else
``~/.config/docl-flower/filter.key`` (:func:`filter_key_path`). It is created (32 random
bytes, mode 0600) when missing by :func:`save_filter` and when a :class:`PersistentFilter` is
opened (so that a run fails before training, not at its first registration). Every save signs.

On load (:func:`load_filter`), the digest, the HMAC, every segment's SHA-256 and keys, and
every entry's content hash are checked; any failure raises a :class:`ValueError` that says which.
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
import math
import mmap
import os
import re
import secrets
import stat
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as dump_tensors

from docl_flower.core.common.files import (
    create_file_atomic,
    file_stamp,
    fsync_dir,
    write_bytes_atomic,
)
from docl_flower.core.filter.global_filter import Registration
from docl_flower.core.filter.lock import FilterLock
from docl_flower.core.training.autoencoder import PARAM_NAMES

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
#: Formats this version reads (2: one tensors file).
READABLE_FORMATS = (2, 3)
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
    for name in PARAM_NAMES:  # the array's own buffer: no copy of its bytes
        digest.update(np.ascontiguousarray(params[name], dtype=np.float32).data)
    return digest.hexdigest()


def registration_key(user_id: int, label: int, sha256: str) -> str:
    """Tensor-name prefix of a registration: stable whatever the other entries are."""
    return f"u{user_id}/c{label}/{sha256}"


@dataclass(frozen=True)
class Segment:
    """One tensors file of a saved filter: its name, SHA-256 and the registration keys it holds."""

    file: str
    sha256: str
    keys: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The segment's record in ``filter.json``."""
        return {"file": self.file, "sha256": self.sha256, "keys": list(self.keys)}


def _segment_refs(meta: Mapping[str, Any]) -> list[Any]:
    """The raw segment records of ``meta`` (format 2: its one tensors file; none: empty)."""
    ref = meta.get("tensors")
    if ref is None:
        return []
    if isinstance(ref, dict):  # format 2
        return [ref]
    if not isinstance(ref, list):
        raise ValueError(f"{META_FILE}: 'tensors' is neither a list of segments nor null")
    return ref


def segment_files(folder: Path) -> list[Path]:
    """Every tensors file that ``folder``'s ``filter.json`` names, oldest first (not verified)."""
    return [folder / str(ref["file"]) for ref in _segment_refs(_read_meta(folder))]


def tensors_file(folder: Path) -> Path | None:
    """The newest tensors file that ``folder``'s ``filter.json`` names (not verified), or None.

    None when the filter holds no autoencoder. Raises like :func:`load_filter` when there is
    no readable ``filter.json``.
    """
    refs = _segment_refs(_read_meta(folder))
    return folder / str(refs[-1]["file"]) if refs else None


def canonical(payload: Any) -> bytes:
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


def _entry(
    reg: Registration, extra: Mapping[str, Any], digests: dict[int, str] | None = None
) -> dict[str, Any]:
    """The ``filter.json`` entry of ``reg``; ``digests`` caches content hashes by ``id(params)``."""
    clash = sorted(ENTRY_KEYS & set(extra))
    if clash:
        raise ValueError(f"entry metadata may not set {clash} (user {reg.user_id})")
    if digests is None:
        digest = content_hash(reg.params)
    else:
        digest = digests.get(id(reg.params)) or content_hash(reg.params)
        digests[id(reg.params)] = digest
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


def _normal(value: Any) -> Any:
    """``value`` as a reader of its JSON sees it (string keys, lists for tuples, ...)."""
    return json.loads(json.dumps(value))


def _assemble(parts: Mapping[str, bytes]) -> bytes:
    """The canonical JSON object of string keys -> canonical JSON values (see :func:`canonical`).

    ``json.dumps(sort_keys=True)`` writes an object's items sorted by key, each as key, ``:``,
    value, separated by ``,``: so this is byte for byte ``canonical`` of the whole object,
    without encoding its values again (a filter's entries are encoded once, not at every save).
    """
    return b"{" + b",".join(canonical(k) + b":" + v for k, v in sorted(parts.items())) + b"}"


def _commit(folder: Path, body: bytes, key: bytes) -> None:
    """Atomically replace ``filter.json`` by ``body`` with its ``integrity`` block.

    ``body`` is the canonical serialisation that the digest and the HMAC cover; the file is
    that object with ``integrity`` added (a reader drops it and serialises the rest
    canonically again: the same bytes). The rename is the commit point of a save.
    """
    integrity = {
        "sha256": hashlib.sha256(body).hexdigest(),
        "hmac_sha256": _mac(key, body),
        "key_id": key_id(key),
    }
    data = body[:-1] + b',"integrity":' + canonical(integrity) + b"}\n"
    write_bytes_atomic(folder / META_FILE, data)


@dataclass
class SaveCache:
    """What a caller that saves one filter again and again keeps from save to save.

    ``fragments``: the canonical JSON of each entry, by the identities of its registration and
    its metadata mapping; both are held here, so an identity is never reused while cached, and
    the caller must not change them in place (:class:`PersistentFilter` never does).
    ``committed``: the identity of the ``filter.json`` that the last save wrote; while the file
    is unchanged, the next save does not parse it again to see that it is readable.
    """

    fragments: dict[tuple[int, int], tuple[Registration, Mapping[str, Any], str, bytes]] = field(
        default_factory=dict
    )
    committed: tuple[int, int, int] | None = None


def _encoded_entry(
    reg: Registration,
    extra: Mapping[str, Any],
    digests: dict[int, str] | None,
    cache: SaveCache | None,
    used: dict[tuple[int, int], tuple[Registration, Mapping[str, Any], str, bytes]],
) -> tuple[str, bytes]:
    """Key and canonical JSON of the entry of ``reg`` (from ``cache`` when it has them)."""
    ident = (id(reg), id(extra))
    hit = cache.fragments.get(ident) if cache is not None else None
    if hit is None:  # (a hit is this very pair: the cache holds both, so no id was reused)
        entry = _entry(reg, extra, digests)
        hit = (reg, extra, entry["key"], canonical(_normal(entry)))
    used[ident] = hit
    return hit[2], hit[3]


def _is_ours(name: str) -> bool:
    """A tensors file or a temporary file that a save of this module may have left."""
    if name == LEGACY_TENSORS_FILE:
        return True
    if name.startswith(TENSORS_PREFIX) and name.endswith(TENSORS_SUFFIX):
        return True
    return name.endswith(".tmp") and name.startswith((f".{META_FILE}.", f".{TENSORS_PREFIX}"))


def _clean(folder: Path, keep: set[str]) -> None:
    """Delete tensor files not in ``keep`` and temporary files of interrupted saves."""
    removed = [
        p for p in folder.iterdir() if p.name not in keep and _is_ours(p.name) and p.is_file()
    ]
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
    reuse: Sequence[Segment] = (),
    digests: dict[int, str] | None = None,
    cache: SaveCache | None = None,
) -> list[Segment]:
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
    reuse : sequence of Segment
        Segments of the filter committed in ``folder`` now, as verified by :func:`load_filter`
        or returned by the previous save (never read from an unverified ``filter.json``):
        those whose keys are all still needed are kept as they are (see the module doc).
    digests : dict, optional
        Content hashes by ``id(params)`` of registrations the caller keeps alive and unchanged
        (read and extended here): a filter saved after every registration then hashes each
        autoencoder once, not at every save.
    cache : SaveCache, optional
        Kept by a caller that saves the same folder again and again (read and replaced here):
        each entry is then encoded once, and a ``filter.json`` this cache saw committed is not
        parsed again (a save at 1,000 entries: 40 ms without, a few with).

    Returns
    -------
    list of Segment
        The segments the new ``filter.json`` names (pass them as ``reuse`` next time).

    Raises
    ------
    ValueError
        If ``folder`` holds tensors without a readable ``filter.json``, if ``info`` or ``extra``
        use reserved keys, or if the key file cannot be created.
    """
    info = _normal(dict(info or {}))
    clash = sorted(RESERVED & set(info))
    if clash:
        raise ValueError(f"filter info may not set {clash}")
    used: dict[tuple[int, int], tuple[Registration, Mapping[str, Any], str, bytes]] = {}
    no_extra: dict[str, Any] = {}
    entries = [
        _encoded_entry(reg, (extra or {}).get(k, no_extra), digests, cache, used)
        for k, reg in enumerate(registrations)
    ]
    past = [_encoded_entry(reg, meta_k, digests, cache, used) for reg, meta_k in history]
    params = {
        key: reg.params
        for (key, _), reg in zip(
            [*entries, *past], [*registrations, *(r for r, _ in history)], strict=True
        )
    }
    kept = [
        seg for seg in reuse if set(seg.keys) <= params.keys() and (folder / seg.file).is_file()
    ]
    held = {k for seg in kept for k in seg.keys}
    fresh = [k for k in params if k not in held]
    if fresh:  # a binary counter: the new segment absorbs the newest old ones not larger
        while kept and len(kept[-1].keys) <= len(fresh):
            fresh = [*kept.pop().keys, *fresh]
    tensors: dict[str, NDArray[np.float32]] = {
        f"{key}/{name}": np.ascontiguousarray(params[key][name], dtype=np.float32)
        for key in fresh
        for name in PARAM_NAMES
    }

    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / META_FILE
    stamp = file_stamp(meta_path)
    if stamp is not None and (cache is None or stamp != cache.committed):
        try:
            parse_meta(meta_path.read_bytes())
        except ValueError as err:
            raise ValueError(
                f"{folder}: {META_FILE} is unreadable ({err}); refusing to overwrite it"
            ) from err
    elif stamp is None and _tensor_files(folder):
        raise _refuse_headless(folder, f"{META_FILE} is missing")
    key = ensure_filter_key()
    top = {k: canonical(v) for k, v in info.items()}
    top["format"] = canonical(FORMAT_VERSION)
    if stamp is None:  # a tensors file must never lie here without a filter.json
        empty = canonical([])
        _commit(
            folder, _assemble({**top, "tensors": empty, "entries": empty, "history": empty}), key
        )

    segments = list(kept)
    if tensors:
        data = dump_tensors(tensors)
        digest = hashlib.sha256(data).hexdigest()
        segments.append(Segment(f"{TENSORS_PREFIX}{digest}{TENSORS_SUFFIX}", digest, tuple(fresh)))
        write_bytes_atomic(folder / segments[-1].file, data)
    top["tensors"] = canonical(_normal([seg.to_json() for seg in segments]))
    top["entries"] = b"[" + b",".join(fragment for _, fragment in entries) + b"]"
    top["history"] = b"[" + b",".join(fragment for _, fragment in past) + b"]"
    _commit(folder, _assemble(top), key)
    if cache is not None:
        cache.fragments = used
        cache.committed = file_stamp(meta_path)
    _clean(folder, {seg.file for seg in segments})
    log.debug(
        "saved %d autoencoders (%d replaced, %d written) to %s in %d segments",
        len(entries),
        len(past),
        len(fresh),
        folder,
        len(segments),
    )
    return segments


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
        return parse_meta(raw)
    except ValueError as err:
        raise ValueError(f"{folder}: {META_FILE} is truncated or not JSON ({err})") from err


#: Deepest nesting of arrays and objects read from ``filter.json``. The store writes about 8
#: levels (a run's config included); 100 keeps everything that walks the parsed file (the
#: digest's ``json.dumps``, say) far from Python's recursion limit.
MAX_META_DEPTH = 100
#: Longest integer literal read (digits): Python's own limit for ``int(str)``, which
#: ``json.dumps`` also needs to write one, so nothing the store wrote is longer.
MAX_INT_DIGITS = 4300
#: Fields of an entry (and of a history entry) that must be finite numbers.
_FINITE_FIELDS = ("user_id", "label", "err_mean", "err_std", "num_examples")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; refuses a key given twice (which ``json`` would silently resolve)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"the key {_clip(key)!r} appears twice in one object")
            seen.add(key)
    return obj


def _clip(text: str, most: int = 40) -> str:
    return text if len(text) <= most else text[:most] + "..."


def _finite_float(text: str) -> float:
    """A JSON number with a fraction or exponent; refuses one that overflows (``1e999``)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {_clip(text)} is out of range")
    return value


def _bounded_int(text: str) -> int:
    """A JSON integer; refuses one of more than :data:`MAX_INT_DIGITS` digits."""
    if len(text) > MAX_INT_DIGITS + 1:  # + 1: a minus sign
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _check_depth(value: Any) -> None:
    """Refuse nesting deeper than :data:`MAX_META_DEPTH` (an explicit stack, no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > MAX_META_DEPTH:
            raise ValueError(f"nested deeper than {MAX_META_DEPTH} levels")
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))


def parse_meta(raw: bytes) -> dict[str, Any]:
    """Parse the bytes of a ``filter.json`` (not verified); every malformation is a ValueError.

    Strict UTF-8 JSON whose top level is an object; no key twice in an object, no number
    that overflows a float, no integer over :data:`MAX_INT_DIGITS` digits, nesting at most
    :data:`MAX_META_DEPTH` deep, and finite numbers in the registration fields of every entry
    and history entry (``NaN`` and ``Infinity`` are kept elsewhere, in the free metadata, as
    ``json.dumps`` writes them).

    Raises
    ------
    ValueError
        Saying, in one line, what is malformed.
    """
    if not raw.strip():
        raise ValueError("empty")
    try:
        text = raw.decode("utf-8")
        meta = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except (ValueError, OverflowError, MemoryError) as err:  # JSONDecodeError, UnicodeError
        raise ValueError(" ".join(str(err).split()) or type(err).__name__) from err
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    _check_depth(meta)
    for name in ("entries", "history"):
        items = meta.get(name)
        for i, entry in enumerate(items if isinstance(items, list) else []):
            for key in _FINITE_FIELDS:
                value = entry.get(key) if isinstance(entry, dict) else None
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{name}[{i}].{key} is {value}, not a finite number")
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
    if fmt not in READABLE_FORMATS:
        raise ValueError(
            f"{folder}: unknown filter format {fmt!r} (this version reads {list(READABLE_FORMATS)})"
        )
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


#: A segment's bytes as read (:func:`_read_all`).
Buffer = mmap.mmap | bytearray


class _Tensors(dict[str, NDArray[np.float32]]):
    """Tensors of a filter's segments, with the content hash of each key they hold.

    The hashes are computed while each segment's own SHA-256 is (:func:`_hash_and_parse`).
    """

    digests: dict[str, str]


def _read_all(path: Path) -> Buffer:
    """The bytes of ``path`` in one private, writable buffer, read once.

    The buffer is anonymous memory (``mmap``, neither zero-filled first like a ``bytearray``
    nor a copy of the file that could change after it was verified); the tensors are views
    into it, so it lives as long as they do.
    """
    with path.open("rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return bytearray()
        data = mmap.mmap(-1, size)
        with memoryview(data) as view:
            got = 0
            while got < size:
                n = handle.readinto(view[got:])
                if not n:
                    break
                got += n
    if got < size:  # shrank while read: the SHA-256 check will tell
        return bytearray(memoryview(data)[:got])
    return data


#: safetensors dtypes read without a copy (other dtypes go through the safetensors reader).
_ZERO_COPY = {"F32": np.dtype("<f4")}


def _parse_safetensors(data: Buffer) -> dict[str, NDArray[np.float32]]:
    """The tensors of a safetensors file held in ``data``, as views into it (no copy).

    Checks what the safetensors reader checks of a file's layout: a JSON header of tensors
    whose byte ranges match their dtype and shape and tile the data area exactly.
    """
    if len(data) < 8:
        raise ValueError("shorter than its 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("header longer than the file")
    header = json.loads(bytes(memoryview(data)[8 : 8 + size]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    base, end_of_data = 8 + size, len(data) - 8 - size
    tensors: dict[str, NDArray[np.float32]] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ValueError(f"tensor {name!r}: malformed header entry")
        if info.get("dtype") not in _ZERO_COPY:
            return dict(load_tensors(bytes(data)))  # the library's reader for other dtypes
        dtype, shape, offsets = (
            _ZERO_COPY[info["dtype"]],
            info.get("shape"),
            info.get("data_offsets"),
        )
        if (
            not isinstance(shape, list)
            or not all(isinstance(k, int) and k >= 0 for k in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(k, int) for k in offsets)
        ):
            raise ValueError(f"tensor {name!r}: malformed header entry")
        begin, end = offsets
        count = math.prod(shape)
        if not 0 <= begin <= end <= end_of_data or end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {name!r}: byte range {offsets} does not match its shape")
        tensors[name] = np.frombuffer(data, dtype, count, base + begin).reshape(shape)
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise ValueError("tensor byte ranges overlap or leave gaps")
        position = end
    if position != end_of_data:
        raise ValueError("data beyond the last tensor")
    return tensors


def _key_digests(tensors: Mapping[str, NDArray[np.float32]], keys: Sequence[str]) -> dict[str, str]:
    """:func:`content_hash` of each registration key whose four float32 tensors are here."""
    out = {}
    for key in keys:
        names = [f"{key}/{name}" for name in PARAM_NAMES]
        if all(n in tensors and tensors[n].dtype == np.float32 for n in names):
            out[key] = content_hash(
                {name: tensors[n] for name, n in zip(PARAM_NAMES, names, strict=True)}
            )
    return out


def _hash_and_parse(
    data: Buffer,
) -> tuple[str, dict[str, NDArray[np.float32]] | Exception, dict[str, str]]:
    """SHA-256 of a segment's bytes, its tensors (or why unreadable), each key's content hash.

    The file's digest runs in one thread while others parse and hash the registrations
    (hashlib releases the GIL), so that both checks cost about one pass's time. Nothing here
    is trusted before the caller has compared the digest.
    """
    workers = max(1, min(8, (os.cpu_count() or 1) - 1))
    with ThreadPoolExecutor(max_workers=1 + workers) as pool:
        whole = pool.submit(lambda: hashlib.sha256(data).hexdigest())
        part: dict[str, NDArray[np.float32]] | Exception
        digests: dict[str, str] = {}
        try:
            part = _parse_safetensors(data)
        except Exception as err:  # safetensors' own error type, or ours
            part = err
        else:
            keys = sorted({name.rsplit("/", 1)[0] for name in part})
            tables = pool.map(lambda k: _key_digests(part, keys[k::workers]), range(workers))
            for table in tables:
                digests.update(table)
        return whole.result(), part, digests


def _load_tensors(
    folder: Path, meta: Mapping[str, Any]
) -> tuple[dict[str, NDArray[np.float32]], list[Segment]]:
    """Every segment named by ``meta`` (SHA-256 and keys checked), merged; and the segments."""
    try:
        refs = _segment_refs(meta)
    except ValueError as err:
        raise ValueError(f"{folder}: {err}") from None
    if not refs:
        if meta.get("entries") or meta.get("history"):
            raise ValueError(f"{folder}: {META_FILE} lists entries but names no tensors file")
        return {}, []
    tensors = _Tensors()
    tensors.digests = {}
    segments = []
    for ref in refs:
        if not isinstance(ref, dict) or not _TENSORS_NAME.match(str(ref.get("file"))):
            raise ValueError(f"{folder}: {META_FILE} names no valid tensors file ({ref!r})")
        path = folder / str(ref["file"])
        try:
            data = _read_all(path)
        except FileNotFoundError:
            raise ValueError(f"{folder}: the tensors file {path.name} is missing") from None
        digest, part, digests = _hash_and_parse(data)
        if not hmac.compare_digest(digest, str(ref.get("sha256"))):
            raise ValueError(f"{folder}: the tensors file {path.name} fails its SHA-256")
        if isinstance(part, Exception):
            raise ValueError(
                f"{folder}: the tensors file {path.name} is unreadable ({part})"
            ) from part
        held = sorted({name.rsplit("/", 1)[0] for name in part})
        keys = ref.get("keys", held)  # format 2 lists no keys: its one file holds them all
        if not isinstance(keys, list) or sorted(map(str, keys)) != held:
            raise ValueError(f"{folder}: the tensors file {path.name} holds other keys than listed")
        if tensors.keys() & part.keys():
            raise ValueError(f"{folder}: the tensors file {path.name} repeats another's tensors")
        tensors.update(part)
        tensors.digests.update(digests)
        segments.append(Segment(path.name, str(ref["sha256"]), tuple(str(k) for k in keys)))
    return tensors, segments


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
    known = getattr(tensors, "digests", {}).get(key)  # hashed while the file was verified
    if (known if known is not None else content_hash(params)) != digest:
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
    regs, meta, _, _ = _open(folder, verify_key=verify_key, with_history=False)
    return regs, meta


def _open(
    folder: Path, *, verify_key: bool, with_history: bool
) -> tuple[list[Registration], dict[str, Any], list[Entry], list[Segment]]:
    """Read and verify once: registrations, metadata, history (if asked) and segments."""
    meta = _read_meta(folder)
    body = _check_digest(folder, meta)
    if verify_key:
        _check_hmac(folder, meta, body)
    else:
        log.info("%s: HMAC not checked (verify_key=False)", folder)
    tensors, segments = _load_tensors(folder, meta)
    regs = [_registration(folder, tensors, e, f"entry {i}") for i, e in enumerate(meta["entries"])]
    history = (
        [
            (_registration(folder, tensors, e, f"history entry {i}"), entry_extra(e))
            for i, e in enumerate(meta["history"])
        ]
        if with_history
        else []
    )
    return regs, meta, history, segments


def load_history(
    folder: Path, meta: Mapping[str, Any]
) -> list[tuple[Registration, dict[str, Any]]]:
    """Replaced versions kept in a saved filter, with their metadata (hashes checked).

    ``meta`` is the metadata returned by :func:`load_filter` (which checked its HMAC); its
    digest and the tensors file are checked again here.
    """
    _check_digest(folder, meta)
    tensors, _ = _load_tensors(folder, meta)
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
    lock_wait_s : float, optional
        Take the folder's writer lock (:class:`~.lock.FilterLock`) before loading, waiting up
        to this many seconds for another writer to finish, and hold it until :meth:`close`
        (or the end of a ``with`` block); a closed filter saves no more. None (the default):
        no lock, for a caller that is the only writer by other means (tests, tools).

    Raises
    ------
    FilterLockedError
        If ``lock_wait_s`` is given and another process writes the folder (a ``ValueError``
        whose one line names the holder's pid, host and start time).
    ValueError
        If the saved filter fails a check, or the folder holds tensors without a filter.
    """

    def __init__(
        self,
        folder: Path,
        info: Mapping[str, Any],
        *,
        verify_key: bool = True,
        lock_wait_s: float | None = None,
    ) -> None:
        # The lock first: a filter loaded before it could be stale by the time it is held.
        self._lock = None if lock_wait_s is None else FilterLock(folder, lock_wait_s)
        try:
            self._load(folder, info, verify_key)
        except BaseException:
            self.close()
            raise

    def _load(self, folder: Path, info: Mapping[str, Any], verify_key: bool) -> None:
        self.folder = folder
        self.info = dict(info)
        self.entries: list[Entry] = []
        self.history: list[Entry] = []
        #: The segments of the committed filter (verified), reused by the next save.
        self.segments: list[Segment] = []
        self._digests: dict[int, str] = {}
        self._cache = SaveCache()
        if (folder / META_FILE).exists():
            regs, meta, self.history, self.segments = _open(
                folder, verify_key=verify_key, with_history=True
            )
            self.entries = [(r, entry_extra(e)) for r, e in zip(regs, meta["entries"], strict=True)]
            # The load verified every content hash: the first save hashes no tensor again.
            self._digests = {
                id(r.params): str(e["sha256"])
                for r, e in zip(
                    [*regs, *(r for r, _ in self.history)],
                    [*meta["entries"], *meta["history"]],
                    strict=True,
                )
            }
            log.info("loaded %d autoencoders from %s", len(regs), folder)
        elif _tensor_files(folder):
            raise _refuse_headless(folder, f"{META_FILE} is missing")
        ensure_filter_key()

    def close(self) -> None:
        """Release the writer lock, if this filter took one; it then saves no more."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> PersistentFilter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        if self._lock is not None and not self._lock.held:
            raise ValueError(f"{self.folder}: the filter was closed (its writer lock released)")
        regs = [r for r, _ in entries]
        extra = {k: e for k, (_, e) in enumerate(entries)}
        # Hashes of the registrations this filter holds (alive in its lists, never changed).
        alive = {id(r.params) for r, _ in [*entries, *history]}
        digests = {k: v for k, v in self._digests.items() if k in alive}
        self.segments = save_filter(
            self.folder,
            regs,
            extra,
            info=self.info,
            history=history,
            reuse=self.segments,
            digests=digests,
            cache=self._cache,
        )
        self._digests = digests
