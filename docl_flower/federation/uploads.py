"""Validation of one upload (a pure function, testable on fake replies without Flower running)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from ..core.filter import Registration
from ..core.model import PARAM_NAMES
from . import keys

log = logging.getLogger(__name__)


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
    """

    shapes: Mapping[str, tuple[int, ...]]
    max_error: float
    min_std: float = 1e-6


def record_bytes(content: RecordDict) -> int:
    """Parameter bytes (array elements x item size) of all ArrayRecords in a message's content."""
    return sum(
        int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
        for rec in content.array_records.values()
        for arr in rec.values()
    )


def parse_upload(
    content: RecordDict,
    assignment: Mapping[int, tuple[int, ...]],
    rules: UploadRules,
) -> tuple[int, list[Registration]]:
    """Validate one reply's content and turn it into registrations.

    Raises
    ------
    UploadError
        With the reason, for a missing record or key, a user id that is not expected, classes
        that are not the user's, a wrong shape or dtype, a non-finite value, or error
        statistics outside ``0 <= mu <= max_error`` and ``min_std <= sigma <= max_error``.
    """
    if keys.METRICS_RECORD not in content.metric_records:
        raise UploadError(f"no MetricRecord {keys.METRICS_RECORD!r}")
    if keys.ARRAYS_RECORD not in content.array_records:
        raise UploadError(f"no ArrayRecord {keys.ARRAYS_RECORD!r}")
    metrics = content.metric_records[keys.METRICS_RECORD]
    arrays = content.array_records[keys.ARRAYS_RECORD]
    for key in (keys.USER_ID, keys.CLASSES, keys.ERR_MEAN, keys.ERR_STD, keys.NUM_EXAMPLES):
        if key not in metrics:
            raise UploadError(f"metric {key!r} missing")
    raw_user = metrics[keys.USER_ID]
    if not isinstance(raw_user, int | float) or raw_user != int(raw_user):
        raise UploadError(f"user id {raw_user!r} is not an integer")
    user = int(raw_user)
    if user not in assignment:
        raise UploadError(f"user id {user} is not an expected user")

    def as_list(key: str) -> list[float]:
        value = metrics[key]
        return [float(v) for v in (value if isinstance(value, list) else [value])]

    classes = [int(c) for c in as_list(keys.CLASSES)]
    if sorted(classes) != sorted(assignment[user]):
        raise UploadError(f"user {user} uploaded classes {classes}, owns {list(assignment[user])}")
    means, stds, counts = as_list(keys.ERR_MEAN), as_list(keys.ERR_STD), as_list(keys.NUM_EXAMPLES)
    if not len(means) == len(stds) == len(counts) == len(classes):
        raise UploadError("err-mean, err-std, num-examples and classes differ in length")
    expected_keys = {f"{c}{keys.ARRAY_KEY_SEP}{n}" for c in classes for n in PARAM_NAMES}
    if set(arrays.keys()) != expected_keys:
        extra = sorted(set(arrays.keys()) - expected_keys)
        missing = sorted(expected_keys - set(arrays.keys()))
        raise UploadError(f"array keys differ: missing {missing}, unexpected {extra}")
    registrations = []
    for c, mu, sd, n in zip(classes, means, stds, counts, strict=True):
        params: dict[str, np.ndarray] = {}
        for name in PARAM_NAMES:
            arr = arrays[f"{c}{keys.ARRAY_KEY_SEP}{name}"]
            if tuple(arr.shape) != tuple(rules.shapes[name]):
                raise UploadError(
                    f"class {c} {name}: shape {tuple(arr.shape)}, need {tuple(rules.shapes[name])}"
                )
            try:
                value = arr.numpy()
            except Exception as err:  # malformed bytes from a client
                raise UploadError(f"class {c} {name}: unreadable array ({err})") from err
            if value.dtype != np.float32:
                raise UploadError(f"class {c} {name}: dtype {value.dtype}, need float32")
            if not np.isfinite(value).all():
                raise UploadError(f"class {c} {name}: non-finite values")
            params[name] = value
        if not (math.isfinite(mu) and 0.0 <= mu <= rules.max_error):
            raise UploadError(f"class {c}: err-mean {mu} outside [0, {rules.max_error}]")
        if not (math.isfinite(sd) and rules.min_std <= sd <= rules.max_error):
            raise UploadError(
                f"class {c}: err-std {sd} outside [{rules.min_std}, {rules.max_error}]"
            )
        if not (n >= 1 and n == int(n)):
            raise UploadError(f"class {c}: num-examples {n} is not a positive integer")
        registrations.append(Registration(user, c, params, float(mu), float(sd), int(n)))
    return user, registrations
