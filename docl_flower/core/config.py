"""The one place where Hydra config is mapped to typed, frozen objects.

``build_experiment`` turns the composed config into an :class:`Experiment`; the part that a
client needs travels as JSON (:class:`ClientSpec`) inside the train message's ConfigRecord.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np
from hydra.errors import InstantiationException
from numpy.typing import NDArray
from omegaconf import DictConfig, OmegaConf

from .classifier import ClassifierSpec, Cnn, Mlp2NN, SgdSpec
from .data import IdxDataset, Partition, class_indices, user_class_indices
from .features import FeatureExtractor
from .filter import Guard, ScoringConfig, make_guard
from .install import PACKAGE_ROOT, project_root
from .model import AutoencoderSpec, TrainSpec
from .registry import build, register

#: What the ``model`` group builds: DOCL's autoencoder or a baseline's classifier.
ModelSpec = AutoencoderSpec | ClassifierSpec
#: What the ``train`` group builds: DOCL's recipe or the baselines' SGD.
TrainRecipe = TrainSpec | SgdSpec


@runtime_checkable
class WorkflowSpec(Protocol):
    """What the core knows of a workflow (``strategy`` group): the task its clients run.

    The Flower layer's ``Workflow`` protocol adds ``run``; the task is a name of the client's
    task registry, never a dotted path.
    """

    CLIENT_TASK: ClassVar[str]


@dataclass(frozen=True)
class SimulationSpec:
    """Ray simulation resources per client (``num_gpus > 0`` puts clients on the GPU)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


