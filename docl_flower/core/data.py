"""Data sets as uint8 arrays, checked by SHA-256, and the per-user partitions of the paper.

No Flower here: everything is plain numpy so that the core is testable without a simulation.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray

log = logging.getLogger(__name__)

Split = Literal["train", "test"]

#: File names of the standard IDX archives, per split.
IDX_FILES: dict[Split, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: SHA-256 of the published archives (the same files torchvision downloads).
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


class DataError(RuntimeError):
    """A data file is missing, corrupt, or cannot be downloaded."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_idx(path: Path) -> NDArray[np.uint8]:
    """Parse a gzip-compressed IDX file (images: 3 dims, labels: 1 dim)."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def _download(name: str, root: Path, filename: str) -> None:
    """Fetch a missing archive through torchvision (needs a network)."""
    from torchvision import datasets  # local import: only needed on this rare path

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}.get(name)
    if cls is None:
        raise DataError(f"no download source for data set {name!r}")
    tmp = root / "_download"
    try:
        cls(str(tmp), train=filename.startswith("train"), download=True)
    except Exception as err:
        raise DataError(
            f"{root / filename} is missing and could not be downloaded ({err}). "
            f"Copy the standard IDX archive {filename} into {root} (the repository ships "
            "them in data/), or run once with a network."
        ) from err
    found = next(tmp.rglob(filename), None)
    if found is None:
        raise DataError(f"torchvision downloaded {name} but {filename} is not among its files")
    shutil.move(str(found), root / filename)
    shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class IdxDataset:
    """An MNIST-style data set of 28x28 grey images stored as gzip IDX archives.

    Parameters
    ----------
    name : str
        ``"mnist"`` or ``"fashion-mnist"``; selects the known checksums.
    root : str
        Folder that holds the archives.
    verify : bool
        Check each archive's SHA-256 before parsing it.
    download : bool
        Download a missing archive through torchvision when a network is up.
    """

    name: str
    root: str
    verify: bool = True
    download: bool = True

    def path(self, filename: str) -> Path:
        """Return the path of one archive, fetching and verifying it first."""
        root = Path(self.root).expanduser()
        path = root / filename
        if not path.is_file():
            if not self.download:
                raise DataError(f"{path} is missing (downloads are disabled)")
            root.mkdir(parents=True, exist_ok=True)
            log.warning("%s is missing: downloading it through torchvision", path)
            _download(self.name, root, filename)
        expected = KNOWN_SHA256.get(self.name, {}).get(filename)
        if self.verify and expected is not None and _sha256(path) != expected:
            raise DataError(
                f"{path} fails its SHA-256 check (expected {expected}); "
                "delete it and copy or download it again"
            )
        return path

    def load(self, split: Split) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
        """Return ``(images (n, 28, 28) uint8, labels (n,) int64)`` of one split."""
        images_file, labels_file = IDX_FILES[split]
        images = _read_idx(self.path(images_file))
        labels = _read_idx(self.path(labels_file)).astype(np.int64)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{self.name}/{split}: {images.shape[0]} images, {labels.shape[0]} labels"
            )
        return images, labels


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
    """

    num_users: int = 10
    classes_per_user: int = 1
    user_classes: Sequence[Sequence[int]] | None = None
    fraction: Mapping[int, float] = field(default_factory=dict)
    extra_classes: Mapping[int, Sequence[int]] = field(default_factory=dict)
    shared_classes: bool = False
    iid: bool = False

    def assignment(self, num_classes: int) -> dict[int, tuple[int, ...]]:
        """Map each user id to the tuple of classes it owns; validate the layout."""
        if self.iid:
            if self.num_users < 1:
                raise ValueError(f"num_users must be >= 1, got {self.num_users}")
            # Every user holds a disjoint shard of every class.
            return {u: tuple(range(num_classes)) for u in range(self.num_users)}
        if self.user_classes is not None:
            table = {u: tuple(int(c) for c in cs) for u, cs in enumerate(self.user_classes)}
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
    advs = list(range(num_classes)) if adversaries is None else [int(a) for a in adversaries]
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
    table = [(float(f), int(c)) for f in fractions for c in classes]
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


#: Data sets by the name a config's ``_target_`` gives (see :mod:`.registry`).
DATASETS: dict[str, Callable[..., object]] = {"docl_flower.core.data.IdxDataset": IdxDataset}

#: Partitions (which user owns which classes) by ``_target_`` name.
PARTITIONS: dict[str, Callable[..., Partition]] = {
    "docl_flower.core.data.Partition": Partition,
    "docl_flower.core.data.adversary_partition": adversary_partition,
    "docl_flower.core.data.imbalance_partition": imbalance_partition,
}
