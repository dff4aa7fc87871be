"""MNIST and Fashion-MNIST: gzip IDX archives checked by SHA-256 (``data/`` or Debian's packages)."""

from __future__ import annotations

import gzip
import logging
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from docl_flower.core.common.checks import check_flag, check_path_text
from docl_flower.core.common.files import cached_digest, file_sha256, sha256_stream
from docl_flower.core.data.base import (
    LOADER_VERSION,
    SPLITS,
    DataError,
    Split,
    check_split,
    content_digest,
)

log = logging.getLogger(__name__)


#: File names of the standard IDX archives, per split.
IDX_FILES: dict[Split, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: SHA-256 of the gzip archives shipped in ``data/`` (and installed by Debian's packages).
KNOWN_SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "t10k-images-idx3-ubyte.gz": "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
        "t10k-labels-idx1-ubyte.gz": "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
        "train-images-idx3-ubyte.gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
        "train-labels-idx1-ubyte.gz": "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    },
    "fashion-mnist": {
        "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    },
}

#: SHA-256 of the *decompressed* IDX files. The same data compressed differently (the
#: publishers' archives, which torchvision downloads, differ byte-wise from the copies above)
#: passes the check when its contents match these.
KNOWN_CONTENT_SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
    "fashion-mnist": {
        "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    },
}

#: Debian packages that install a data set's IDX archives, and where.
DEBIAN_PACKAGES: dict[str, tuple[str, str]] = {
    "fashion-mnist": ("dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist"),
}


# ---------------------------------------------------------------------------- hashing


def _gzip_sha256(path: Path) -> str:
    try:
        with gzip.open(path, "rb") as handle:
            return sha256_stream(handle)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is not a readable gzip file ({err})") from err


def gzip_content_sha256(path: Path) -> str:
    """SHA-256 of a gzip file's decompressed bytes (cached like :func:`file_sha256`)."""
    return cached_digest("gzip", path, _gzip_sha256)


# ---------------------------------------------------------------------------- IDX (MNIST)


def _read_idx(path: Path) -> NDArray[np.uint8]:
    """Parse a gzip-compressed IDX file (images: 3 dims, labels: 1 dim)."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is not a readable gzip file ({err})") from err
    if len(raw) < 4 or raw[2] != 8:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def _idx_dims(path: Path) -> tuple[int, ...]:
    """The dimensions an IDX file's header declares (reads a few bytes only)."""
    try:
        with gzip.open(path, "rb") as handle:
            head = handle.read(4)
            if len(head) < 4 or head[2] != 8:
                raise DataError(f"{path}: not an IDX file of unsigned bytes")
            body = handle.read(4 * head[3])
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is not a readable gzip file ({err})") from err
    return tuple(int.from_bytes(body[4 * i : 4 * i + 4], "big") for i in range(head[3]))


def _idx_missing_message(name: str, filename: str, folders: Sequence[Path], root: Path) -> str:
    where = ", ".join(str(f) for f in folders)
    debian = DEBIAN_PACKAGES.get(name)
    local = (
        f"install Debian's {debian[0]} package (it puts the archives in {debian[1]}) or copy "
        f"the standard IDX archive {filename} into {root}"
        if debian is not None
        else f"copy the standard IDX archive {filename} into {root} (the repository ships "
        "MNIST in data/)"
    )
    return (
        f"{name}: {filename} is not in {where}. Either {local}, or set download: true and run "
        "once with a network (torchvision downloads it)"
    )


def _download(name: str, root: Path, filename: str, folders: Sequence[Path] = ()) -> None:
    """Fetch a missing archive through torchvision (needs a network)."""
    from torchvision import datasets  # local import: only needed on this rare path

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}.get(name)
    if cls is None:
        raise DataError(f"no download source for data set {name!r}")
    tmp = root / "_download"
    try:
        try:
            cls(str(tmp), train=filename.startswith("train"), download=True)
        except Exception as err:
            raise DataError(
                f"{_idx_missing_message(name, filename, folders or [root], root)}; "
                f"the download failed ({' '.join(str(err).split())})"
            ) from err
        found = next(tmp.rglob(filename), None)
        if found is None:
            raise DataError(f"torchvision downloaded {name} but {filename} is not among its files")
        shutil.move(str(found), root / filename)
    finally:  # a failed download leaves no partial folder behind
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class IdxDataset:
    """An MNIST-style data set of grey images stored as gzip IDX archives (28x28 for MNIST).

    Parameters
    ----------
    name : str
        ``"mnist"`` or ``"fashion-mnist"``; selects the known checksums.
    root : str
        Folder that holds the archives (a download goes here).
    verify : bool
        Check each archive's SHA-256 before parsing it: the archive's own or, for a copy
        compressed differently, that of its decompressed contents.
    download : bool
        Download a missing archive through torchvision when a network is up.
    search : sequence of str
        More folders to look in, in order, for an archive that ``root`` lacks (e.g. where a
        system package installs it).
    """

    name: str
    root: str
    verify: bool = True
    download: bool = True
    search: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a data set name, got {self.name!r}")
        check_path_text("root", self.root)
        check_flag("verify", self.verify)
        if self.verify and self.name not in KNOWN_SHA256:
            raise ValueError(
                f"name must be one of {sorted(KNOWN_SHA256)} (their checksums are known), got "
                f"{self.name!r}; set verify: false to read another IDX data set unchecked"
            )
        check_flag("download", self.download)
        if isinstance(self.search, str) or not isinstance(self.search, Sequence):
            raise ValueError(f"search must be a list of folders, got {self.search!r}")
        folders = tuple(check_path_text("search", s) for s in self.search)
        object.__setattr__(self, "search", folders)

    def _folders(self) -> list[Path]:
        return [Path(f).expanduser() for f in (self.root, *self.search)]

    def _find(self, filename: str) -> Path | None:
        return next((f / filename for f in self._folders() if (f / filename).is_file()), None)

    def _check(self, path: Path, filename: str) -> None:
        expected = KNOWN_SHA256.get(self.name, {}).get(filename)
        if not self.verify or expected is None or file_sha256(path) == expected:
            return
        content = KNOWN_CONTENT_SHA256.get(self.name, {}).get(filename)
        if content is not None and gzip_content_sha256(path) == content:
            return
        raise DataError(
            f"{path} fails its SHA-256 check (expected {expected}, or decompressed contents "
            f"{content}); delete it and copy or download it again"
        )

    def path(self, filename: str) -> Path:
        """Return the path of one archive, fetching and verifying it first."""
        root = Path(self.root).expanduser()
        path = self._find(filename)
        if path is None:
            folders = self._folders()
            if not self.download:
                raise DataError(
                    _idx_missing_message(self.name, filename, folders, root)
                    + " (downloads are disabled: the file is missing)"
                )
            root.mkdir(parents=True, exist_ok=True)
            log.warning("%s is missing: downloading it through torchvision", root / filename)
            _download(self.name, root, filename, folders)
            path = root / filename
        self._check(path, filename)
        return path

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image, from an images archive's header (the test split's first)."""
        for split in ("test", "train"):
            found = self._find(IDX_FILES[split][0])
            if found is not None:
                return _idx_dims(found)[1:]
        return _idx_dims(self.path(IDX_FILES["test"][0]))[1:]

    def load(self, split: Split) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
        """Return ``(images (n, H, W) uint8, labels (n,) int64)`` of one split."""
        images_file, labels_file = IDX_FILES[check_split(split)]
        images = _read_idx(self.path(images_file))
        labels = _read_idx(self.path(labels_file)).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{self.name}/{split}: images {images.shape}, labels {labels.shape}")
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{self.name}/{split}: {images.shape[0]} images, {labels.shape[0]} labels"
            )
        return images, labels

    def check(self, split: Split) -> None:
        """Locate (download when allowed) and verify the archives of ``split``."""
        for filename in IDX_FILES[check_split(split)]:
            self.path(filename)

    def fingerprint(self) -> str:
        """Content hash of both splits (no download, and no file read for verified known data).

        With ``verify`` and known checksums the decompressed contents are known, whatever folder
        or compression; otherwise every archive's decompressed contents are hashed (cached per
        process), a missing one counting as missing. Hashing contents, not gzip bytes, keeps the
        fingerprint of a recompressed copy, whose header (time stamp, level) differs.
        """
        files = [f for split in SPLITS for f in IDX_FILES[split]]
        known = KNOWN_CONTENT_SHA256.get(self.name, {})
        if self.verify and all(f in known for f in files):
            contents = {f: known[f] for f in files}
        else:
            found = {f: self._find(f) for f in files}
            contents = {
                f: "missing" if p is None else gzip_content_sha256(p) for f, p in found.items()
            }
        return content_digest({"loader": "idx", "version": LOADER_VERSION, "files": contents})