def _container(node: object) -> Mapping[str, object]:
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a config mapping, got {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


def _spec(group: str, node: object) -> object:
    """Build the component a config node names, through the registry (no recursion).

    Nested ``_target_`` configs (optimiser, scheduler, augmentation) stay plain dicts so that
    they can be sent to clients as JSON and built there, from the same registry.
    """
    return build(group, _container(node))


register("simulation", "docl_flower.core.config.SimulationSpec", SimulationSpec)


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
    task: str = "docl"

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

    def model_spec(self) -> ModelSpec:
        """The architecture as a typed object (a classifier spec for the baselines)."""
        return _as_model(_spec("model", self.model))

    def train_spec(self) -> TrainRecipe:
        """The training recipe as a typed object."""
        return _as_train(_spec("train", self.train))

    def dataset_obj(self, root: str | None = None) -> IdxDataset:
        """The training data set, optionally read from a node-local folder."""
        cfg = dict(self.dataset)
        if root is not None:
            cfg["root"] = root
        return _as_dataset(_spec("dataset", cfg))

    def features_obj(self) -> FeatureExtractor:
        """The feature extractor."""
        return _as_features(_spec("features", self.features))

    def class_user_indices(
        self, user: int, cls: int, labels: NDArray[np.int64]
    ) -> NDArray[np.int64]:
        """Training indices of class ``cls`` that ``user`` holds (shard and fraction applied)."""
        return user_class_indices(
            labels,
            cls,
            user,
            seed=self.seed,
            shards=self.shards,
            fraction=self.fraction.get(user, 1.0),
        )

    def user_indices(self, user: int, labels: NDArray[np.int64]) -> NDArray[np.int64]:
        """All training indices of ``user``'s partition."""
        return np.concatenate(
            [self.class_user_indices(user, c, labels) for c in self.assignment[user]]
        )

    def training_indices(self, user: int, cls: int, labels: NDArray[np.int64]) -> NDArray[np.int64]:
        """What ``user`` trains its class-``cls`` autoencoder on (plus any extra classes)."""
        return np.concatenate(
            [self.class_user_indices(user, cls, labels)]
            + [class_indices(labels, v) for v in self.extra_classes.get(user, [])]
        )


def _wrong(key: str, value: object) -> ValueError:
    return ValueError(f"config group {key!r} built a {type(value).__name__}")


def _as_model(value: object) -> ModelSpec:
    if isinstance(value, AutoencoderSpec | Mlp2NN | Cnn):
        return value
    raise _wrong("model", value)


def _as_train(value: object) -> TrainRecipe:
    if isinstance(value, TrainSpec | SgdSpec):
        return value
    raise _wrong("train", value)


def _as_dataset(value: object) -> IdxDataset:
    if isinstance(value, IdxDataset):
        return value
    raise _wrong("dataset", value)


def _as_features(value: object) -> FeatureExtractor:
    if isinstance(value, FeatureExtractor):
        return value
    raise _wrong("features", value)


def _as_partition(value: object) -> Partition:
    if isinstance(value, Partition):
        return value
    raise _wrong("partition", value)


_T = TypeVar("_T")


def _as(kind: type[_T], value: object, key: str) -> _T:
    if isinstance(value, kind):
        return value
    raise _wrong(key, value)


def _as_workflow(value: object) -> WorkflowSpec:
    if isinstance(value, WorkflowSpec):
        return value
    raise _wrong("strategy", value)


@dataclass(frozen=True)
class Experiment:
    """A fully resolved DOCL experiment."""

    seed: int
    num_classes: int
    dataset: IdxDataset
    harmless: IdxDataset | None
    features: FeatureExtractor
    partition: Partition
    model: ModelSpec
    train: TrainRecipe
    guard: Guard
    scoring: ScoringConfig
    simulation: SimulationSpec
    client_spec: ClientSpec
    assignment: Mapping[int, tuple[int, ...]]
    workflow: WorkflowSpec
    #: The resolved config as plain data (saved with the filter and the results).
    config: dict[str, object]


def build_experiment(cfg: DictConfig) -> Experiment:
    """Validate the composed config and map it to typed objects (raises ``ValueError``)."""
    try:
        return _build_experiment(cfg)
    except InstantiationException as err:
        raise ValueError(str(err)) from err
    except TypeError as err:  # unknown or missing keys of a spec
        raise ValueError(f"invalid config: {err}") from err


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The Hydra config of ``conf/`` (shipped with this copy of the package) with ``overrides``.

    What ``docl-flower`` composes from the command line, for callers without it (a ServerApp
    started by ``flwr run .``). Raises ``ValueError`` for an override Hydra rejects.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    conf = PACKAGE_ROOT / "conf"
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(f"invalid overrides {list(overrides)}: {err}") from err


def overridden_keys(overrides: Sequence[str]) -> set[str]:
    """The config keys that Hydra ``overrides`` set (``+a.b=1`` and ``a.b=1`` give ``a.b``)."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


def load_experiment(path: Path) -> Experiment:
    """Read a resolved config saved as YAML (``experiment.yaml``) and build the experiment."""
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path}: expected a mapping of config groups")
    return build_experiment(cfg)


def _build_experiment(cfg: DictConfig) -> Experiment:
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    dataset_cfg = {
        k: v for k, v in container["dataset"].items() if k not in ("num_classes", "harmless")
    }
    num_classes = int(container["dataset"]["num_classes"])
    harmless_cfg = container["dataset"].get("harmless")
    partition = _as_partition(_spec("partition", container["partition"]))
    assignment = partition.assignment(num_classes)
    train_cfg = dict(container["train"])
    model_cfg = dict(container["model"])
    seed = int(container["seed"])
    workflow = _as_workflow(_spec("strategy", container["strategy"]))
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
        dataset=_as_dataset(_spec("dataset", dataset_cfg)),
        harmless=_as_dataset(_spec("dataset", harmless_cfg)) if harmless_cfg else None,
        features=_as_features(_spec("features", container["features"])),
        partition=partition,
        model=_as_model(_spec("model", model_cfg)),
        train=_as_train(_spec("train", train_cfg)),
        guard=make_guard(**container["guard"]),
        scoring=_as(ScoringConfig, _spec("scoring", container["scoring"]), "scoring"),
        simulation=_as(SimulationSpec, _spec("simulation", container["simulation"]), "simulation"),
        client_spec=client_spec,
        assignment=assignment,
        workflow=workflow,
        config={str(k): v for k, v in container.items()},
    )


#: The project folder (holds ``pyproject.toml``, ``conf/`` and ``data/``).
PROJECT_ROOT = project_root()

if not OmegaConf.has_resolver("docl.project_root"):
    OmegaConf.register_new_resolver("docl.project_root", lambda: str(PROJECT_ROOT))
