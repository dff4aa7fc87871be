"""Validation of one feature-statistics upload: registrations or an ``UploadError``.

The counterpart of :func:`~docl_flower.federation.uploads.parse_upload` for the
``feature_stats`` strategy, to the same standard: a pure function of the reply's content;
every metric type- and range-checked; every tensor checked for its name, shape and dtype
before it is read, then for finite values, weights, means in the feature range, variances or
covariance eigenvalues within bounds (positive-definite: eigenvalues and Cholesky), and
log-likelihood statistics that such a model can produce (:func:`checked_stats`). Anything
unexpected becomes an ``UploadError`` with the reason, never another exception.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..core.feature_stats import TENSOR_NAMES, ClassStats, StatsError, StatsLimits, checked_stats
from . import keys
from .uploads import (
    MAX_EXAMPLES,
    UploadError,
    as_array,
    as_float,
    as_int,
    as_list,
    records,
)


@dataclass(frozen=True)
class StatsRules:
    """What a valid feature-statistics upload looks like.

    Parameters
    ----------
    limits : StatsLimits
        The spec every client was sent, the feature dimension and range, and the bounds that
        follow from them.
    """

    limits: StatsLimits

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of each tensor of one class."""
        return self.limits.spec.shapes(self.limits.dim)


def parse_stats_upload(
    content: object,
    assignment: Mapping[int, tuple[int, ...]],
    rules: StatsRules,
) -> tuple[int, list[ClassStats]]:
    """Validate one reply's content and turn it into per-class statistics.

    Raises
    ------
    UploadError
        With the reason, for a missing record or key, a user id that is not expected, classes
        that are not the user's, a tensor with a wrong name, shape or dtype, or statistics that
        :func:`~docl_flower.core.feature_stats.checked_stats` refuses. No other exception
        leaves this function.
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
    for key in (keys.USER_ID, keys.CLASSES, keys.LL_MEAN, keys.LL_STD, keys.NUM_EXAMPLES):
        if key not in values:
            raise UploadError(f"metric {key!r} missing")
    user = as_int(values[keys.USER_ID], "user id")
    if user not in assignment:
        raise UploadError(f"user id {user} is not an expected user")
    classes = [as_int(c, "class") for c in as_list(values[keys.CLASSES])]
    if len(set(classes)) != len(classes) or sorted(classes) != sorted(assignment[user]):
        raise UploadError(f"user {user} uploaded classes {classes}, owns {list(assignment[user])}")
    means = [as_float(v, "ll-mean") for v in as_list(values[keys.LL_MEAN])]
    stds = [as_float(v, "ll-std") for v in as_list(values[keys.LL_STD])]
    counts = [
        as_int(v, "num-examples", 1, MAX_EXAMPLES) for v in as_list(values[keys.NUM_EXAMPLES])
    ]
    if not len(means) == len(stds) == len(counts) == len(classes):
        raise UploadError("ll-mean, ll-std, num-examples and classes differ in length")
    if keys.TRAIN_SECONDS in values:
        seconds = as_float(values[keys.TRAIN_SECONDS], "train-seconds")
        if seconds < 0:
            raise UploadError(f"train-seconds {seconds} is negative")
    if keys.RECEIVED_ARRAYS in values:
        as_int(values[keys.RECEIVED_ARRAYS], "received-array-records", 0)
    if keys.DEVICE_CUDA in values:
        as_int(values[keys.DEVICE_CUDA], "device-cuda", 0, 1)
    expected_keys = {f"{c}{keys.ARRAY_KEY_SEP}{n}" for c in classes for n in TENSOR_NAMES}
    if array_keys != expected_keys:
        extra = sorted(array_keys - expected_keys)
        missing = sorted(expected_keys - array_keys)
        raise UploadError(f"array keys differ: missing {missing}, unexpected {extra}")
    shapes = rules.shapes()
    found = []
    for c, ll_mean, ll_std, n in zip(classes, means, stds, counts, strict=True):
        tensors: dict[str, NDArray[np.float32]] = {
            name: as_array(arrays, f"{c}{keys.ARRAY_KEY_SEP}{name}", shapes[name])
            for name in TENSOR_NAMES
        }
        try:
            found.append(checked_stats(user, c, tensors, ll_mean, ll_std, n, rules.limits))
        except StatsError as err:
            raise UploadError(f"class {c}: {err}") from err
        except Exception as err:  # numerical failure on crafted values: still a rejection
            raise UploadError(
                f"class {c}: unusable statistics ({type(err).__name__}: {err})"
            ) from err
    return user, found
