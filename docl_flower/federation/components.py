"""Every component a run may name: the core's table plus the Flower layer's workflows.

The one place where the workflows are registered (written out, not registered by importing
them). Whoever builds a whole experiment, the ``docl-flower`` command, the ServerApp, a
script or a test, builds it with :data:`COMPONENTS`, most simply through
:func:`build_experiment` or :func:`load_experiment` here.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from docl_flower.core.pipeline import config
from docl_flower.core.pipeline.components import COMPONENTS as CORE_COMPONENTS

from .workflows.baselines import Centralised, FederatedClassifier
from .workflows.docl import Docl
from .workflows.feature_stats import FeatureStats

#: The workflows by the name a config's ``strategy._target_`` gives (saved configs hold them).
WORKFLOWS = {
    "docl_flower.federation.workflows.docl.Docl": Docl,
    "docl_flower.federation.workflows.baselines.FederatedClassifier": FederatedClassifier,
    "docl_flower.federation.workflows.baselines.Centralised": Centralised,
    "docl_flower.federation.workflows.feature_stats.FeatureStats": FeatureStats,
}

#: The core's components and the workflows.
COMPONENTS = CORE_COMPONENTS.extended({"strategy": WORKFLOWS})


def build_experiment(cfg: DictConfig, check_recipe: bool = True) -> config.Experiment:
    """:func:`docl_flower.core.pipeline.config.build_experiment` with :data:`COMPONENTS`."""
    return config.build_experiment(cfg, check_recipe, components=COMPONENTS)


def load_experiment(path: Path, checked_sha256: str | None = None) -> config.Experiment:
    """:func:`docl_flower.core.pipeline.config.load_experiment` with :data:`COMPONENTS`."""
    return config.load_experiment(path, checked_sha256, components=COMPONENTS)
