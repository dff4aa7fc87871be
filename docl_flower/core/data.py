"""Image data sets as uint8 arrays, checked by SHA-256, and the per-user partitions of the paper.

Every data set implements :class:`ImageDataset`: ``load(split)`` returns ``(images, labels)``,
``image_shape`` is the shape of one image and ``fingerprint()`` is a content hash of what
``load`` returns for both splits (a feature-cache key). The data sets are

- :class:`IdxDataset`: MNIST and Fashion-MNIST (gzip IDX archives);
- :class:`ImageFolderDataset`: one folder per class or identity, any image PIL reads (the ORL
  faces of ``data/att-faces`` among them), or one folder of unlabelled images;
- :class:`Cifar10Dataset`: CIFAR-10's python archive, read from the tar without extracting it.

No Flower here: everything is plain numpy so that the core is testable without a simulation.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import shutil
import tarfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from .checks import check_int
from .decode import read_image_isolated
from .files import cached_digest, file_sha256, sha256_stream

log = logging.getLogger(__name__)

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")

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

#: SHA-256 of the official ``cifar-10-python.tar.gz`` (md5 c58f30108f718f92721af3b95e74349a,
#: the value torchvision checks; this SHA-256 is the one Keras's ``cifar10.load_data`` checks).
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"

#: The pickle batches of CIFAR-10's python archive, per split.
CIFAR10_BATCHES: dict[Split, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}

#: Bump when a loader's decoding changes, so that fingerprints (cache keys) change with it.
LOADER_VERSION = 1


class DataError(RuntimeError):
    """A data file is missing, corrupt, or cannot be downloaded."""


class ImageDataset(Protocol):
    """What every data set offers: its images, their shape, and a content fingerprint."""

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image: ``(H, W)`` for grey, ``(H, W, C)`` for colour."""
        ...

    def load(self, split: Split) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
        """Return ``(images (n, *image_shape) uint8, labels (n,) int64)`` of one split."""
        ...

    def fingerprint(self) -> str:
        """A hex digest that changes whenever what :meth:`load` returns (either split) changes."""
        ...

    def check(self, split: Split) -> None:
        """Raise :class:`DataError` (saying how to get it) unless ``split`` can be loaded.

        Cheap next to :meth:`load`: files are located and checksummed (or listed), not decoded.
        """
        ...


#: Splits kept in memory by :func:`load_cached` (a process trains one user after another).
_LOADED: dict[tuple[str, str, str], tuple[NDArray[np.uint8], NDArray[np.int64]]] = {}
_LOADED_MAX = 2


def load_cached(dataset: ImageDataset, split: Split) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """``dataset.load(split)``, kept for the next call of this process while its files are the same.

    A simulated client process (a Ray actor) trains many users one after another; decoding the
    whole split again for each of them cost as much as training one user of 60 MNIST images.
    The key is the data set's content fingerprint, so a changed file is read again. The
    arrays are returned read-only (they are shared by every later caller); at most
    ``_LOADED_MAX`` splits are kept.
    """
    key = (type(dataset).__qualname__, dataset.fingerprint(), split)
    hit = _LOADED.pop(key, None)
    if hit is None:
        images, labels = dataset.load(split)
        images.flags.writeable = False
        labels.flags.writeable = False
        hit = (images, labels)
    _LOADED[key] = hit  # most recently used last
    while len(_LOADED) > _LOADED_MAX:
        _LOADED.pop(next(iter(_LOADED)))
    return hit


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


def _digest(obj: object) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _check_sha256_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ValueError(f"{name} must be a SHA-256 (64 hex digits), got {value!r}")
    return value.lower()


def _check_split(split: object) -> Split:
    if split == "train":
        return "train"
    if split == "test":
        return "test"
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _check_path_text(name: str, value: object) -> str:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ValueError(f"{name} must be a folder path, got {value!r}")
    return str(value)


