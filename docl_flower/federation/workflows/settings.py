"""Range checks of the ``strategy`` group's settings, run where the config is built.

Each check raises ``ValueError`` with a message that starts with the field's name, so that
the config layer reports it as ``strategy.FIELD must be ..., got VALUE`` in one line, before
Flower or Ray start (``docl-flower``) and again in the ServerApp (``flwr run .``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from docl_flower.core.common.checks import check_int, check_number

#: Longest any deadline may be (one week): a larger value is a typo, not a plan.
MAX_TIMEOUT_S = 7 * 24 * 3600.0
#: Most probe images (harmless or noise) a check may score per upload: each costs a float64
#: reference pass over the autoencoder, for every upload.
MAX_PROBE_IMAGES = 100_000
#: Most federated rounds of a baseline.
MAX_ROUNDS = 100_000
#: Most epochs of the centralised reference.
MAX_EPOCHS = 100_000


def check_timeout(name: str, value: object) -> float:
    """A deadline in seconds: finite, > 0, at most :data:`MAX_TIMEOUT_S`."""
    return check_number(name, value, above=0.0, maximum=MAX_TIMEOUT_S)


def check_path(name: str, value: object, must_exist: bool = False) -> None:
    """``None`` or a non-empty path string (an existing file when ``must_exist``)."""
    if value is None:
        return
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ValueError(f"{name} must be null or a path, got {value!r}")
    if must_exist and not Path(value).expanduser().is_file():
        raise ValueError(f"{name} must name an existing file, got {value!r} (not a file)")


class RegistrationSettings(Protocol):
    """The settings DOCL and the feature-statistics baseline share."""

    @property
    def node_wait_s(self) -> float: ...  # noqa: D102
    @property
    def timeout_s(self) -> float: ...  # noqa: D102
    @property
    def bindings_path(self) -> str | None: ...  # noqa: D102
    @property
    def probe_images(self) -> int: ...  # noqa: D102
    @property
    def probe_noise(self) -> int: ...  # noqa: D102
    @property
    def max_block_share(self) -> float: ...  # noqa: D102


def check_registration_settings(spec: RegistrationSettings) -> None:
    """Check the register-once settings: deadlines, node bindings, the probe check."""
    check_timeout("node_wait_s", spec.node_wait_s)
    check_timeout("timeout_s", spec.timeout_s)
    check_path("bindings_path", spec.bindings_path, must_exist=True)
    images = check_int("probe_images", spec.probe_images, minimum=0, maximum=MAX_PROBE_IMAGES)
    noise = check_int("probe_noise", spec.probe_noise, minimum=0, maximum=MAX_PROBE_IMAGES)
    if images + noise == 0:
        raise ValueError("probe_images and probe_noise are both 0: the probe check needs images")
    check_number("max_block_share", spec.max_block_share, minimum=0.0, maximum=1.0)


#: Settings of Flower's built-in strategies that are shares of the nodes.
_SHARES = ("fraction_train", "fraction_evaluate")
#: Settings of Flower's built-in strategies that count nodes.
_COUNTS = ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes")


def check_flower_strategy(config: Mapping[str, Any]) -> None:
    """Check the plain settings of a built-in Flower strategy config (``strategy.strategy``)."""
    if not isinstance(config, Mapping):
        raise ValueError(f"strategy must be a strategy config, got {config!r}")
    for key in _SHARES:
        if key in config:
            check_number(f"strategy.{key}", config[key], minimum=0.0, maximum=1.0)
    for key in _COUNTS:
        if key in config:
            check_int(f"strategy.{key}", config[key], minimum=0)
    if "proximal_mu" in config:
        mu = check_number("strategy.proximal_mu", config["proximal_mu"], minimum=0.0)
        if not math.isfinite(mu):  # pragma: no cover - check_number refuses it already
            raise ValueError("strategy.proximal_mu must be finite")
