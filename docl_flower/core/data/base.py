"""What every image data set offers (:class:`ImageDataset`), its errors, and the per-process cache.

Every data set implements :class:`ImageDataset`: ``load(split)`` returns ``(images, labels)``,
``image_shape`` is the shape of one image and ``fingerprint()`` is a content hash of what
``load`` returns for both splits (a feature-cache key). No Flower here: plain numpy.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal, Protocol

import numpy as np
from numpy.typing import NDArray

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")

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


def content_digest(obj: object) -> str:
    """SHA-256 of ``obj`` as canonical JSON (a data set's fingerprint of its loader settings)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_split(split: object) -> Split:
    """``split`` as a :data:`Split`, or a ``ValueError``."""
    if split == "train":
        return "train"
    if split == "test":
        return "test"
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
