"""The one place where Hydra config is mapped to typed, frozen objects.

``build_experiment`` turns the composed config into an :class:`Experiment`; the part that a
client needs travels as JSON (:class:`ClientSpec`) inside the train message's ConfigRecord.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from .data import IdxDataset, Partition
from .features import FeatureExtractor
from .filter import Guard, ScoringConfig
from .model import AutoencoderSpec, TrainSpec


@dataclass(frozen=True)
class SimulationSpec:
    """Ray simulation resources per client (``num_gpus > 0`` puts clients on the GPU)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


def _spec(node: Any) -> Any:
    """Build a plain spec (dataclass or factory) from ``_target_`` without recursing.

    Nested ``_target_`` configs (optimiser, scheduler, augmentation) stay plain dicts so that
    they can be sent to clients as JSON and instantiated there.
    """
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if not isinstance(data, dict):
        raise TypeError(f"expected a config mapping, got {type(data).__name__}")
    kwargs = {str(k): v for k, v in data.items()}
    factory = get_object(str(kwargs.pop("_target_")))
    return factory(**kwargs)


@dataclass(frozen=True)
class ClientSpec:
    """Everything a client needs to train its autoencoder(s); JSON-serialisable."""

    seed: int
    dataset: dict[str, Any]
    features: dict[str, Any]
    model: dict[str, Any]
    train: dict[str, Any]
    assignment: dict[int, list[int]]
    fraction: dict[int, float] = field(default_factory=dict)
    extra_classes: dict[int, list[int]] = field(default_factory=dict)
    shards: int = 0
    task: str = "docl_flower.client_app.train_docl"

    def to_json(self) -> str:
        """Serialise (integer keys become strings)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClientSpec:
        """Parse what :meth:`to_json` wrote."""
        raw = json.loads(text)
        raw["assignment"] = {int(k): [int(c) for c in v] for k, v in raw["assignment"].items()}
        raw["fraction"] = {int(k): float(v) for k, v in raw.get("fraction", {}).items()}
        raw["extra_classes"] = {
            int(k): [int(c) for c in v] for k, v in raw.get("extra_classes", {}).items()
        }
        return cls(**raw)

    def model_spec(self) -> AutoencoderSpec:
        """The architecture as a typed object (a classifier spec for the baselines)."""
        return _spec(self.model)  # type: ignore[no-any-return]

    def train_spec(self) -> TrainSpec:
        """The training recipe as a typed object."""
        return _spec(self.train)  # type: ignore[no-any-return]

    def dataset_obj(self, root: str | None = None) -> IdxDataset:
        """The training data set, optionally read from a node-local folder."""
        cfg = dict(self.dataset)
        if root is not None:
            cfg["root"] = root
        return _spec(cfg)  # type: ignore[no-any-return]

    def features_obj(self) -> FeatureExtractor:
        """The feature extractor."""
        return instantiate(self.features)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Experiment:
    """A fully resolved DOCL experiment."""

    seed: int
    num_classes: int
    dataset: IdxDataset
    harmless: IdxDataset | None
    features: FeatureExtractor
    partition: Partition
    model: Any
    train: Any
    guard: Guard
    scoring: ScoringConfig
    simulation: SimulationSpec
    client_spec: ClientSpec
    assignment: Mapping[int, tuple[int, ...]]
    workflow: Any


def build_experiment(cfg: DictConfig) -> Experiment:
    """Validate the composed config and map it to typed objects (raises ``ValueError``)."""
    try:
        return _build_experiment(cfg)
    except InstantiationException as err:
        raise ValueError(str(err)) from err
    except TypeError as err:  # unknown or missing keys of a spec
        raise ValueError(f"invalid config: {err}") from err


def _build_experiment(cfg: DictConfig) -> Experiment:
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    dataset_cfg = {
        k: v for k, v in container["dataset"].items() if k not in ("num_classes", "harmless")
    }
    num_classes = int(container["dataset"]["num_classes"])
    harmless_cfg = container["dataset"].get("harmless")
    partition: Partition = _spec(container["partition"])
    assignment = partition.assignment(num_classes)
    train_cfg = dict(container["train"])
    model_cfg = dict(container["model"])
    seed = int(container["seed"])
    workflow = _spec(container["strategy"])
    client_spec = ClientSpec(
        seed=seed,
        dataset=dataset_cfg,
        features=dict(container["features"]),
        model=model_cfg,
        train=train_cfg,
        assignment={u: list(cs) for u, cs in assignment.items()},
        fraction={int(k): float(v) for k, v in partition.fraction.items()},
        extra_classes={int(k): [int(c) for c in v] for k, v in partition.extra_classes.items()},
        shards=len(assignment) if partition.iid else 0,
        task=str(workflow.CLIENT_TASK),
    )
    return Experiment(
        seed=seed,
        num_classes=num_classes,
        dataset=_spec(dataset_cfg),
        harmless=_spec(harmless_cfg) if harmless_cfg else None,
        features=instantiate(container["features"]),
        partition=partition,
        model=_spec(model_cfg),
        train=_spec(train_cfg),
        guard=instantiate(container["guard"]),
        scoring=_spec(container["scoring"]),
        simulation=_spec(container["simulation"]),
        client_spec=client_spec,
        assignment=assignment,
        workflow=workflow,
    )


def derive_seed(seed: int, *keys: int) -> int:
    """A per-client (per-autoencoder) seed derived from the experiment seed."""
    state = np.random.SeedSequence([seed, *(k & 0xFFFFFFFF for k in keys)]).generate_state(1)
    return int(state[0])


#: The repository root (holds ``pyproject.toml``, the Flower app directory, and ``data/``).
PROJECT_ROOT = Path(__file__).resolve().parent.parent

if not OmegaConf.has_resolver("docl.project_root"):
    OmegaConf.register_new_resolver("docl.project_root", lambda: str(PROJECT_ROOT))
