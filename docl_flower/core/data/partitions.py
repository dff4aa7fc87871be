"""The per-user partitions of the paper: which classes each user owns and which rows it keeps."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from docl_flower.core.common.checks import check_fraction_list, check_int, check_int_list
from docl_flower.core.data.seeds import derive_seed


@dataclass(frozen=True)
class Partition:
    """Which classes each user owns, and how much of each class the user keeps.

    By default user ``i`` owns class ``i`` (the paper's setting). ``classes_per_user = k``
    gives user ``i`` the classes ``i*k ... i*k + k - 1``; ``user_classes`` lists them
    explicitly instead. The natural class imbalance is kept; ``fraction`` maps a user id
    to the fraction of its images it keeps (to study stronger imbalance).

    ``iid`` shards every class across the users instead (each user holds a disjoint
    ``1/num_users`` share of every class). For the adversary experiments, ``extra_classes``
    maps a user id to classes whose training images that user also trains on (an adversary with
    access to a victim's images), and ``shared_classes`` lets several users claim the same class.

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
                u: tuple(check_int_list("user_classes", cs))
                for u, cs in enumerate(self.user_classes)
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
        list(range(num_classes))
        if adversaries is None
        else check_int_list("adversaries", adversaries)
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
        for f in check_fraction_list("fractions", fractions)
        for c in check_int_list("classes", classes)
    ]
    if not table:
        raise ValueError("classes must not be empty")
    return Partition(
        num_users=len(table),
        user_classes=[[c] for _, c in table],
        fraction={k: f for k, (f, _) in enumerate(table)},
        shared_classes=True,
    )


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
    chosen = list(range(n)) if classes is None else check_int_list("classes", classes)
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


#: Partitions (which user owns which classes) by ``_target_`` name.
PARTITIONS: dict[str, Callable[..., Partition]] = {
    "docl_flower.core.data.Partition": Partition,
    "docl_flower.core.data.adversary_partition": adversary_partition,
    "docl_flower.core.data.imbalance_partition": imbalance_partition,
    "docl_flower.core.data.random_classes_partition": random_classes_partition,
    "docl_flower.core.data.users_per_class_partition": users_per_class_partition,
}
