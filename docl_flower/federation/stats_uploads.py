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

from docl_flower.core.baselines.fedpft import (
    TENSOR_NAMES,
    ClassStats,
    StatsError,
    StatsLimits,
    checked_stats,
)

from . import keys
from .uploads import (
    UploadError,
    as_array,
    read_header,
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
        :func:`~docl_flower.core.baselines.fedpft.checked_stats` refuses. No other exception
        leaves this function.
    """
    head = read_header(content, assignment, keys.LL_MEAN, keys.LL_STD, TENSOR_NAMES)
    user, classes, means, stds, counts = head.user, head.classes, head.means, head.stds, head.counts
    arrays = head.arrays
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