def _int_list(name: str, value: object, minimum: int = 0) -> list[int]:
    """A list of ints ``>= minimum`` (messages name the field)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list of ints >= {minimum}, got {value!r}")
    return [check_int(name, v, minimum) for v in value]


def _fraction_list(name: str, value: object) -> list[float]:
    """A non-empty list of fractions in (0, 1]."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{name} must be a non-empty list of fractions in (0, 1], got {value!r}")
    out = []
    for v in value:
        ok = not isinstance(v, bool) and isinstance(v, int | float) and 0.0 < float(v) <= 1.0
        if not ok:
            raise ValueError(f"{name} must hold fractions in (0, 1], got {v!r}")
        out.append(float(v))
    return out


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
        _check_path_text("root", self.root)
        _check_flag("verify", self.verify)
        if self.verify and self.name not in KNOWN_SHA256:
            raise ValueError(
                f"name must be one of {sorted(KNOWN_SHA256)} (their checksums are known), got "
                f"{self.name!r}; set verify: false to read another IDX data set unchecked"
            )
        _check_flag("download", self.download)
        if isinstance(self.search, str) or not isinstance(self.search, Sequence):
            raise ValueError(f"search must be a list of folders, got {self.search!r}")
        folders = tuple(_check_path_text("search", s) for s in self.search)
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
        images_file, labels_file = IDX_FILES[_check_split(split)]
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
        for filename in IDX_FILES[_check_split(split)]:
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
        return _digest({"loader": "idx", "version": LOADER_VERSION, "files": contents})


# ---------------------------------------------------------------------------- image folders

#: Decoders an image folder may use (PIL format names) and the file names it reads.
IMAGE_FORMATS = ("PNG", "JPEG", "PPM", "BMP", "GIF", "TIFF", "WEBP")
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".pgm", ".pbm", ".ppm", ".pnm", ".bmp", ".dib"}
    | {".gif", ".tif", ".tiff", ".webp"}
)

#: Modes an image folder converts to, and the shape each gives an ``(H, W)`` image.
IMAGE_MODES: dict[str, int] = {"L": 1, "RGB": 3}

#: The test share of each class when neither ``test_per_class`` nor ``test_fraction`` is set.
DEFAULT_TEST_FRACTION = 0.3

#: Most unreadable files a warning names (it always gives their count).
_MAX_NAMED = 20


def natural_key(text: str) -> tuple[tuple[tuple[int, str], ...], str]:
    """Sort key that orders digit runs by value: ``s2`` before ``s10`` (case-insensitive)."""
    parts = re.split(r"(\d+)", text)
    key = tuple((int(p), "") if i % 2 else (-1, p.lower()) for i, p in enumerate(parts))
    return key, text


