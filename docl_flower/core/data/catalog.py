"""Every image data set by the name a config's ``_target_`` gives, and the check of a built one."""

from __future__ import annotations

from collections.abc import Callable

from docl_flower.core.data.base import ImageDataset
from docl_flower.core.data.cifar import Cifar10Dataset
from docl_flower.core.data.folders import ImageFolderDataset
from docl_flower.core.data.idx import IdxDataset


def as_image_dataset(value: object, key: str = "dataset") -> ImageDataset:
    """``value`` as an :class:`ImageDataset`, or a ``ValueError`` naming ``key``."""
    if isinstance(value, IdxDataset | ImageFolderDataset | Cifar10Dataset):
        return value
    raise ValueError(f"config group {key!r} built a {type(value).__name__}, not an image data set")


#: Data sets by the name a config's ``_target_`` gives (see :mod:`.registry`).
DATASETS: dict[str, Callable[..., object]] = {
    "docl_flower.core.data.IdxDataset": IdxDataset,
    "docl_flower.core.data.ImageFolderDataset": ImageFolderDataset,
    "docl_flower.core.data.Cifar10Dataset": Cifar10Dataset,
}
