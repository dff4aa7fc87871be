"""The one place where Hydra config is mapped to typed, frozen objects.

``build_experiment`` turns the composed config into an :class:`Experiment`; the part that a
client needs is a typed :class:`~docl_flower.core.pipeline.client_spec.ClientSpec`, which
travels as a versioned, schema-checked record inside the train message's ConfigRecord.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from docl_flower.core.baselines.classifiers import Cnn, Mlp2NN, SgdSpec
from docl_flower.core.baselines.fedpft import StatsSpec
from docl_flower.core.common.checks import check_int, check_number
from docl_flower.core.common.install import PACKAGE_ROOT, project_root
from docl_flower.core.common.registry import Registry
from docl_flower.core.data.base import ImageDataset
from docl_flower.core.data.catalog import as_image_dataset
from docl_flower.core.data.partitions import Partition
from docl_flower.core.features.extractors import FeatureExtractor
from docl_flower.core.filter.conformal import DEFAULT_CALIBRATION_SHARE
from docl_flower.core.filter.global_filter import GUARDS, SIDES, Guard, ScoringConfig, make_guard
from docl_flower.core.filter.probe import DEFAULT_MAX_ALPHA, MAX_ALPHA
from docl_flower.core.pipeline.client_spec import (
    ClientSpec,
    ModelSpec,
    TrainRecipe,
    check_fields,
)
from docl_flower.core.pipeline.components import COMPONENTS
from docl_flower.core.pipeline.resources import SimulationSpec
from docl_flower.core.training.autoencoder import AutoencoderSpec, TrainSpec
from docl_flower.core.training.recipes import build_augment, build_optimizer, build_scheduler

#: ``dataset.harmless`` value: the photos of the classes (people) no user registered.
UNREGISTERED = "unregistered"


@runtime_checkable
class WorkflowSpec(Protocol):
    """What the core knows of a workflow (``strategy`` group): the task its clients run.

    The Flower layer's ``Workflow`` protocol adds ``run``; the task is a name of the client's
    task registry, never a dotted path.
    """

    CLIENT_TASK: ClassVar[str]


@runtime_checkable
class ClientStatsSpec(Protocol):
    """A workflow whose clients fit feature statistics (sent in :attr:`ClientSpec.stats`)."""

    def stats_spec(self) -> StatsSpec:
        """What each client fits."""
        ...


def _container(node: object) -> Mapping[str, object]:
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a config mapping, got {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _keyed(key: str, names: Collection[str], err: BaseException) -> str:
    """``err``'s message, prefixed with the config key: ``KEY.FIELD ...`` or ``KEY: ...``."""
    text = _one_line(err)
    head = re.match(r"[A-Za-z_]\w*", text)
    if head is not None and head.group() in names:
        return f"{key}.{text}"
    return f"{key}: {text}"


@contextmanager
def _config_key(key: str, names: Collection[str] = ()) -> Iterator[None]:
    """Re-raise what building the config under ``key`` rejects as one ``ValueError`` line.

    A message that starts with one of ``names`` (the fields of the component) is prefixed with
    ``KEY.``; any other with ``KEY: ``.
    """
    try:
        yield
    except (ValueError, TypeError, KeyError, InstantiationException) as err:
        raise ValueError(_keyed(key, names, err)) from err


def _fields(
    group: str, data: Mapping[str, object], components: Registry
) -> tuple[object, list[str]]:
    """The factory a config node names and the names of its arguments (empty if unknown)."""
    try:
        make = components.factory(group, data.get("_target_"))
    except ValueError:
        return None, []
    try:
        return make, list(inspect.signature(make).parameters)
    except (TypeError, ValueError):
        return make, []


