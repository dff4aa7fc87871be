"""Every component a config may name, by the name it uses (``_target_``), in one table.

The core's components are listed here explicitly. The ``strategy`` group (the workflows) is
empty here: the Flower layer's table, :data:`docl_flower.federation.components.COMPONENTS`,
is this one extended with them, and whoever builds a whole experiment passes it. Names are
looked up, never imported (:mod:`docl_flower.core.common.registry`); they keep the module
paths the configs have always written (saved filters hold them), wherever the classes live
now.
"""

from __future__ import annotations

from collections.abc import Mapping

from docl_flower.core.baselines.classifiers import Cnn, Mlp2NN, SgdSpec
from docl_flower.core.common.registry import Factory, Registry
from docl_flower.core.data.catalog import DATASETS
from docl_flower.core.data.partitions import PARTITIONS
from docl_flower.core.features.extractors import EXTRACTORS
from docl_flower.core.filter.global_filter import ScoringConfig
from docl_flower.core.pipeline.resources import SimulationSpec
from docl_flower.core.training.autoencoder import AutoencoderSpec, TrainSpec
from docl_flower.core.training.recipes import RECIPES

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
        "strategy": (
            " (the workflows live in the Flower layer: build the experiment with "
            "docl_flower.federation.components.COMPONENTS)"
        )
    },
)


def names(group: str) -> list[str]:
    """The registered names of ``group``."""
    return COMPONENTS.names(group)


def factory(group: str, name: object) -> Factory:
    """The component registered as ``name`` in ``group``; raises for any other name."""
    return COMPONENTS.factory(group, name)


def build(group: str, node: Mapping[str, object], partial: bool | None = None) -> object:
    """Build the component a config node names (see :meth:`Registry.build`)."""
    return COMPONENTS.build(group, node, partial)