def _image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively, hidden names skipped), naturally sorted."""
    files = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            files.append(path)
    return sorted(files, key=lambda p: natural_key(p.relative_to(folder).as_posix()))


def read_image(
    path: Path, mode: str, size: tuple[int, int], *, timeout: float | None = None
) -> NDArray[np.uint8]:
    """Decode one image: EXIF orientation applied, converted to ``mode``, resized to ``size``.

    The file is treated as hostile: it is decoded in the worker process of
    :mod:`docl_flower.core.decode`, under its byte, pixel and time budgets, so that no file
    can raise anything but :class:`~docl_flower.core.decode.ImageReadError`, hang or crash
    the caller.

    Parameters
    ----------
    path : Path
        The file (PNG, JPEG, PGM/PPM, BMP, GIF, TIFF or WebP).
    mode : str
        ``"L"`` (grey) or ``"RGB"``.
    size : tuple of int
        ``(H, W)``; images of another size are resized (bilinear, antialiased).
    timeout : float, optional
        Seconds the file may take (default :data:`~docl_flower.core.decode.DECODE_TIMEOUT_S`).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` uint8 for ``"L"``, ``(H, W, 3)`` for ``"RGB"``.

    Raises
    ------
    ImageReadError
        The file is unreadable, not an image, too large, or took too long (the message,
        one line, says which).
    """
    return read_image_isolated(path, mode, size, formats=IMAGE_FORMATS, timeout=timeout)


@dataclass(frozen=True)
class ImageFolderDataset:
    """Images in one folder per class or identity (class index: natural order of the names).

    Each class is split into train and test by a seeded permutation (at least one training
    image is kept per class). ``flat`` reads a folder of images that have no classes (a
    harmless set): all of them form the test split, labelled -1, and the train split is empty.
    Unreadable files are skipped and reported in one warning.

    Parameters
    ----------
    root : str
        The folder of class folders (or, with ``flat``, of images).
    image_size : sequence of int
        ``(H, W)`` of the images ``load`` returns; others are resized.
    mode : str
        ``"L"`` (grey, images ``(H, W)``) or ``"RGB"`` (images ``(H, W, 3)``).
    test_per_class : int, optional
        Test images per class.
    test_fraction : float, optional
        Share of each class's images in the test split, instead (default 0.3 when neither is
        set).
    split_seed : int
        Seed of the train/test split.
    flat : bool
        A folder without classes (see above).
    sha256 : str, optional
        Expected :meth:`content_sha256` of the files; ``load`` refuses other contents.
    """

    root: str
    image_size: Sequence[int]
    mode: str = "L"
    test_per_class: int | None = None
    test_fraction: float | None = None
    split_seed: int = 0
    flat: bool = False
    sha256: str | None = None

    def __post_init__(self) -> None:
        _check_path_text("root", self.root)
        size = self.image_size
        if isinstance(size, str) or not isinstance(size, Sequence) or len(size) != 2:
            raise ValueError(f"image_size must be [H, W], got {size!r}")
        object.__setattr__(self, "image_size", tuple(check_int("image_size", s, 1) for s in size))
        if self.mode not in IMAGE_MODES:
            raise ValueError(f"mode must be one of {sorted(IMAGE_MODES)}, got {self.mode!r}")
        if self.test_per_class is not None and self.test_fraction is not None:
            raise ValueError("test_per_class and test_fraction: set one of them, not both")
        if self.test_per_class is not None:
            check_int("test_per_class", self.test_per_class, 0)
        if self.test_fraction is not None:
            frac = self.test_fraction
            if isinstance(frac, bool) or not isinstance(frac, int | float):
                raise ValueError(f"test_fraction must be a number in [0, 1), got {frac!r}")
            if not (math.isfinite(frac) and 0.0 <= frac < 1.0):
                raise ValueError(f"test_fraction must be in [0, 1), got {frac!r}")
        check_int("split_seed", self.split_seed, 0)
        _check_flag("flat", self.flat)
        if self.sha256 is not None:
            object.__setattr__(self, "sha256", _check_sha256_text("sha256", self.sha256))

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(H, W)`` for grey, ``(H, W, 3)`` for RGB (no file is read)."""
        height, width = self.image_size
        channels = IMAGE_MODES[self.mode]
        return (height, width) if channels == 1 else (height, width, channels)

    def _root(self) -> Path:
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise DataError(f"{root} is not a folder (image folder data set)")
        return root

    def classes(self) -> list[str]:
        """The class folder names, in class-index order."""
        if self.flat:
            return []
        root = self._root()
        names = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if not names:
            raise DataError(
                f"{root}: no class folders (expected one sub-folder per class or identity)"
            )
        return sorted(names, key=natural_key)

    def _files(self) -> list[tuple[int, list[Path]]]:
        """``(label, image files)`` per class; one group labelled -1 when ``flat``."""
        root = self._root()
        if self.flat:
            files = _image_files(root)
            if not files:
                raise DataError(f"{root}: no image files (suffixes {sorted(IMAGE_SUFFIXES)})")
            return [(-1, files)]
        groups = []
        for label, name in enumerate(self.classes()):
            files = _image_files(root / name)
            if not files:
                raise DataError(
                    f"{root / name}: class folder holds no image file (every class needs one; "
                    f"suffixes {sorted(IMAGE_SUFFIXES)})"
                )
            groups.append((label, files))
        return groups

    def content_sha256(self) -> str:
        """SHA-256 over the relative paths and SHA-256 of every image file (cached per process)."""
        root = self._root()
        lines = [
            f"{path.relative_to(root).as_posix()}\t{file_sha256(path)}\n"
            for _, files in self._files()
            for path in files
        ]
        return hashlib.sha256("".join(lines).encode()).hexdigest()

    def _num_test(self, count: int) -> int:
        if self.test_per_class is not None:
            wanted = self.test_per_class
        else:
            frac = DEFAULT_TEST_FRACTION if self.test_fraction is None else self.test_fraction
            wanted = round(frac * count)
        return max(0, min(wanted, count - 1))  # keep at least one training image

    def check(self, split: Split) -> None:
        """The folder exists and holds image files for ``split`` (not decoded)."""
        if not any(files for _, files in self.split_files(split)):
            raise DataError(f"{self._root()}: no {split} images")

    def split_files(self, split: Split) -> list[tuple[int, list[Path]]]:
        """``(label, files)`` per class of one split (before decoding)."""
        split = _check_split(split)
        out = []
        for label, files in self._files():
            if self.flat:
                out.append((label, files if split == "test" else []))
                continue
            order = np.random.default_rng([self.split_seed, label]).permutation(len(files))
            cut = self._num_test(len(files))
            chosen = np.sort(order[:cut] if split == "test" else order[cut:])
            out.append((label, [files[int(i)] for i in chosen]))
        return out

    def load(self, split: Split) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
        """Return ``(images (n, *image_shape) uint8, labels (n,) int64)`` of one split.

        Raises
        ------
        DataError
            The folder is missing, has no classes, a class has no image file, a class has no
            readable training image, or the files fail the ``sha256`` check.
        """
        root = self._root()
        if self.sha256 is not None:
            actual = self.content_sha256()
            if actual != self.sha256:
                raise DataError(
                    f"{root} fails its SHA-256 check (expected {self.sha256}, got {actual}): "
                    "files were added, removed or changed; restore them or update sha256"
                )
        size = (int(self.image_size[0]), int(self.image_size[1]))
        images: list[NDArray[np.uint8]] = []
        labels: list[int] = []
        skipped: list[str] = []
        for label, files in self.split_files(split):
            read = 0
            for path in files:
                try:
                    images.append(read_image(path, self.mode, size))
                except Exception as err:  # any decoder failure: skip the file, report it below
                    skipped.append(f"{path.relative_to(root).as_posix()} ({err})")
                    continue
                labels.append(label)
                read += 1
            if split == "train" and not self.flat and read == 0:
                folder = root / self.classes()[label]
                raise DataError(f"{folder}: no readable training image (class {label})")
        if skipped:
            named = "; ".join(skipped[:_MAX_NAMED]) + ("; ..." if len(skipped) > _MAX_NAMED else "")
            log.warning(
                "%s (%s split): skipped %d unreadable file(s): %s", root, split, len(skipped), named
            )
        if not images:
            return np.zeros((0, *self.image_shape), np.uint8), np.zeros(0, np.int64)
        return np.stack(images), np.asarray(labels, dtype=np.int64)

    def fingerprint(self) -> str:
        """Content hash of the files and of every parameter that shapes what ``load`` returns."""
        return _digest(
            {
                "loader": "image_folder",
                "version": LOADER_VERSION,
                "files": self.content_sha256(),
                "image_size": list(self.image_size),
                "mode": self.mode,
                "test_per_class": self.test_per_class,
                "test_fraction": self.test_fraction,
                "default_test_fraction": DEFAULT_TEST_FRACTION,
                "split_seed": self.split_seed,
                "flat": self.flat,
            }
        )


# ---------------------------------------------------------------------------- CIFAR-10


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it (latin-1 only)."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"encoding {encoding!r} is not allowed in a CIFAR-10 batch")
    return codecs.encode(text, "latin1")


def _pickle_globals() -> dict[tuple[str, str], object]:
    sample = np.zeros(1, np.uint8)
    reconstruct = sample.__reduce__()[0]
    frombuffer = sample.__reduce_ex__(5)[0]
    table: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for prefix in ("numpy.core", "numpy._core"):
        table[(f"{prefix}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{prefix}.numeric", "_frombuffer")] = frombuffer
    return table


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch: numpy arrays, lists and dicts; no other global is resolved."""

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global; refuse every other."""
        found = _pickle_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return found


def _parse_cifar_batch(raw: bytes, where: str) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # a corrupt or hostile pickle: refuse it whatever the reason
        raise DataError(f"{where}: not a CIFAR-10 batch ({err})") from err
    if not isinstance(batch, dict):
        raise DataError(f"{where}: not a CIFAR-10 batch (a {type(batch).__name__})")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3 * 32 * 32
    ):
        raise DataError(
            f"{where}: data must be uint8 (n, 3072), got {getattr(data, 'shape', data)!r}"
        )
    if not isinstance(labels, list | np.ndarray):
        raise DataError(f"{where}: labels must be a list, got {type(labels).__name__}")
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as err:
        raise DataError(f"{where}: labels are not integers ({err})") from err
    if label_array.shape != (data.shape[0],) or not ((label_array >= 0) & (label_array < 10)).all():
        raise DataError(f"{where}: need {data.shape[0]} labels in 0..9, got {label_array.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel planes -> HWC
    return np.ascontiguousarray(images), label_array


@dataclass(frozen=True)
class Cifar10Dataset:
    """CIFAR-10 (32x32 RGB, 10 classes) from its python archive, read without extracting it.

    Parameters
    ----------
    root : str
        Folder that holds ``filename`` (a download goes here).
    sha256 : str
        Expected SHA-256 of the archive; the default is the official archive's.
    download : bool
        Download a missing archive through torchvision when a network is up.
    filename : str
        The archive's name in ``root``.
    """

    root: str
    sha256: str = CIFAR10_SHA256
    download: bool = True
    filename: str = "cifar-10-python.tar.gz"

    def __post_init__(self) -> None:
        _check_path_text("root", self.root)
        object.__setattr__(self, "sha256", _check_sha256_text("sha256", self.sha256))
        _check_flag("download", self.download)
        name = self.filename
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise ValueError(f"filename must be a file name, got {name!r}")

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(32, 32, 3)``."""
        return (32, 32, 3)

    def check(self, split: Split) -> None:
        """The archive is present (downloaded when allowed) and passes its SHA-256 check."""
        _check_split(split)
        self.path()

    def path(self) -> Path:
        """The archive, downloaded when missing (and allowed), after its SHA-256 check."""
        root = Path(self.root).expanduser()
        path = root / self.filename
        if not path.is_file():
            how = (
                f"copy the official cifar-10-python.tar.gz (SHA-256 {CIFAR10_SHA256}) into {root} "
                f"as {self.filename}, or set download: true and run once with a network "
                "(torchvision downloads it)"
            )
            if not self.download:
                raise DataError(f"{path} is missing (downloads are disabled): {how}")
            log.warning("%s is missing: downloading it through torchvision", path)
            try:
                from torchvision.datasets import CIFAR10
                from torchvision.datasets.utils import download_url

                root.mkdir(parents=True, exist_ok=True)
                download_url(CIFAR10.url, str(root), filename=self.filename, md5=CIFAR10.tgz_md5)
            except Exception as err:
                raise DataError(
                    f"{path} is missing and the download failed ({err}): {how}"
                ) from err
        actual = file_sha256(path)
        if actual != self.sha256:
            raise DataError(
                f"{path} fails its SHA-256 check (expected {self.sha256}, got {actual}); delete "
                "it and copy or download the archive again, or set dataset.sha256 to your copy's"
            )
        return path

    def load(self, split: Split) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
        """Return ``(images (n, 32, 32, 3) uint8 RGB, labels (n,) int64 in 0..9)``."""
        wanted = CIFAR10_BATCHES[_check_split(split)]
        path = self.path()
        found: dict[str, tuple[NDArray[np.uint8], NDArray[np.int64]]] = {}
        try:
            with tarfile.open(path, "r:gz") as tar:
                for member in tar:
                    base = PurePosixPath(member.name).name
                    if not member.isfile() or base not in wanted or base in found:
                        continue
                    handle = tar.extractfile(member)
                    if handle is None:
                        continue
                    found[base] = _parse_cifar_batch(handle.read(), f"{path}:{member.name}")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path} is not a readable tar.gz archive ({err})") from err
        missing = [b for b in wanted if b not in found]
        if missing:
            raise DataError(f"{path} lacks the CIFAR-10 batch(es) {missing}")
        images = np.concatenate([found[b][0] for b in wanted])
        labels = np.concatenate([found[b][1] for b in wanted])
        return images, labels

    def fingerprint(self) -> str:
        """The archive's expected SHA-256 identifies both splits (``load`` checks it)."""
        return _digest(
            {"loader": "cifar10-python", "version": LOADER_VERSION, "sha256": self.sha256}
        )


def as_image_dataset(value: object, key: str = "dataset") -> ImageDataset:
    """``value`` as an :class:`ImageDataset`, or a ``ValueError`` naming ``key``."""
    if isinstance(value, IdxDataset | ImageFolderDataset | Cifar10Dataset):
        return value
    raise ValueError(f"config group {key!r} built a {type(value).__name__}, not an image data set")


@dataclass(frozen=True)
class Partition:
    """Which classes each user owns, and how much of each class the user keeps.

    By default user ``i`` owns class ``i`` (the paper's setting). ``classes_per_user = k``
    gives user ``i`` the classes ``i*k ... i*k + k - 1``; ``user_classes`` lists them
    explicitly instead. The natural class imbalance is kept; ``fraction`` maps a user id
    to the fraction of its images it keeps (to study stronger imbalance).

    ``iid`` shards every class across the users instead (each user holds a disjoint
    ``1/num_users`` share of every class). For the adversary experiments, ``extra_classes`` maps a user id to classes whose training
    images that user also trains on (an adversary with access to a victim's images), and
    ``shared_classes`` lets several users claim the same class.

    ``users_per_class = k > 1`` (see :func:`users_per_class_partition`): users ``c*k ...
    c*k + k - 1`` share class ``c``'s images, each holding a disjoint shard (of ``k`` shards,
    or of ``class_shards`` when set: then shards ``k ...`` belong to nobody); the test images of
    the class are sharded the same way, so that they have owners (:func:`owner_shards`).
    """

    num_users: int = 10
    classes_per_user: int = 1
    user_classes: Sequence[Sequence[int]] | None = None
    fraction: Mapping[int, float] = field(default_factory=dict)
    extra_classes: Mapping[int, Sequence[int]] = field(default_factory=dict)
    shared_classes: bool = False
    iid: bool = False
    users_per_class: int = 1
    class_shards: int = 0

    @property
    def shards(self) -> int:
        """Disjoint shards per class (0: a user holds its whole class)."""
        if self.iid:
            return self.num_users
        if self.class_shards:
            return self.class_shards
        return self.users_per_class if self.users_per_class > 1 else 0

    @property
    def sharded_classes(self) -> bool:
        """Users hold shards of their class, and so do the test images (they have owners)."""
        return not self.iid and self.shards > 0

    def assignment(self, num_classes: int) -> dict[int, tuple[int, ...]]:
        """Map each user id to the tuple of classes it owns; validate the layout."""
        if self.iid:
            if self.num_users < 1:
                raise ValueError(f"num_users must be >= 1, got {self.num_users}")
            # Every user holds a disjoint shard of every class.
            return {u: tuple(range(num_classes)) for u in range(self.num_users)}
        if self.user_classes is not None:
            if isinstance(self.user_classes, str) or not isinstance(self.user_classes, Sequence):
                raise ValueError(
                    f"user_classes must be a list of class lists or null, got {self.user_classes!r}"
                )
            table = {
                u: tuple(_int_list("user_classes", cs)) for u, cs in enumerate(self.user_classes)
            }
            if len(table) != self.num_users:
                raise ValueError(
                    f"user_classes lists {len(table)} users but num_users is {self.num_users}"
                )
        else:
            if self.num_users < 1:
                raise ValueError(f"num_users must be >= 1, got {self.num_users}")
            if self.classes_per_user < 1:
                raise ValueError(f"classes_per_user must be >= 1, got {self.classes_per_user}")
            needed = self.num_users * self.classes_per_user
            if needed > num_classes:
                raise ValueError(
                    f"num_users={self.num_users} with classes_per_user={self.classes_per_user} "
                    f"needs {needed} classes, but the data set has {num_classes}"
                )
            k = self.classes_per_user
            table = {u: tuple(range(u * k, (u + 1) * k)) for u in range(self.num_users)}
        if self.users_per_class > 1 or self.class_shards:
            self._check_users_per_class(table)
        seen: set[int] = set()
        for user, classes in table.items():
            if not classes:
                raise ValueError(f"user_classes: user {user} owns no class")
            for c in classes:
                if not 0 <= c < num_classes:
                    raise ValueError(
                        f"user_classes: user {user} -> class {c} is not in 0..{num_classes - 1}"
                    )
                if c in seen and not self.shared_classes:
                    raise ValueError(
                        f"user_classes: class {c} is owned by more than one user "
                        "(shared_classes is false)"
                    )
                seen.add(c)
        for user, extra in self.extra_classes.items():
            if int(user) not in table or any(not 0 <= int(c) < num_classes for c in extra):
                raise ValueError(f"extra_classes: user {user} -> {list(extra)}")
        for user, frac in self.fraction.items():
            if int(user) not in table or not 0.0 < float(frac) <= 1.0:
                raise ValueError(f"fraction: user {user} -> {frac} (need a known user, 0 < f <= 1)")
        return table

    def _check_users_per_class(self, table: Mapping[int, tuple[int, ...]]) -> None:
        """User ``u`` must hold shard ``u % k`` of one class shared with users of the same block."""
        k = check_int("users_per_class", self.users_per_class, 1)
        shards = check_int("class_shards", self.class_shards, 0)
        if shards and shards < k:
            raise ValueError(f"class_shards={shards} must be 0 or >= users_per_class={k}")
        if self.iid or self.fraction or self.extra_classes:
            raise ValueError("users_per_class > 1 excludes iid, fraction and extra_classes")
        if len(table) % k:
            raise ValueError(f"num_users={len(table)} is not a multiple of users_per_class={k}")
        for user, classes in table.items():
            block = table[user - user % k]
            if len(classes) != 1 or classes != block:
                raise ValueError(
                    f"users_per_class={k}: user {user} must own the one class of users "
                    f"{user - user % k}..{user - user % k + k - 1}, got {list(classes)}"
                )


def class_indices(
    labels: NDArray[np.int64], cls: int, fraction: float = 1.0, seed: int = 0
) -> NDArray[np.int64]:
    """Indices of one class, optionally subsampled (at least one image) with a fixed seed."""
    idx = np.flatnonzero(labels == cls)
    if fraction < 1.0:
        keep = max(1, round(fraction * idx.size))
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=keep, replace=False))
    return idx


def adversary_partition(
    num_classes: int = 10, adversaries: Sequence[int] | None = None
) -> Partition:
    """One user per ordered pair (adversary a, victim v), a != v (Fig. 4).

    User ``k`` registers as class ``a`` (its own) with an autoencoder trained on a's and v's
    training images. Users are ordered by adversary, then victim.
    """
    num_classes = check_int("num_classes", num_classes, 2)
    advs = (
        list(range(num_classes)) if adversaries is None else _int_list("adversaries", adversaries)
    )
    if any(a >= num_classes for a in advs):
        raise ValueError(f"adversaries must be classes in 0..{num_classes - 1}, got {advs}")
    pairs = [(a, v) for a in advs for v in range(num_classes) if v != a]
    return Partition(
        num_users=len(pairs),
        user_classes=[[a] for a, _ in pairs],
        extra_classes={k: [v] for k, (_, v) in enumerate(pairs)},
        shared_classes=True,
    )


def imbalance_partition(
    classes: Sequence[int] = (1, 3, 5, 7, 9), fractions: Sequence[float] = (0.01, 0.05, 0.1)
) -> Partition:
    """One user per (fraction, class): the user keeps only that fraction of its class's images."""
    table = [
        (f, c)
        for f in _fraction_list("fractions", fractions)
        for c in _int_list("classes", classes)
    ]
    if not table:
        raise ValueError("classes must not be empty")
    return Partition(
        num_users=len(table),
        user_classes=[[c] for _, c in table],
        fraction={k: f for k, (f, _) in enumerate(table)},
        shared_classes=True,
    )


def derive_seed(seed: int, *keys: int) -> int:
    """A per-client (per-autoencoder) seed derived from the experiment seed."""
    state = np.random.SeedSequence([seed, *(k & 0xFFFFFFFF for k in keys)]).generate_state(1)
    return int(state[0])


def user_class_indices(
    labels: NDArray[np.int64],
    cls: int,
    user: int,
    *,
    seed: int,
    shards: int = 0,
    fraction: float = 1.0,
) -> NDArray[np.int64]:
    """Training indices of one class that ``user`` holds.

    With ``shards > 0`` (IID) the class is split into ``shards`` disjoint shards by one
    permutation shared by every user, and the user holds shard ``user % shards``; with
    ``fraction < 1`` the user keeps that share of its images (at least one), drawn with a
    seed derived from ``seed``, ``user`` and ``cls``.
    """
    idx = class_indices(labels, cls)
    if shards > 0:
        # The same permutation for every user, so the shards are disjoint.
        perm = np.random.default_rng([seed, cls]).permutation(idx)
        idx = np.sort(perm[user % shards :: shards])
    if fraction < 1.0:
        keep = max(1, round(fraction * idx.size))
        rng = np.random.default_rng(derive_seed(seed, user, cls))
        idx = np.sort(rng.choice(idx, size=keep, replace=False))
    return idx


def users_per_class_partition(
    users_per_class: int = 100,
    num_classes: int = 10,
    classes: Sequence[int] | None = None,
    class_shards: int = 0,
) -> Partition:
    """Many users per class: ``users_per_class`` users share each class, a disjoint shard each.

    User ``u`` owns class ``classes[u // users_per_class]`` and holds shard
    ``u % users_per_class`` of its training images (about ``n_c / users_per_class`` images; MNIST
    with 100 users per class: 1,000 users of about 60 images). The class's test images are
    sharded the same way: each has an owner, so that a run measures owner accuracy (the best
    autoencoder is the image's owner's) next to class accuracy.

    Parameters
    ----------
    users_per_class : int
        Users sharing each class (>= 1).
    num_classes : int
        The data set's classes.
    classes : sequence of int, optional
        The classes to share out (default: all ``num_classes``).
    class_shards : int
        Cut each class into this many shards instead of ``users_per_class`` (0): users keep
        their shard's size whatever their number (the scale benchmark: 10, 100 or 1,000
        users of about 60 MNIST images each, with ``class_shards=100``).
    """
    k = check_int("users_per_class", users_per_class, 1)
    n = check_int("num_classes", num_classes, 1)
    chosen = list(range(n)) if classes is None else _int_list("classes", classes)
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"classes must be distinct and non-empty, got {chosen}")
    return Partition(
        num_users=len(chosen) * k,
        user_classes=[[c] for c in chosen for _ in range(k)],
        shared_classes=k > 1,
        users_per_class=k,
        class_shards=check_int("class_shards", class_shards, 0),
    )


def owner_shards(
    labels: NDArray[np.int64],
    assignment: Mapping[int, Sequence[int]],
    shards: int,
    seed: int,
) -> NDArray[np.int64]:
    """The owner (user id) of every image of a split, ``-1`` where no user owns it.

    A class held by one user is that user's; a class sharded between ``shards`` users gives
    each image to the user holding its shard (the same split as the training images: see
    :func:`user_class_indices`). Images of classes nobody registered have no owner.
    """
    owners = np.full(labels.shape[0], -1, dtype=np.int64)
    for user, classes in assignment.items():
        for cls in classes:
            owners[user_class_indices(labels, int(cls), int(user), seed=seed, shards=shards)] = user
    return owners


def random_classes_partition(
    num_users: int = 10, num_classes: int = 40, draw_seed: int = 0
) -> Partition:
    """``num_users`` users, each owning one class drawn at random without replacement.

    The paper's face protocol: 10 people out of the 40 of ORL register, a different draw per
    seed. User ``i`` owns the ``i``-th smallest class drawn.

    Parameters
    ----------
    num_users : int
        Users (and drawn classes); at most ``num_classes``.
    num_classes : int
        Classes to draw from (the data set's).
    draw_seed : int
        Seed of the draw.
    """
    users = check_int("num_users", num_users, 1)
    classes = check_int("num_classes", num_classes, 1)
    seed = check_int("draw_seed", draw_seed, 0)
    if users > classes:
        raise ValueError(f"num_users={users} needs as many classes, but num_classes is {classes}")
    drawn = np.sort(np.random.default_rng(seed).choice(classes, size=users, replace=False))
    return Partition(num_users=users, user_classes=[[int(c)] for c in drawn])


#: Data sets by the name a config's ``_target_`` gives (see :mod:`.registry`).
DATASETS: dict[str, Callable[..., object]] = {
    "docl_flower.core.data.IdxDataset": IdxDataset,
    "docl_flower.core.data.ImageFolderDataset": ImageFolderDataset,
    "docl_flower.core.data.Cifar10Dataset": Cifar10Dataset,
}

#: Partitions (which user owns which classes) by ``_target_`` name.
PARTITIONS: dict[str, Callable[..., Partition]] = {
    "docl_flower.core.data.Partition": Partition,
    "docl_flower.core.data.adversary_partition": adversary_partition,
    "docl_flower.core.data.imbalance_partition": imbalance_partition,
    "docl_flower.core.data.random_classes_partition": random_classes_partition,
    "docl_flower.core.data.users_per_class_partition": users_per_class_partition,
}
