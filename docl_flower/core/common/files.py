"""Crash-safe file writes, file identity stamps, and content hashes cached per process.

A crash-safe write goes to a temporary file in the same folder, is fsynced, then renamed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """Identity of the file at ``path`` now (inode, size, mtime), None if there is none.

    Every atomic write (:func:`atomic_write`) gives a new inode, so an unchanged stamp means
    the file has not been replaced since.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


#: Per-process cache of content hashes, keyed by kind and the file's identity and stamp.
_DIGESTS: dict[tuple[str, str, int, int, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()


def sha256_stream(handle: io.BufferedIOBase | BinaryIO) -> str:
    """SHA-256 of everything left to read from ``handle``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def cached_digest(kind: str, path: str | Path, compute: Callable[[Path], str]) -> str:
    """``compute(path)``, computed once per process until the file changes.

    The key is ``kind``, the resolved path, device, inode, size and modification time, so a
    replaced or rewritten file is hashed again.
    """
    resolved = Path(path).expanduser().resolve()
    st = resolved.stat()
    key = (kind, str(resolved), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(key)
    if known is None:
        known = compute(resolved)
        with _DIGESTS_LOCK:
            _DIGESTS[key] = known
    return known


def _read_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return sha256_stream(handle)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, cached per process until the file changes."""
    return cached_digest("file", path, _read_sha256)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary path next to ``path``, then rename it over ``path``.

    Readers see the old file or the new one, never half of one; a failed ``write`` leaves
    ``path`` untouched and no temporary file behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, payload: object) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync folder)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def create_file_atomic(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data`` (permissions ``mode``) unless it exists already.

    The content is written and fsynced under a temporary name, then hard-linked to ``path``,
    so ``path`` appears whole or not at all and an existing file is never replaced (two
    processes racing to create it agree on one content). Where hard links are not supported,
    falls back to an exclusive create (``O_EXCL``).

    Returns
    -------
    bool
        True when this call created ``path``, False when it existed already.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        _write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here: exclusive create instead
            try:
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                return False
            try:
                _write_all(out, data)
                os.fsync(out)
            finally:
                os.close(out)
        fsync_dir(path.parent)
        return True
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def cache_folder(name: str) -> Path:
    """A private cache folder of this project, created.

    ``$DOCL_FLOWER_CACHE/NAME``, else ``$XDG_CACHE_HOME/docl_flower/NAME`` or
    ``~/.cache/docl_flower/NAME``. Where that cannot be written (no home directory,
    read-only), a folder of this user in the temp dir, mode 0700, refused if another user
    owns it or others may write to it.
    """
    env = os.environ.get("DOCL_FLOWER_CACHE")
    xdg = os.environ.get("XDG_CACHE_HOME")
    try:
        if env:
            path = Path(env) / name
        else:
            path = (Path(xdg) if xdg else Path.home() / ".cache") / "docl_flower" / name
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except (OSError, RuntimeError):  # RuntimeError: no home directory
        path = Path(tempfile.gettempdir()) / f"docl_flower-{name}-{os.getuid()}"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise RuntimeError(
                f"cache folder {path} belongs to another user or is writable by others; "
                "set DOCL_FLOWER_CACHE to a private folder"
            ) from None
    return path
