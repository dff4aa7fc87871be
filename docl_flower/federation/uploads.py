"""Validation of one upload: any reply content ends as registrations or an ``UploadError``.

A pure function of the reply's content (:func:`parse_upload`), testable on fake replies
without Flower running. Nothing in a reply is trusted: every metric is type- and
range-checked (no ``int(inf)``, no truncation of ``0.9`` to class 0), every array is
shape-, dtype- and value-checked before it is used, and anything unexpected in the content
(an unreadable array, a value of a foreign type) becomes an ``UploadError`` with the reason,
never another exception.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from docl_flower.core.filter.global_filter import Registration
from docl_flower.core.training.autoencoder import PARAM_NAMES, AutoencoderSpec

from . import keys

log = logging.getLogger(__name__)

#: Largest ``num-examples`` accepted (more images than any user can hold).
MAX_EXAMPLES = 10**9


#: The largest squared difference of one feature and its reconstruction, both in [0, 1].
MAX_SQUARED_DIFFERENCE = 1.0


class UploadError(ValueError):
    """An upload that cannot be registered; the message is the reason."""


@dataclass(frozen=True)
class UploadRules:
    """What a valid upload looks like.

    Parameters
    ----------
    shapes : mapping
        Expected shape of each of the four tensors of one autoencoder.
    max_error : float
        Upper bound of any reconstruction error: D for features in [0, 1] (eq. 6).
    min_std : float
        Smallest acceptable sigma (a degenerate interval would block nothing or everything).
    max_abs_param : float
        Largest absolute parameter value. Trained autoencoders stay far below it (under 5 on
        MNIST); with it every intermediate of the scoring stays finite in float32 for
        features in [0, 1] (``3e38`` weights would overflow to NaN).
    """

    shapes: Mapping[str, tuple[int, ...]]
    max_error: float
    min_std: float = 1e-6
    max_abs_param: float = 1e3

    @classmethod
    def for_autoencoder(cls, spec: AutoencoderSpec, dim: int) -> UploadRules:
        """The rules of ``spec``'s autoencoders on ``dim`` features.

        Features and the decoder's sigmoid output both lie in [0, 1], so each of the ``dim``
        squared differences of eq. 6 is at most :data:`MAX_SQUARED_DIFFERENCE`: no honest
        ``mu`` or ``sigma`` exceeds ``dim`` times it.
        """
        return cls(shapes=spec.shapes(dim), max_error=dim * MAX_SQUARED_DIFFERENCE)


def records(content: object, kind: str) -> Mapping[str, object]:
    """``content.metric_records`` / ``content.array_records`` as a mapping (empty if absent)."""
    found = getattr(content, kind, None)
    return found if isinstance(found, Mapping) else {}


def record_bytes(content: object) -> int:
    """Parameter bytes (elements x item size) of every ArrayRecord of a content (0: unreadable)."""
    total = 0
    try:
        for rec in records(content, "array_records").values():
            if not isinstance(rec, Mapping):
                continue
            for arr in rec.values():
                size = int(np.prod([int(d) for d in arr.shape], dtype=np.int64))
                total += size * np.dtype(arr.dtype).itemsize
    except Exception:
        return 0
    return total


def as_int(value: object, what: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int: an int, or a finite float with no fractional part, within bounds."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise UploadError(f"{what} {value!r} is not a number")
    if isinstance(value, float | np.floating) and not (
        math.isfinite(value) and float(value).is_integer()
    ):
        raise UploadError(f"{what} {value!r} is not an integer")
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise UploadError(f"{what} {number} outside [{low}, {high}]")
    return number


def as_float(value: object, what: str) -> float:
    """``value`` as a finite float (ints allowed, bools and other types refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise UploadError(f"{what} {value!r} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise UploadError(f"{what} {number} is not finite")
    return number


def as_list(value: object) -> list[object]:
    """A metric value as a list (a scalar becomes a one-element list)."""
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def as_array(arrays: Mapping[str, object], key: str, shape: tuple[int, ...]) -> NDArray[np.float32]:
    """The float32 array ``key`` of an ArrayRecord, checked: declared and real shape, dtype."""
    try:
        arr = arrays[key]
        declared = tuple(int(d) for d in getattr(arr, "shape"))  # noqa: B009
        if declared != tuple(shape):
            raise UploadError(f"{key}: shape {declared}, need {tuple(shape)}")
        value = getattr(arr, "numpy")()  # noqa: B009
    except UploadError:
        raise
    except Exception as err:
        raise UploadError(f"{key}: unreadable array ({type(err).__name__}: {err})") from err
    if not isinstance(value, np.ndarray):
        raise UploadError(f"{key}: not an array ({type(value).__name__})")
    if value.dtype != np.float32:
        raise UploadError(f"{key}: dtype {value.dtype}, need float32")
    if value.shape != tuple(shape):
        raise UploadError(f"{key}: data of shape {value.shape}, need {tuple(shape)}")
    return value


@dataclass(frozen=True)
class UploadHeader:
    """The checked metrics of an upload and its arrays (not yet read)."""

    user: int
    classes: list[int]
    means: list[float]
    stds: list[float]
    counts: list[int]
    arrays: Mapping[str, object]


def read_header(
    content: object,
    assignment: Mapping[int, tuple[int, ...]],
    mean_key: str,
    std_key: str,
    tensor_names: Sequence[str],
) -> UploadHeader:
    """Check an upload's records, metrics and array names (shared by every kind of upload).

    ``mean_key`` and ``std_key`` name the per-class statistics (DOCL: ``err-mean``,
    ``err-std``); every class must come with exactly the arrays ``tensor_names``.
    Raises :class:`UploadError` with the reason; no other exception leaves it.
    """
    metrics = records(content, "metric_records").get(keys.METRICS_RECORD)
    if not isinstance(metrics, Mapping):
        raise UploadError(f"no MetricRecord {keys.METRICS_RECORD!r}")
    arrays = records(content, "array_records").get(keys.ARRAYS_RECORD)
    if not isinstance(arrays, Mapping):
        raise UploadError(f"no ArrayRecord {keys.ARRAYS_RECORD!r}")
    try:
        values = {str(k): metrics[k] for k in metrics}
        array_keys = {str(k) for k in arrays}
    except Exception as err:
        raise UploadError(f"unreadable records ({type(err).__name__}: {err})") from err
    for key in (keys.USER_ID, keys.CLASSES, mean_key, std_key, keys.NUM_EXAMPLES):
        if key not in values:
            raise UploadError(f"metric {key!r} missing")
    user = as_int(values[keys.USER_ID], "user id")
    if user not in assignment:
        raise UploadError(f"user id {user} is not an expected user")
    classes = [as_int(c, "class") for c in as_list(values[keys.CLASSES])]
    if len(set(classes)) != len(classes) or sorted(classes) != sorted(assignment[user]):
        raise UploadError(f"user {user} uploaded classes {classes}, owns {list(assignment[user])}")
    means = [as_float(v, mean_key) for v in as_list(values[mean_key])]
    stds = [as_float(v, std_key) for v in as_list(values[std_key])]
    counts = [
        as_int(v, "num-examples", 1, MAX_EXAMPLES) for v in as_list(values[keys.NUM_EXAMPLES])
    ]
    if not len(means) == len(stds) == len(counts) == len(classes):
        raise UploadError(f"{mean_key}, {std_key}, num-examples and classes differ in length")
    if keys.TRAIN_SECONDS in values:
        seconds = as_float(values[keys.TRAIN_SECONDS], "train-seconds")
        if seconds < 0:
            raise UploadError(f"train-seconds {seconds} is negative")
    if keys.RECEIVED_ARRAYS in values:
        as_int(values[keys.RECEIVED_ARRAYS], "received-array-records", 0)
    if keys.DEVICE_CUDA in values:
        as_int(values[keys.DEVICE_CUDA], "device-cuda", 0, 1)
    read_dp(values)
    expected_keys = {f"{c}{keys.ARRAY_KEY_SEP}{n}" for c in classes for n in tensor_names}
    if array_keys != expected_keys:
        extra = sorted(array_keys - expected_keys)
        missing = sorted(expected_keys - array_keys)
        raise UploadError(f"array keys differ: missing {missing}, unexpected {extra}")
    return UploadHeader(user, classes, means, stds, counts, arrays)


def read_dp(values: Mapping[str, object]) -> dict[str, float] | None:
    """The differential-privacy metrics of an upload's metrics, checked; ``None`` if absent.

    All of :data:`keys.DP_KEYS` or none; each a finite number ``>= 0``, ``dp-delta`` below 1.
    Returns ``{"epsilon", "delta", "noise_multiplier"}``. Raises :class:`UploadError`.
    """
    present = [k for k in keys.DP_KEYS if k in values]
    if not present:
        return None
    if len(present) != len(keys.DP_KEYS):
        missing = [k for k in keys.DP_KEYS if k not in values]
        raise UploadError(f"differential-privacy metrics incomplete: {missing} missing")
    found = {k: as_float(values[k], k) for k in keys.DP_KEYS}
    for key, number in found.items():
        if number < 0:
            raise UploadError(f"{key} {number} is negative")
    if found[keys.DP_DELTA] >= 1:
        raise UploadError(f"{keys.DP_DELTA} {found[keys.DP_DELTA]} is not below 1")
    return {
        "epsilon": found[keys.DP_EPSILON],
        "delta": found[keys.DP_DELTA],
        "noise_multiplier": found[keys.DP_NOISE_MULTIPLIER],
    }


def dp_metrics(content: object) -> dict[str, float] | None:
    """:func:`read_dp` of a reply's content (``None`` without a MetricRecord)."""
    metrics = records(content, "metric_records").get(keys.METRICS_RECORD)
    if not isinstance(metrics, Mapping):
        return None
    try:
        values = {str(k): metrics[k] for k in metrics}
    except Exception as err:
        raise UploadError(f"unreadable records ({type(err).__name__}: {err})") from err
    return read_dp(values)


def parse_upload(
    content: object,
    assignment: Mapping[int, tuple[int, ...]],
    rules: UploadRules,
) -> tuple[int, list[Registration]]:
    """Validate one reply's content and turn it into registrations.

    Raises
    ------
    UploadError
        With the reason, for a missing record or key, a user id that is not expected, classes
        that are not the user's, a wrong shape or dtype, a non-finite or out-of-range value,
        or error statistics outside ``0 <= mu <= max_error`` and
        ``min_std <= sigma <= max_error``. No other exception leaves this function.
    """
    head = read_header(content, assignment, keys.ERR_MEAN, keys.ERR_STD, PARAM_NAMES)
    user, classes, means, stds, counts = head.user, head.classes, head.means, head.stds, head.counts
    arrays = head.arrays
    registrations = []
    for c, mu, sd, n in zip(classes, means, stds, counts, strict=True):
        params: dict[str, NDArray[np.float32]] = {}
        for name in PARAM_NAMES:
            key = f"{c}{keys.ARRAY_KEY_SEP}{name}"
            value = as_array(arrays, key, tuple(rules.shapes[name]))
            if not np.isfinite(value).all():
                raise UploadError(f"class {c} {name}: non-finite values")
            biggest = float(np.abs(value).max(initial=0.0))
            if biggest > rules.max_abs_param:
                raise UploadError(
                    f"class {c} {name}: |value| up to {biggest:.3g}, above {rules.max_abs_param:g}"
                )
            params[name] = value
        if not 0.0 <= mu <= rules.max_error:
            raise UploadError(f"class {c}: err-mean {mu} outside [0, {rules.max_error}]")
        if not rules.min_std <= sd <= rules.max_error:
            raise UploadError(
                f"class {c}: err-std {sd} outside [{rules.min_std}, {rules.max_error}]"
            )
        registrations.append(Registration(user, c, params, mu, sd, n))
    return user, registrations


def optional_metrics(content: object) -> dict[str, float]:
    """The informational metrics of an upload :func:`parse_upload` accepted (else ``{}``)."""
    metrics = records(content, "metric_records").get(keys.METRICS_RECORD)
    if not isinstance(metrics, Mapping):
        return {}
    found = {}
    for key in (keys.TRAIN_SECONDS, keys.RECEIVED_ARRAYS, keys.DEVICE_CUDA):
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            found[key] = float(value)
    return found