def _spec(
    group: str, node: object, key: str | None = None, components: Registry = COMPONENTS
) -> object:
    """Build the component a config node names, through the registry (no recursion).

    Nested ``_target_`` configs (optimiser, scheduler, augmentation) stay plain dicts so that
    they can be sent to clients as JSON and built there, from the same registry. Raises
    ``ValueError`` with a message that starts with ``key`` (default: ``group``), e.g.
    ``model.hidden must be >= 1, got 0``.
    """
    names: list[str] = []
    try:
        data = _container(node)
        make, names = _fields(group, data, components)
        check_fields(make, data)
        return components.build(group, data)
    except (ValueError, TypeError) as err:
        raise ValueError(_keyed(key or group, names, err)) from err


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


def _as_dataset(value: object) -> ImageDataset:
    return as_image_dataset(value)


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
    dataset: ImageDataset
    #: Harmless images: another data set's test split, or None.
    harmless: ImageDataset | None
    features: FeatureExtractor
    partition: Partition
    model: ModelSpec
    train: TrainRecipe
    guard: Guard
    #: The loosest Guard alpha this filter may ever be checked with (``guard.max_alpha``).
    max_alpha: float
    scoring: ScoringConfig
    simulation: SimulationSpec
    client_spec: ClientSpec
    assignment: Mapping[int, tuple[int, ...]]
    workflow: WorkflowSpec
    #: The resolved config as plain data (saved with the filter and the results).
    config: dict[str, object]
    #: Harmless images are the photos of the classes no user owns (``harmless: unregistered``).
    harmless_unregistered: bool = False
    #: The Guard's calibration (``guard.target_acceptance``), or None: the fixed alpha.
    calibration: GuardCalibration | None = None


def build_experiment(
    cfg: DictConfig, check_recipe: bool = True, components: Registry = COMPONENTS
) -> Experiment:
    """Validate the composed config and map it to typed objects.

    Everything a run needs is checked here, before Flower or Ray start. With
    ``check_recipe=False`` the training recipe is checked for its structure only; its
    optimiser and scheduler are built by :func:`check_train_recipe` (a first optimiser costs
    1-2 s in a process: torch imports its compiler then), which the caller runs later.
    ``components``: the table the config's names are looked up in; the core's has no
    workflows, so a whole run passes :data:`docl_flower.federation.components.COMPONENTS`
    (or calls :func:`docl_flower.federation.components.build_experiment`).

    Raises
    ------
    ValueError
        One line that starts with the config key it rejects, e.g.
        ``model.hidden must be >= 1, got 0`` or ``simulation.num_cpus must be > 0, got 0``.
    """
    with _one_line_errors():
        return _build_experiment(cfg, check_recipe, components)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """Re-raise what building a config rejects as one ``ValueError`` line."""
    try:
        yield
    except ValueError as err:
        raise ValueError(_one_line(err)) from err
    except OmegaConfBaseException as err:  # an interpolation that does not resolve
        raise ValueError(f"invalid config: {_one_line(err)}") from err
    except InstantiationException as err:
        raise ValueError(_one_line(err)) from err
    except KeyError as err:  # a config group removed with ``~group``
        raise ValueError(f"invalid config: missing key {err}") from err
    except TypeError as err:  # unknown or missing keys of a spec
        raise ValueError(f"invalid config: {_one_line(err)}") from err


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


def load_experiment(
    path: Path, checked_sha256: str | None = None, components: Registry = COMPONENTS
) -> Experiment:
    """Read a resolved config saved as YAML (``experiment.yaml``) and build the experiment.

    ``checked_sha256``: the SHA-256 of the file when whoever wrote it checked its recipe
    already (``docl-flower`` does, before it starts Flower); when the file still has that
    digest the recipe is not built again, otherwise everything is checked.
    """
    data = path.read_bytes()
    cfg = OmegaConf.create(data.decode("utf-8"))
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path}: expected a mapping of config groups")
    checked = checked_sha256 is not None and hashlib.sha256(data).hexdigest() == checked_sha256
    return build_experiment(cfg, check_recipe=not checked, components=components)


