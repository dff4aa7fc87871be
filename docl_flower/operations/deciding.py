"""A saved filter loaded once, and block-or-share decisions: ``filter check`` and ``serve``.

:func:`load` reads a filter folder (digest and HMAC verified by
:func:`~docl_flower.core.filter.store.load_filter`), builds its feature extractor, its Guard and
its :class:`~docl_flower.core.filter.global_filter.GlobalFilter`, and returns an immutable
:class:`LoadedFilter`. :func:`decide` scores images with it and applies the Guard.

An image's decision and score do not depend on the other images it is decided with: the upload
service (``docl-flower filter serve``) scores requests in batches of whatever size arrives, and
its scores are bit-identical to those of ``docl-flower filter check`` on the same files. Two
code paths would otherwise differ in the last bits with the number of images: the fused kernel
scores up to ``GlobalFilter.ROWS_MAX`` images one at a time (vectorised over features) and more
in tiles (vectorised over images), and the BLAS behind the PyTorch kernel takes other routes for
a handful of rows. So :func:`scores_of` scores in blocks of at least :data:`MIN_ROWS` rows
(zero rows added, their scores dropped) and at most ``chunk_images``; and a CNN extractor, which
runs in batches of its ``batch_size``, gets zero images added up to whole batches (a lone image
then costs a whole batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from safetensors import SafetensorError

from docl_flower.core.features.extractors import FeatureExtractor
from docl_flower.core.filter.global_filter import GUARDS, GlobalFilter, Guard, Registration
from docl_flower.core.filter.probe import record_problem
from docl_flower.core.filter.store import load_filter
from docl_flower.core.pipeline.components import build

#: Fewest rows scored in one call (a tile of the fused kernel, above ``GlobalFilter.ROWS_MAX``).
MIN_ROWS = 16

#: What :func:`load` reads a filter folder with: ``(registrations, filter.json)``.
Reader = Callable[[Path], tuple[list[Registration], dict[str, Any]]]


class FilterError(Exception):
    """The filter folder cannot be used (the message names the folder)."""


def one_line(err: BaseException) -> str:
    """``err`` as one line (its class name when it says nothing)."""
    return " ".join(str(err).split()) or type(err).__name__


def saved_alpha(meta: object, guard_name: str, sided: str) -> float | None:
    """The alpha the run calibrated for this Guard rule (``guard.target_acceptance``), if any."""
    cal = meta.get("calibration") if isinstance(meta, dict) else None
    if not isinstance(cal, dict) or (cal.get("guard"), cal.get("sided")) != (guard_name, sided):
        return None
    alpha = cal.get("alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise ValueError(f"calibration alpha must be a number, got {alpha!r}")
    return float(alpha)


@dataclass(frozen=True)
class LoadedFilter:
    """A verified saved filter, ready to decide; never changed (a reload builds another).

    Attributes
    ----------
    folder : Path
        Where it was read from.
    registrations : tuple of Registration
        The autoencoders, in filter order (column order of the scores).
    filter : GlobalFilter
        The stacked autoencoders.
    features : FeatureExtractor
        The extractor the run used (``config.features``).
    extractor : str
        Its ``_target_`` in the run's config.
    guard, guard_name : Guard, str
        The Guard rule (``"paper"`` or ``"strict"``) at :attr:`alpha`.
    alpha, max_alpha : float
        The Guard's alpha; the loosest one the filter allows (its uploads were checked for
        what a Guard up to that alpha can block).
    image_shape : tuple of int or None
        ``dataset.image_shape`` of the run (None when the config has none).
    version : str
        SHA-256 digest of ``filter.json`` (its ``integrity.sha256``).
    users, classes : tuple of int
        Registered user ids and classes, sorted.
    probes : tuple
        Per registration, the probe check record the run saved with it (``None`` when the
        entry has none; see :func:`~docl_flower.core.filter.probe.record_problem`).
    """

    folder: Path
    registrations: tuple[Registration, ...]
    filter: GlobalFilter
    features: FeatureExtractor
    extractor: str
    guard: Guard
    guard_name: str
    alpha: float
    max_alpha: float
    image_shape: tuple[int, ...] | None
    version: str
    users: tuple[int, ...]
    classes: tuple[int, ...]
    probes: tuple[object, ...] = ()

    @property
    def size(self) -> int:
        """Number of registered autoencoders."""
        return len(self.registrations)


def unvouched(loaded: LoadedFilter, max_block_share: float) -> list[str]:
    """The autoencoders of ``loaded`` whose saved probe record does not vouch for them.

    Each must carry the record of a probe check that judged the region any Guard up to the
    served alpha can block, with shares of at most ``max_block_share``; one line per failure,
    naming the user and class.
    """
    out = []
    for reg, record in zip(loaded.registrations, loaded.probes, strict=True):
        problem = record_problem(record, max_block_share, loaded.alpha)
        if problem is not None:
            out.append(f"user {reg.user_id} class {reg.label}: {problem}")
    return out


def _image_shape(config: dict[str, Any]) -> tuple[int, ...] | None:
    dataset = config.get("dataset")
    raw = dataset.get("image_shape") if isinstance(dataset, dict) else None
    if isinstance(raw, list) and len(raw) in (2, 3):
        sides = [s for s in raw if isinstance(s, int) and not isinstance(s, bool) and s > 0]
        if len(sides) == len(raw):
            return tuple(sides)
    return None


def load(
    folder: Path,
    guard_name: str = "paper",
    alpha: float | None = None,
    *,
    read: Reader = load_filter,
) -> LoadedFilter:
    """Read, verify and prepare the filter in ``folder``.

    Parameters
    ----------
    folder : Path
        A filter folder written by a run.
    guard_name : str
        A key of :data:`~docl_flower.core.filter.global_filter.GUARDS`.
    alpha : float, optional
        The Guard's alpha (default: the one the run calibrated for this rule, else the one it
        was run with).
    read : callable
        Reads and verifies the folder (default
        :func:`~docl_flower.core.filter.store.load_filter`).

    Raises
    ------
    FilterError
        The folder holds no readable, verified filter, no usable extractor or guard, or
        ``alpha`` is above the filter's ``max_alpha`` (one line that names the folder).
    ValueError
        The filter holds no autoencoder, or autoencoders of different shapes.
    """
    try:
        regs, meta = read(folder)
    except FileNotFoundError as err:
        raise FilterError(f"{folder}: not a saved filter ({err.filename} is missing)") from err
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        text = one_line(err).removeprefix(f"{folder}: ")
        raise FilterError(f"{folder}: cannot read the filter ({text})") from err
    config = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(config, dict):
        config = {}
    try:
        features = build("features", config["features"])
    except (KeyError, TypeError, ValueError) as err:
        raise FilterError(f"{folder}: no usable extractor ({one_line(err)})") from err
    if not isinstance(features, FeatureExtractor):
        raise FilterError(f"{folder}: not a feature extractor")
    try:
        guard_cfg = config.get("guard", {})
        guard_cfg = guard_cfg if isinstance(guard_cfg, dict) else {}
        sided = str(guard_cfg.get("sided", "two"))
        if alpha is None:
            alpha = saved_alpha(meta, guard_name, sided)
        if alpha is None:
            alpha = float(guard_cfg.get("alpha", 1.5))
        guard = GUARDS[guard_name](alpha, sided)
        # The loosest alpha whose blocking region the upload check judged (a filter saved
        # before max_alpha existed was judged at its own alpha only).
        limit = float(guard_cfg.get("max_alpha") or guard_cfg.get("alpha") or 1.5)
    except (TypeError, ValueError) as err:
        raise FilterError(f"{folder}: the filter's guard {one_line(err)}") from err
    if not alpha <= limit:
        raise FilterError(
            f"{folder}: alpha {alpha:g} is looser than this filter allows (max_alpha "
            f"{limit:g}: its uploads were checked for what a Guard up to that alpha can block)"
        )
    flt = GlobalFilter(regs)
    entries = meta.get("entries") if isinstance(meta, dict) else None
    if not isinstance(entries, list) or len(entries) != len(regs):
        entries = [None] * len(regs)  # (the store's reader returns one per entry, in order)
    probes = tuple(e.get("probe") if isinstance(e, dict) else None for e in entries)
    integrity = meta.get("integrity") if isinstance(meta, dict) else None
    version = integrity.get("sha256") if isinstance(integrity, dict) else None
    target = config["features"].get("_target_") if isinstance(config["features"], dict) else None
    return LoadedFilter(
        folder=folder,
        registrations=tuple(regs),
        filter=flt,
        features=features,
        extractor=str(target or type(features).__name__),
        guard=guard,
        guard_name=guard_name,
        alpha=alpha,
        max_alpha=limit,
        image_shape=_image_shape(config),
        version=str(version or ""),
        users=tuple(sorted({r.user_id for r in regs})),
        classes=tuple(sorted({r.label for r in regs})),
        probes=probes,
    )


@dataclass(frozen=True)
class Decision:
    """One image's decision.

    Attributes
    ----------
    block : bool
        Whether the Guard blocks the upload.
    owner, label : int
        User and class of the best autoencoder ``i*``.
    score : float
        ``d_{i*}`` (float32 value).
    low, high : float
        That autoencoder's privacy interval at the Guard's alpha (``low`` is ``-inf`` for a
        one-sided Guard).
    """

    block: bool
    owner: int
    label: int
    score: float
    low: float
    high: float

    @property
    def decision(self) -> str:
        """``"block"`` or ``"share"``."""
        return "block" if self.block else "share"


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows added up to ``rows`` rows."""
    if x.shape[0] >= rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def features_of(loaded: LoadedFilter, images: NDArray[np.uint8]) -> torch.Tensor:
    """Features of ``images`` (``(n, H, W)`` or ``(n, H, W, 3)``), each row as if alone.

    An extractor with a ``batch_size`` (the CNNs) gets zero images added up to whole batches.
    """
    n = images.shape[0]
    batch = getattr(loaded.features, "batch_size", None)
    if isinstance(batch, int) and batch > 1 and n % batch:
        fill = np.zeros((batch - n % batch, *images.shape[1:]), dtype=images.dtype)
        return loaded.features(np.concatenate([images, fill]))[:n]
    return loaded.features(images)


