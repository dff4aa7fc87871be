"""Every component a config may name, by the name it uses (``_target_``), in one table.

The core's components are listed here explicitly; the Flower layer adds its workflows (group
``strategy``) and Flower's strategies (``flower_strategy``) with :func:`register`. Names are
looked up, never imported (:mod:`.registry`); they keep the module paths the configs have
always written, wherever the classes live now.
"""

from __future__ import annotations

from collections.abc import Mapping

from .classifier import Cnn, Mlp2NN, SgdSpec
from .data import DATASETS, PARTITIONS
from .features import EXTRACTORS
from .filter import ScoringConfig
from .model import AutoencoderSpec, TrainSpec
from .recipes import RECIPES
from .registry import Factory, Registry
from .resources import SimulationSpec

COMPONENTS = Registry(
    {
        "dataset": DATASETS,
        "features": EXTRACTORS,
        "model": {
            "docl_flower.core.model.AutoencoderSpec": AutoencoderSpec,
            "docl_flower.core.classifier.Mlp2NN": Mlp2NN,
            "docl_flower.core.classifier.Cnn": Cnn,
        },
        "train": {
            "docl_flower.core.model.TrainSpec": TrainSpec,
            "docl_flower.core.classifier.SgdSpec": SgdSpec,
        },
        **RECIPES.tables(),
        "partition": PARTITIONS,
        "scoring": {"docl_flower.core.filter.ScoringConfig": ScoringConfig},
        "simulation": {"docl_flower.core.config.SimulationSpec": SimulationSpec},
        "strategy": {},
    },
    hints={
        "strategy": " (the Flower layer registers them: import docl_flower.federation.workflows)"
    },
)


def register(group: str, name: str, factory: Factory) -> None:
    """Make ``factory`` available as ``_target_: NAME`` in ``group`` (see :class:`Registry`)."""
    COMPONENTS.register(group, name, factory)


def names(group: str) -> list[str]:
    """The registered names of ``group``."""
    return COMPONENTS.names(group)


def factory(group: str, name: object) -> Factory:
    """The component registered as ``name`` in ``group``; raises for any other name."""
    return COMPONENTS.factory(group, name)


def build(group: str, node: Mapping[str, object], partial: bool | None = None) -> object:
    """Build the component a config node names (see :meth:`Registry.build`)."""
    return COMPONENTS.build(group, node, partial)