def check_train_recipe(exp: Experiment) -> None:
    """Build the optimiser, scheduler and augmentation of ``exp``'s recipe once.

    Raises ``ValueError`` (one line naming the key) when a client could not build them.
    """
    with _one_line_errors():
        _check_recipe(exp.train)


#: Largest seed plus one (numpy's and torch's seeding accept 0 .. 2**32 - 1 everywhere).
SEED_LIMIT = 2**32


def _check_top_level(container: Mapping[str, object]) -> int:
    """Check the keys outside the config groups; return the seed."""
    seed = container["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in 0..{SEED_LIMIT - 1}, got {seed!r}")
    if "num_users" in container:
        check_int("num_users", container["num_users"], minimum=1)
    for key in ("run_timeout_s", "strategy_timeout_s"):
        if key in container:
            check_number(key, container[key], above=0.0)
    return seed


#: Optimiser and scheduler arguments that must be > 0, and those that must be >= 0.
_POSITIVE_ARGS = frozenset({"lr", "max_lr", "eps", "total_steps", "epochs", "steps_per_epoch"})
_NONNEGATIVE_ARGS = frozenset(
    {"weight_decay", "momentum", "rho", "dampening", "lr_decay", "initial_accumulator_value"}
    | {"pct_start", "div_factor", "final_div_factor", "base_momentum", "max_momentum"}
    | {"degrees", "translate", "scale", "shear", "alpha", "gamma", "step_size", "T_max"}
)


def _check_numbers(key: str, node: object) -> None:
    """Check every number of a component config (optimiser, scheduler, augmentation).

    Each must be finite; the arguments named in :data:`_POSITIVE_ARGS` and
    :data:`_NONNEGATIVE_ARGS` must also be in range.
    """
    if isinstance(node, Mapping):
        for name, value in node.items():
            _check_numbers(f"{key}.{name}", value)
            name = str(name)
            ranged = name in _POSITIVE_ARGS or name in _NONNEGATIVE_ARGS
            if isinstance(value, bool) or not isinstance(value, int | float):
                if ranged and not isinstance(value, list | tuple | Mapping):
                    raise ValueError(f"{key}.{name} must be a number, got {value!r}")
                continue
            if name in _POSITIVE_ARGS and not value > 0:
                raise ValueError(f"{key}.{name} must be > 0, got {value}")
            if name in _NONNEGATIVE_ARGS and not value >= 0:
                raise ValueError(f"{key}.{name} must be >= 0, got {value}")
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            _check_numbers(f"{key}[{i}]", value)
    elif isinstance(node, float) and not math.isfinite(node):
        raise ValueError(f"{key} must be a finite number, got {node}")


#: Longest image side a data set may declare.
MAX_IMAGE_SIDE = 1 << 14


def _image_shape(value: object) -> tuple[int, ...] | None:
    """``dataset.image_shape`` (checked by :func:`_check_image_shape`) as a tuple."""
    return None if value is None else tuple(int(str(s)) for s in value)  # type: ignore[attr-defined]


def _check_image_shape(value: object) -> None:
    """``dataset.image_shape``: ``[H, W]`` or ``[H, W, C]`` of positive ints (or absent)."""
    if value is None:
        return
    ok = (
        isinstance(value, list | tuple)
        and len(value) in (2, 3)
        and all(
            not isinstance(v, bool) and isinstance(v, int) and 1 <= v <= MAX_IMAGE_SIDE
            for v in value
        )
    )
    if not ok:
        raise ValueError(
            f"image_shape must be [H, W] or [H, W, C] of ints in 1..{MAX_IMAGE_SIDE}, got {value!r}"
        )


def _check_recipe(train: TrainRecipe) -> None:
    """Build what a client builds from ``train`` (optimiser, scheduler, augmentation) once.

    So that a bad learning rate or an unknown scheduler argument fails here, not on every
    client after Flower has started.
    """
    if not isinstance(train, TrainSpec):
        return
    probe = [torch.nn.Parameter(torch.zeros(1))]
    with _config_key("train.optimizer"):
        optimizer = build_optimizer(train.optimizer, probe)
    with _config_key("train.scheduler"):
        build_scheduler(train.scheduler, optimizer, total_steps=100)
    if train.augment is not None:
        with _config_key("train.augment"):
            build_augment(train.augment)


