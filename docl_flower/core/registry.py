"""The project's components by name: the only way a config, a message or a file names code.

A config node names its component with Hydra's ``_target_`` key, as in ``conf/``; but the name
is looked up in the table of its group here, never imported. A name that is not in the table
(``builtins.open``, ``os.system``, a typo) is refused with the names that are. The tables hold
the project's own components and the torch optimisers and schedulers it supports; code that
adds a component registers it with :func:`register`. The Flower layer registers its workflows
(group ``strategy``) when ``docl_flower.federation.workflows`` is imported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch

from .classifier import Cnn, Mlp2NN, SgdSpec
from .data import DATASETS, PARTITIONS
from .features import EXTRACTORS
from .filter import ScoringConfig
from .model import AutoencoderSpec, RandomAffine, TrainSpec

Factory = Callable[..., object]

_TABLES: dict[str, dict[str, Factory]] = {
    "dataset": dict(DATASETS),
    "features": dict(EXTRACTORS),
    "model": {
        "docl_flower.core.model.AutoencoderSpec": AutoencoderSpec,
        "docl_flower.core.classifier.Mlp2NN": Mlp2NN,
        "docl_flower.core.classifier.Cnn": Cnn,
    },
    "train": {
        "docl_flower.core.model.TrainSpec": TrainSpec,
        "docl_flower.core.classifier.SgdSpec": SgdSpec,
    },
    "optimizer": {
        "torch.optim.Adam": torch.optim.Adam,
        "torch.optim.AdamW": torch.optim.AdamW,
        "torch.optim.Adadelta": torch.optim.Adadelta,
        "torch.optim.SGD": torch.optim.SGD,
    },
    "scheduler": {
        "torch.optim.lr_scheduler.OneCycleLR": torch.optim.lr_scheduler.OneCycleLR,
        "torch.optim.lr_scheduler.CosineAnnealingLR": torch.optim.lr_scheduler.CosineAnnealingLR,
    },
    "augment": {"docl_flower.core.model.RandomAffine": RandomAffine},
    "partition": dict(PARTITIONS),
    "scoring": {"docl_flower.core.filter.ScoringConfig": ScoringConfig},
    "simulation": {},
    "strategy": {},
}


class UnknownComponentError(ValueError):
    """A config, message or file names a component that is not registered."""


def register(group: str, name: str, factory: Factory) -> None:
    """Make ``factory`` available as ``_target_: NAME`` in config group ``group``."""
    _TABLES.setdefault(group, {})[name] = factory


def names(group: str) -> list[str]:
    """The registered names of ``group``."""
    return sorted(_TABLES.get(group, {}))


def factory(group: str, name: object) -> Factory:
    """The component registered as ``name`` in ``group``; raises for any other name."""
    table = _TABLES.get(group, {})
    if not isinstance(name, str) or name not in table:
        hint = (
            " (the Flower layer registers them: import docl_flower.federation.workflows)"
            if group == "strategy" and not table
            else ""
        )
        raise UnknownComponentError(
            f"unknown {group} {name!r}: not a registered component (known: {names(group)}){hint}"
        )
    return table[name]


def build(group: str, node: Mapping[str, object], partial: bool | None = None) -> object:
    """Build the component a config node names (``_target_``, optional ``_partial_``).

    The other keys are keyword arguments; ``_partial_: true`` returns a
    :func:`functools.partial` (for optimisers and schedulers that need more arguments later).
    Raises :class:`UnknownComponentError` for an unregistered name and ``ValueError`` for
    arguments the component rejects.
    """
    if not isinstance(node, Mapping):
        raise ValueError(f"{group}: expected a config mapping, got {type(node).__name__}")
    kwargs = {str(k): v for k, v in node.items()}
    make = factory(group, kwargs.pop("_target_", None))
    asked = kwargs.pop("_partial_", False)
    if asked not in (True, False):
        raise ValueError(f"{group}: _partial_ must be true or false, got {asked!r}")
    if asked if partial is None else partial:
        return functools.partial(make, **kwargs)
    try:
        return make(**kwargs)
    except TypeError as err:  # unknown or missing keyword arguments
        raise ValueError(f"invalid {group} config: {err}") from err
