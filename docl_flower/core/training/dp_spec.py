"""The differential-privacy settings of a recipe (``train.dp``) and their budget split.

A leaf next to the model (the recipe holds a :class:`DpSpec`); the DP-SGD training itself is
in :mod:`.dp`, above the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from docl_flower.core.common.checks import check_number


@dataclass(frozen=True)
class DpSpec:
    """Differential privacy of a user's upload (``train.dp``); ``epsilon: null`` turns it off.

    Parameters
    ----------
    epsilon : float or None
        Total privacy budget of one autoencoder's upload (training plus ``mu``, ``sigma``);
        ``None`` = no differential privacy (the default).
    delta : float or None
        Total delta of one autoencoder's upload; ``None`` means ``1 / (10 n)`` for a user
        with ``n`` images. A fixed delta must be below ``1 / n`` (checked on the device).
    max_grad_norm : float
        Per-image gradient clipping norm of DP-SGD.
    stats_share : float
        Share of ``epsilon`` and of ``delta`` spent on ``mu`` and ``sigma``, in ``(0, 1)``.
    error_clip : float
        Each image's reconstruction error is clipped to ``error_clip * D`` before ``mu``,
        ``sigma`` are computed (a mean squared error per feature), in ``(0, 1]``.
    """

    epsilon: float | None = None
    delta: float | None = 1e-5
    max_grad_norm: float = 1.0
    stats_share: float = 0.1
    error_clip: float = 0.05

    def __post_init__(self) -> None:
        if self.epsilon is not None:
            check_number("epsilon", self.epsilon, above=0.0)
        if self.delta is not None and not 0.0 < check_number("delta", self.delta) < 1.0:
            raise ValueError(f"delta must be in (0, 1) or null, got {self.delta}")
        check_number("max_grad_norm", self.max_grad_norm, above=0.0)
        if not 0.0 < check_number("stats_share", self.stats_share) < 1.0:
            raise ValueError(f"stats_share must be in (0, 1), got {self.stats_share}")
        if not 0.0 < check_number("error_clip", self.error_clip) <= 1.0:
            raise ValueError(f"error_clip must be in (0, 1], got {self.error_clip}")

    @property
    def enabled(self) -> bool:
        """Whether uploads are differentially private."""
        return self.epsilon is not None

    def delta_for(self, num_examples: int) -> float:
        """The total delta of an autoencoder trained on ``num_examples`` images.

        Raises
        ------
        ValueError
            A fixed ``delta`` that is not below ``1 / num_examples``.
        """
        if self.delta is None:
            return 1.0 / (10.0 * num_examples)
        if self.delta >= 1.0 / num_examples:
            raise ValueError(
                f"dp.delta {self.delta:g} must be below 1/n = {1.0 / num_examples:.3g} "
                f"for a user with {num_examples} images (or null: 1/(10 n))"
            )
        return float(self.delta)

    def budget(self, num_examples: int) -> Budget:
        """The split of the budget between training and statistics (basic composition)."""
        if self.epsilon is None:
            raise ValueError("differential privacy is off (dp.epsilon is null)")
        delta = self.delta_for(num_examples)
        share = self.stats_share
        return Budget(
            train_epsilon=self.epsilon * (1.0 - share),
            train_delta=delta * (1.0 - share),
            stats_epsilon=self.epsilon * share,
            stats_delta=delta * share,
        )


def dp_from_config(value: object) -> DpSpec:
    """``train.dp`` as a :class:`DpSpec` (from a mapping, ``None`` or a DpSpec).

    Raises
    ------
    ValueError
        One line that starts with ``dp.KEY`` (or ``dp:`` for a wrong type or unknown keys).
    """
    if isinstance(value, DpSpec):
        return value
    if value is None:
        return DpSpec()
    if not isinstance(value, Mapping):
        raise ValueError(f"dp: must be a mapping of {_dp_keys()}, got {value!r}")
    unknown = sorted(str(k) for k in value if k not in _dp_keys())
    if unknown:
        raise ValueError(f"dp: unknown keys {unknown} (known: {_dp_keys()})")
    try:
        return DpSpec(**{str(k): v for k, v in value.items()})
    except ValueError as err:
        raise ValueError(f"dp.{err}") from err


def _dp_keys() -> list[str]:
    return [f.name for f in fields(DpSpec)]


@dataclass(frozen=True)
class Budget:
    """``(epsilon, delta)`` for training and for the statistics of one autoencoder."""

    train_epsilon: float
    train_delta: float
    stats_epsilon: float
    stats_delta: float