def _check_combination(
    workflow: WorkflowSpec, model: ModelSpec, train: TrainRecipe, num_classes: int
) -> None:
    """Refuse a model or recipe that the strategy's clients cannot train."""
    task = workflow.CLIENT_TASK
    if task == "docl":
        if not isinstance(model, AutoencoderSpec):
            raise ValueError(
                f"model: the DOCL strategy trains autoencoders, not a {type(model).__name__} "
                "(use model=paper)"
            )
        if not isinstance(train, TrainSpec):
            raise ValueError(
                f"train: the DOCL strategy trains autoencoders, not with {type(train).__name__} "
                "(use train=default or train=paper)"
            )
    elif task in ("classifier", "idle"):
        if isinstance(model, AutoencoderSpec):
            raise ValueError(
                "model: the baselines train a classifier, not an autoencoder "
                "(use model=mlp2nn or model=cnn)"
            )
        if not isinstance(train, SgdSpec):
            raise ValueError("train: the baselines train with SGD (use train=sgd)")
    elif task == "feature_stats":
        # Per-class statistics of the features: no model is trained on the device, so the
        # ``model`` and ``train`` groups are not used (their options live in ``strategy``).
        pass
    else:
        raise ValueError(f"strategy: unknown client task {task!r}")
    if not isinstance(model, AutoencoderSpec) and model.num_classes < num_classes:
        raise ValueError(
            f"model.num_classes must be >= dataset.num_classes ({num_classes}), "
            f"got {model.num_classes}"
        )


@dataclass(frozen=True)
class GuardCalibration:
    """``guard.target_acceptance`` and ``guard.calibration_share`` (see :mod:`.conformal`)."""

    target_acceptance: float
    calibration_share: float = DEFAULT_CALIBRATION_SHARE

    def __post_init__(self) -> None:
        _open_fraction("target_acceptance", self.target_acceptance)
        _open_fraction("calibration_share", self.calibration_share)


def _open_fraction(name: str, value: object) -> float:
    """A number in (0, 1): a target of 1 blocks nothing, a share of 1 leaves nothing to test."""
    number = check_number(name, value, above=0.0)
    if not number < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return number


def _build_guard(node: object) -> tuple[Guard, float, GuardCalibration | None]:
    """The Guard, ``max_alpha`` and the calibration to a target acceptance, if any.

    ``max_alpha`` is the loosest alpha any later check may use (see probe.py).
    """
    names = ("name", "alpha", "sided", "max_alpha", "target_acceptance", "calibration_share")
    with _config_key("guard", names):
        data = _container(node)
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown keys {unknown} (known: {list(names)})")
        name = data.get("name")
        if not isinstance(name, str) or name not in GUARDS:
            raise ValueError(f"name must be one of {sorted(GUARDS)}, got {name!r}")
        alpha = check_number("alpha", data.get("alpha"), above=0.0)
        sided = data.get("sided", "two")
        if sided not in SIDES:
            raise ValueError(f"sided must be one of {list(SIDES)}, got {sided!r}")
        max_alpha = check_number(
            "max_alpha", data.get("max_alpha", DEFAULT_MAX_ALPHA), above=0.0, maximum=MAX_ALPHA
        )
        if alpha > max_alpha:
            raise ValueError(
                f"alpha {alpha} is above max_alpha {max_alpha} (the loosest alpha the upload "
                "check judged); raise guard.max_alpha"
            )
        # The share is checked also while unused: a bad value must not wait for its day.
        share = _open_fraction(
            "calibration_share", data.get("calibration_share", DEFAULT_CALIBRATION_SHARE)
        )
        target = data.get("target_acceptance")
        calibration = None
        if target is not None:
            calibration = GuardCalibration(_open_fraction("target_acceptance", target), share)
        return make_guard(name, alpha, str(sided)), max_alpha, calibration