def scores_of(loaded: LoadedFilter, features: torch.Tensor) -> torch.Tensor:
    """Scores ``(n, N)`` of feature rows, each row's the same whatever the others are.

    Raises ``ValueError`` for features of another dimension than the filter's.
    """
    flt = loaded.filter
    n = features.shape[0]
    if features.ndim != 2 or features.shape[1] != flt.dim:
        raise ValueError(f"features must be (n, {flt.dim}), got {tuple(features.shape)}")
    step = max(MIN_ROWS, flt.scoring.chunk_images)
    parts = [
        flt.scores(_padded(features[i : i + step], MIN_ROWS))[: min(step, n - i)]
        for i in range(0, n, step)
    ]
    return torch.cat(parts) if parts else torch.empty(0, flt.size)


def decide(
    loaded: LoadedFilter, images: NDArray[np.uint8], uploader: int | Sequence[int]
) -> list[Decision]:
    """Block or share each of ``images`` uploaded by ``uploader`` (one id, or one per image).

    ``images`` are stacked as the filter's data set holds them (see ``check.load_image``).
    Raises ``ValueError`` when their features do not fit the filter (another image size).
    """
    n = images.shape[0]
    if n == 0:
        return []
    scores = scores_of(loaded, features_of(loaded, images))
    who: torch.Tensor | int
    if isinstance(uploader, int):
        who = uploader
    else:
        if len(uploader) != n:
            raise ValueError(f"{len(uploader)} uploaders for {n} images")
        who = torch.tensor(list(uploader), dtype=torch.int64)
    flt, alpha, two = loaded.filter, loaded.alpha, loaded.guard.sided == "two"
    idx, dmin = flt.predict(scores)
    block = loaded.guard.block(flt, scores, who)
    out = []
    for i, d, b in zip(idx.tolist(), dmin.tolist(), block.tolist(), strict=True):
        reg = loaded.registrations[i]
        high = reg.err_mean + alpha * reg.err_std
        low = reg.err_mean - alpha * reg.err_std if two else -math.inf
        out.append(Decision(bool(b), reg.user_id, reg.label, d, low, high))
    return out
