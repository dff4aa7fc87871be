"""On-disk cache of slow features: computed once per data set, extractor and split.

Face descriptors and CNN features take about 0.1 s per image on a CPU; every client and the
server would otherwise recompute them for the same images in every run. The cache stores the
features of a whole split once, under a key made of content hashes, and every later reader
(a client, the server, another run) memory-maps the file and reads only the rows it needs.

Key: SHA-256 of (format version, data set fingerprint, :meth:`FeatureExtractor.key`, split).
The data set fingerprint is the caller's (e.g. the SHA-256 of the image files); the extractor
key holds the class, its parameters and the SHA-256 of its weights, so a change to any of them
never reuses stale features.

Files, in the cache folder (``$DOCL_FLOWER_CACHE/features``, else
``$XDG_CACHE_HOME/docl_flower/features``, else ``~/.cache/docl_flower/features``, else a
private folder under the system temp dir):

- ``<key>.npy``: ``(n, D)`` float32 features (written last, atomically: its presence means the
  entry is complete);
- ``<key>.fallback.npy``: ``(n,)`` bool, images where the extractor fell back (no face found);
- ``<key>.json``: what the entry holds (data set, extractor key, split, image shape, n, D);
- ``<key>.lock``: the lock file that lets exactly one process compute a missing entry while
  the others wait for it (``fcntl.flock``).

Whatever is read is verified (shape ``(n, D)``, float32, the rows read finite and in
``[0, 1]``); a truncated or corrupt entry is logged and recomputed, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from docl_flower.core.common.files import atomic_write, cache_folder, fsync_dir, write_json_atomic
from docl_flower.core.features.extractors import Extraction, FeatureExtractor, extract

log = logging.getLogger(__name__)

#: Bumped when the file layout changes (old entries are then never read).
CACHE_FORMAT = 1


def default_folder() -> Path:
    """The feature cache folder (created; private temp-dir fallback when not writable)."""
    return cache_folder("features")


def array_fingerprint(images: NDArray[Any]) -> str:
    """SHA-256 of an image array's dtype, shape and bytes (a data set fingerprint)."""
    digest = hashlib.sha256(f"{images.dtype.str}{images.shape}".encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()


class _Progress:
    """tqdm on a TTY where installed, else a log line every 10% (at most every 5 s)."""

    def __init__(self, total: int, label: str, enabled: bool | None) -> None:
        self.total, self.label, self.done = total, label, 0
        self.start = self.last = time.monotonic()
        self.bar: Any = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            try:
                tqdm = importlib.import_module("tqdm").tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=label, unit="img", file=sys.stderr)
        self.next_log = max(1, total // 10)

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        if self.done >= self.next_log and (now - self.last >= 5.0 or self.done >= self.total):
            self.last = now
            self.next_log = self.done + max(1, self.total // 10)
            log.info(
                "%s: %d/%d images (%.0f s)", self.label, self.done, self.total, now - self.start
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (no lock, with a warning, where unsupported)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            log.warning("feature cache: cannot lock %s (%s); computing without a lock", path, err)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class FeatureCache:
    """Features of whole splits, computed once and memory-mapped from disk.

    Parameters
    ----------
    folder : str, Path or None
        Where entries are stored; None: :func:`default_folder`.
    progress : bool or None
        Show progress while computing: a tqdm bar on stderr (where tqdm is installed) or log
        lines. None: only when stderr is a terminal.
    chunk : int
        Images given to the extractor at once while computing.
    """

    def __init__(
        self, folder: str | Path | None = None, progress: bool | None = None, chunk: int = 256
    ) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.folder = Path(folder) if folder is not None else default_folder()
        self.progress = progress
        self.chunk = chunk
        #: Entries this object computed (not read), for reports and tests.
        self.computed = 0

    def entry(self, dataset_key: str, extractor: FeatureExtractor, split: str) -> str:
        """The entry name (hex SHA-256) of a data set, extractor and split."""
        payload = json.dumps(
            [CACHE_FORMAT, dataset_key, extractor.key(), split], separators=(",", ":")
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def paths(self, dataset_key: str, extractor: FeatureExtractor, split: str) -> dict[str, Path]:
        """The files of an entry: ``features``, ``fallback``, ``meta`` and ``lock``."""
        name = self.entry(dataset_key, extractor, split)
        return {
            "features": self.folder / f"{name}.npy",
            "fallback": self.folder / f"{name}.fallback.npy",
            "meta": self.folder / f"{name}.json",
            "lock": self.folder / f"{name}.lock",
        }

    def features(
        self,
        dataset_key: str,
        extractor: FeatureExtractor,
        split: str,
        images: Callable[[], NDArray[Any]],
        rows: NDArray[np.integer[Any]] | None = None,
    ) -> torch.Tensor:
        """``(len(rows), D)`` float32 features of a split's ``rows`` (all rows if None).

        ``images()`` loads the whole split; it is only called when the entry is missing or
        invalid, or when the extractor is not :attr:`~FeatureExtractor.cacheable` (then only
        the requested rows are computed, nothing is stored).
        """
        return self.extract(dataset_key, extractor, split, images, rows).features

    def extract(
        self,
        dataset_key: str,
        extractor: FeatureExtractor,
        split: str,
        images: Callable[[], NDArray[Any]],
        rows: NDArray[np.integer[Any]] | None = None,
    ) -> Extraction:
        """Like :meth:`features`, with the fallback flags (no face detected) of the rows."""
        if not extractor.cacheable:
            data = images()
            return extract(extractor, data if rows is None else data[np.asarray(rows)])
        paths = self.paths(dataset_key, extractor, split)
        found = self._read(paths, dataset_key, extractor, split, rows)
        if found is not None:
            return found
        self.folder.mkdir(parents=True, exist_ok=True)
        with _locked(paths["lock"]):
            # Another process may have computed the entry while this one waited for the lock.
            found = self._read(paths, dataset_key, extractor, split, rows, log_invalid=False)
            if found is not None:
                return found
            self._compute(paths, dataset_key, extractor, split, images())
        found = self._read(paths, dataset_key, extractor, split, rows)
        if found is None:
            raise RuntimeError(f"feature cache: {paths['features']} is invalid right after writing")
        return found

    def _read(
        self,
        paths: dict[str, Path],
        dataset_key: str,
        extractor: FeatureExtractor,
        split: str,
        rows: NDArray[np.integer[Any]] | None,
        log_invalid: bool = True,
    ) -> Extraction | None:
        """The entry's rows, or None when it is missing or fails a check."""
        if not paths["features"].exists():
            return None
        try:
            meta = json.loads(paths["meta"].read_text(encoding="utf-8"))
            expected = [CACHE_FORMAT, dataset_key, extractor.key(), split]
            if [meta.get(k) for k in ("format", "dataset", "extractor", "split")] != expected:
                raise ValueError("its description names another data set, extractor or split")
            n, d = int(meta["n"]), int(meta["dim"])
            if d != extractor.dim(tuple(int(s) for s in meta["image_shape"])):
                raise ValueError(f"dimension {d} is not the extractor's")
            feats = np.load(paths["features"], mmap_mode="r", allow_pickle=False)
            flags = np.load(paths["fallback"], mmap_mode="r", allow_pickle=False)
            if feats.shape != (n, d) or feats.dtype != np.float32:
                raise ValueError(
                    f"features are {feats.dtype} {feats.shape}, expected float32 {(n, d)}"
                )
            if flags.shape != (n,) or flags.dtype != np.bool_:
                raise ValueError(f"fallback flags are {flags.dtype} {flags.shape}")
            if rows is None:
                x, f = np.array(feats), np.array(flags)
            else:
                index = np.asarray(rows)
                if index.size and (index.min() < -n or index.max() >= n):
                    raise IndexError(f"rows out of range for {n} images")
                x, f = np.asarray(feats[index]), np.asarray(flags[index])
            if not (np.isfinite(x).all() and (x >= 0).all() and (x <= 1).all()):
                raise ValueError("features outside [0, 1] or not finite")
        except IndexError:
            raise
        except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
            if log_invalid:
                log.warning(
                    "feature cache: %s is invalid (%s); recomputing", paths["features"], err
                )
            return None
        return Extraction(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), f)

    def _compute(
        self,
        paths: dict[str, Path],
        dataset_key: str,
        extractor: FeatureExtractor,
        split: str,
        data: NDArray[Any],
    ) -> None:
        """Compute the whole split in chunks into a new entry (atomic writes)."""
        n = int(data.shape[0])
        d = extractor.dim(tuple(int(s) for s in data.shape[1:]))
        label = f"features {split} ({type(extractor).__name__})"
        log.info("%s: computing %d images -> %s", label, n, paths["features"])
        flags = np.zeros(n, dtype=np.bool_)
        progress = _Progress(n, label, self.progress)

        def write(tmp: Path) -> None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, d))
            try:
                for start in range(0, n, self.chunk):
                    part = extract(extractor, data[start : start + self.chunk])
                    values = part.features.detach().cpu().numpy()
                    if values.shape != (min(self.chunk, n - start), d):
                        raise ValueError(
                            f"{type(extractor).__name__} returned {values.shape}, expected "
                            f"({min(self.chunk, n - start)}, {d})"
                        )
                    out[start : start + len(values)] = values
                    flags[start : start + len(values)] = part.fallback
                    progress.update(len(values))
                out.flush()
            finally:
                del out

        try:
            started = time.monotonic()
            meta = {
                "format": CACHE_FORMAT,
                "dataset": dataset_key,
                "extractor": extractor.key(),
                "split": split,
                "image_shape": [int(s) for s in data.shape[1:]],
                "n": n,
                "dim": d,
            }
            # Features are computed under a temporary name and renamed last: the presence of
            # the features file means that the flags and the description beside it are whole.
            partial = paths["features"].with_name(paths["features"].stem + ".partial.npy")
            paths["features"].unlink(missing_ok=True)
            atomic_write(partial, write)

            def save_flags(tmp: Path) -> None:
                with tmp.open("wb") as handle:
                    np.save(handle, flags, allow_pickle=False)

            atomic_write(paths["fallback"], save_flags)
            write_json_atomic(paths["meta"], meta)
            os.replace(partial, paths["features"])
            fsync_dir(self.folder)
        finally:
            progress.close()
        self.computed += 1
        log.info(
            "%s: %d images in %.1f s (%d without a detected face)",
            label,
            n,
            time.monotonic() - started,
            int(flags.sum()),
        )