def _build_experiment(cfg: DictConfig, check_recipe: bool, components: Registry) -> Experiment:
    container = _container(cfg)
    seed = _check_top_level(container)
    dataset_node = _container(container["dataset"])
    dataset_cfg = {
        k: v for k, v in dataset_node.items() if k not in ("num_classes", "harmless", "image_shape")
    }
    with _config_key("dataset", ["num_classes", "image_shape"]):
        num_classes = check_int("num_classes", dataset_node.get("num_classes"), minimum=1)
        _check_image_shape(dataset_node.get("image_shape"))
    harmless_cfg = dataset_node.get("harmless")
    dataset = _as_dataset(_spec("dataset", dataset_cfg))
    harmless = None
    if isinstance(harmless_cfg, Mapping):
        harmless = _as_dataset(_spec("dataset", harmless_cfg, "dataset.harmless"))
    elif harmless_cfg not in (None, UNREGISTERED):
        raise ValueError(
            f"dataset.harmless must be a data set config, {UNREGISTERED!r} or null, "
            f"got {harmless_cfg!r}"
        )
    partition = _as_partition(_spec("partition", container["partition"]))
    with _config_key("partition", [f.name for f in dataclasses.fields(Partition)]):
        assignment = partition.assignment(num_classes)
    train_cfg = dict(_container(container["train"]))
    model_cfg = dict(_container(container["model"]))
    model = _as_model(_spec("model", model_cfg))
    train = _as_train(_spec("train", train_cfg))
    for part in ("optimizer", "scheduler", "augment"):
        _check_numbers(f"train.{part}", train_cfg.get(part))
    if check_recipe:
        _check_recipe(train)
    workflow = _as_workflow(_spec("strategy", container["strategy"], components=components))
    _check_combination(workflow, model, train, num_classes)
    features_cfg = dict(_container(container["features"]))
    guard, max_alpha, calibration = _build_guard(container["guard"])
    if calibration is not None and harmless is None and harmless_cfg != UNREGISTERED:
        raise ValueError(
            "guard.target_acceptance needs harmless images to calibrate on (dataset.harmless)"
        )
    features = _as_features(_spec("features", features_cfg))
    client_spec = ClientSpec(
        seed=seed,
        dataset=dataset,
        features=features,
        model=model,
        train=train,
        assignment={u: list(cs) for u, cs in assignment.items()},
        fraction={int(k): float(v) for k, v in partition.fraction.items()},
        extra_classes={int(k): [int(c) for c in v] for k, v in partition.extra_classes.items()},
        shards=partition.shards,
        task=str(workflow.CLIENT_TASK),
        stats=workflow.stats_spec() if isinstance(workflow, ClientStatsSpec) else None,
        image_shape=_image_shape(dataset_node.get("image_shape")),
    )
    return Experiment(
        seed=seed,
        num_classes=num_classes,
        dataset=dataset,
        harmless=harmless,
        features=features,
        partition=partition,
        model=model,
        train=train,
        guard=guard,
        max_alpha=max_alpha,
        scoring=_as(ScoringConfig, _spec("scoring", container["scoring"]), "scoring"),
        simulation=_as(SimulationSpec, _spec("simulation", container["simulation"]), "simulation"),
        client_spec=client_spec,
        assignment=assignment,
        workflow=workflow,
        config={str(k): v for k, v in container.items()},
        harmless_unregistered=harmless_cfg == UNREGISTERED,
        calibration=calibration,
    )


#: The project folder (holds ``pyproject.toml``, ``conf/`` and ``data/``).
PROJECT_ROOT = project_root()

if not OmegaConf.has_resolver("docl.project_root"):
    OmegaConf.register_new_resolver("docl.project_root", lambda: str(PROJECT_ROOT))
