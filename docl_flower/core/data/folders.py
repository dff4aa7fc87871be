"""Image folders: one folder per class or identity, or one folder of unlabelled images.

The ORL faces of ``data/att-faces`` are one. Files are decoded by the isolated decoder
(:mod:`docl_flower.core.data.decode`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from docl_flower.core.common.checks import check_flag, check_int, check_path_text, check_sha256_text
from docl_flower.core.common.files import file_sha256
from docl_flower.core.data.base import LOADER_VERSION, DataError, Split, check_split, content_digest
from docl_flower.core.data.decode import read_image_isolated

log = logging.getLogger(__name__)


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
    :mod:`docl_flower.core.data.decode`, under its byte, pixel and time budgets, so that no file
    can raise anything but :class:`~docl_flower.core.data.decode.ImageReadError`, hang or crash
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
        Seconds the file may take (default :data:`~docl_flower.core.data.decode.DECODE_TIMEOUT_S`).

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
        check_path_text("root", self.root)
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
        check_flag("flat", self.flat)
        if self.sha256 is not None:
            object.__setattr__(self, "sha256", check_sha256_text("sha256", self.sha256))

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
        split = check_split(split)
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
        return content_digest(
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


def holds_photos(folder: Path) -> bool:
    """Whether ``folder`` has image files at its top level (a device's own photos)."""
    try:
        return any(
            p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
            for p in folder.iterdir()
        )
    except OSError:
        return False


@dataclass(frozen=True)
class OwnPhotos:
    """A device's own photos: a flat folder of one user's images, all of class ``label``.

    A real device holds only its user's photos, not a shared archive: every image file in
    ``root`` (recursively, any format :data:`IMAGE_SUFFIXES` names) is a training image of
    ``label``, the class its user registers, converted and resized to ``image_shape`` (that of
    the experiment's data set: ``(H, W)`` grey or ``(H, W, 3)`` RGB). The test split is empty.

    Raises
    ------
    DataError
        From ``load``/``check`` when the folder is missing or holds no readable image (one
        line naming the folder).
    """

    root: str
    image_shape: tuple[int, ...]
    label: int

    def __post_init__(self) -> None:
        check_path_text("root", self.root)
        shape = tuple(check_int("image_shape", s, 1) for s in self.image_shape)
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 3):
            raise ValueError(f"image_shape must be (H, W) or (H, W, 3), got {self.image_shape}")
        object.__setattr__(self, "image_shape", shape)
        check_int("label", self.label, 0)

    def _folder(self) -> ImageFolderDataset:
        mode = "RGB" if len(self.image_shape) == 3 else "L"
        return ImageFolderDataset(self.root, self.image_shape[:2], mode=mode, flat=True)

    def check(self, split: Split) -> None:
        """The folder holds image files (not decoded)."""
        if check_split(split) == "train":
            self._folder().check("test")

    def load(self, split: Split) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
        """The photos as ``label``'s training images; the test split is empty."""
        if check_split(split) == "test":
            return np.zeros((0, *self.image_shape), np.uint8), np.zeros(0, np.int64)
        images, _ = self._folder().load("test")
        if images.shape[0] == 0:
            raise DataError(f"{Path(self.root).expanduser()}: no readable photo (all skipped)")
        return images, np.full(images.shape[0], self.label, dtype=np.int64)

    def fingerprint(self) -> str:
        """Content hash of the photos, their shape and label."""
        return content_digest(
            {
                "loader": "own_photos",
                "version": LOADER_VERSION,
                "files": self._folder().fingerprint(),
                "label": self.label,
            }
        )
