"""What a client receives: the typed spec the server checked, as a versioned, schema-checked record.

The server builds a :class:`ClientSpec` once, from the checked config
(:func:`~docl_flower.core.pipeline.config.build_experiment`): its data set, extractor, model and
training recipe are the typed objects the config was mapped to, not config dicts. It travels
in the train message as one JSON record (:meth:`ClientSpec.to_json`) that names its schema and
version; each component is written from the typed object as its registered name
(``_target_``) and every one of its fields. The client (:meth:`ClientSpec.from_json`) checks
the record against that schema, the exact set of keys, the registered names and the plain
field types, and rebuilds the same objects; nothing is parsed from a config again, and
``ClientSpec.from_json(spec.to_json()) == spec``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from docl_flower.core.baselines.classifiers import ClassifierSpec, Cnn, Mlp2NN, SgdSpec
from docl_flower.core.baselines.fedpft import StatsSpec
from docl_flower.core.common.checks import check_int, check_number
from docl_flower.core.common.registry import Registry
from docl_flower.core.data.base import ImageDataset
from docl_flower.core.data.catalog import as_image_dataset
from docl_flower.core.data.partitions import Partition, class_indices, user_class_indices
from docl_flower.core.features.extractors import FeatureExtractor
from docl_flower.core.filter.global_filter import ScoringConfig
from docl_flower.core.pipeline.components import COMPONENTS
from docl_flower.core.training.autoencoder import AutoencoderSpec, TrainSpec

#: What the ``model`` group builds: DOCL's autoencoder or a baseline's classifier.
ModelSpec = AutoencoderSpec | ClassifierSpec
#: What the ``train`` group builds: DOCL's recipe or the baselines' SGD.
TrainRecipe = TrainSpec | SgdSpec

#: The record's name: a train message whose spec is anything else is refused.
SCHEMA = "docl-flower/client-spec"
#: The record's layout. 2: typed components written from the objects (1 carried config dicts);
#: 3: the data set's ``image_shape`` (a device's own photos are read at that shape).
VERSION = 3
#: The record's keys besides the components.
_PLAIN_KEYS = frozenset(
    {"schema", "version", "seed", "assignment", "fraction", "extra_classes", "shards", "task"}
    | {"image_shape"}
)
#: Config group of each component the record carries.
_GROUPS = {"dataset": "dataset", "features": "features", "model": "model", "train": "train"}

#: Lower bounds of integer fields whose classes do not name the field when they reject it.
MINIMUM: dict[object, dict[str, int]] = {
    ScoringConfig: {"chunk_images": 1, "chunk_models": 1},
    Partition: {"num_users": 1, "classes_per_user": 1},
}


def check_fields(make: object, data: Mapping[str, object]) -> None:
    """Check the plain-typed fields of a dataclass component before it is built.

    ``int`` fields need an int (not a bool, not a float), ``float`` fields a finite number,
    ``bool`` fields a bool and ``str`` fields a string; :data:`MINIMUM` adds lower bounds.
    Messages start with the field name.
    """
    if not (isinstance(make, type) and dataclasses.is_dataclass(make)):
        return
    bounds = MINIMUM.get(make, {})
    for f in dataclasses.fields(make):
        if f.name not in data:
            continue
        value = data[f.name]
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if kind == "int":
            check_int(f.name, value, bounds.get(f.name))
        elif kind == "float":
            check_number(f.name, value)
        elif kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"{f.name} must be true or false, got {value!r}")
        elif kind == "str" and not isinstance(value, str):
            raise ValueError(f"{f.name} must be a string, got {value!r}")


def _plain(value: object) -> object:
    """A field's value as JSON data (nested specs as their fields, tuples as lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def component_record(group: str, obj: object, components: Registry = COMPONENTS) -> dict[str, Any]:
    """``obj`` as its registered name (``_target_``) and every field it was built with."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"{group}: a {type(obj).__name__} is not a typed spec")
    record = _plain(obj)
    assert isinstance(record, dict)
    return {"_target_": components.name_of(group, type(obj)), **record}


_T = TypeVar("_T")


def _built(kind: type[_T] | tuple[type, ...], group: str, node: object, registry: Registry) -> Any:
    """Rebuild a component from its record: exact keys, registered name, plain field types."""
    if not isinstance(node, Mapping):
        raise ValueError(f"client spec: {group} must be a record, got {type(node).__name__}")
    make = registry.factory(group, node.get("_target_"))
    if not (isinstance(make, type) and dataclasses.is_dataclass(make)):
        raise ValueError(f"client spec: {group} {node.get('_target_')!r} is not a typed spec")
    names = {f.name for f in dataclasses.fields(make) if f.init}
    keys = set(node) - {"_target_"}
    if keys != names:
        raise ValueError(
            f"client spec: {group} record has keys {sorted(keys)}, its schema {sorted(names)}"
        )
    fields = {k: v for k, v in node.items() if k != "_target_"}
    try:
        check_fields(make, fields)
        obj = make(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"client spec: {group}.{err}") from err
    if not isinstance(obj, kind):
        raise ValueError(f"client spec: {group} built a {type(obj).__name__}")
    return obj


def _int_keys(name: str, raw: object) -> dict[int, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"client spec: {name} must be a mapping, got {type(raw).__name__}")
    try:
        return {int(k): v for k, v in raw.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"client spec: {name} keys must be user ids ({err})") from err


@dataclass(frozen=True)
class ClientSpec:
    """Everything a client needs to train its upload, typed (see the module docstring).

    ``stats``: the options of the ``feature_stats`` task (``None`` for every other task).
    """

    seed: int
    dataset: ImageDataset
    features: FeatureExtractor
    model: ModelSpec
    train: TrainRecipe
    assignment: dict[int, list[int]]
    fraction: dict[int, float] = field(default_factory=dict)
    extra_classes: dict[int, list[int]] = field(default_factory=dict)
    shards: int = 0
    task: str = "docl"
    stats: StatsSpec | None = None
    #: ``dataset.image_shape`` of the config (``None``: the data set's own, read from its files).
    image_shape: tuple[int, ...] | None = None

    def to_record(self, components: Registry = COMPONENTS) -> dict[str, Any]:
        """The record that travels: schema, version, plain fields and typed components."""
        record: dict[str, Any] = {
            "schema": SCHEMA,
            "version": VERSION,
            "seed": self.seed,
            "assignment": {str(k): list(v) for k, v in self.assignment.items()},
            "fraction": {str(k): v for k, v in self.fraction.items()},
            "extra_classes": {str(k): list(v) for k, v in self.extra_classes.items()},
            "shards": self.shards,
            "task": self.task,
            "stats": None if self.stats is None else _plain(self.stats),
            "image_shape": None if self.image_shape is None else list(self.image_shape),
        }
        for name, group in _GROUPS.items():
            record[name] = component_record(group, getattr(self, name), components)
        return record

    def to_json(self) -> str:
        """:meth:`to_record` as JSON (keys sorted)."""
        return json.dumps(self.to_record(), sort_keys=True)

    @classmethod
    def from_record(cls, raw: object, components: Registry = COMPONENTS) -> ClientSpec:
        """Check a record against the schema and rebuild the typed spec; ``ValueError`` if not."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"client spec: expected a record, got {type(raw).__name__}")
        if raw.get("schema") != SCHEMA or raw.get("version") != VERSION:
            raise ValueError(
                f"client spec: schema {raw.get('schema')!r} version {raw.get('version')!r}; "
                f"this client reads {SCHEMA!r} version {VERSION} (server and clients must run "
                "the same docl-flower)"
            )
        expected = _PLAIN_KEYS | set(_GROUPS) | {"stats"}
        if set(raw) != expected:
            raise ValueError(
                f"client spec: keys {sorted(map(str, raw))}, the schema's {sorted(expected)}"
            )
        stats = raw["stats"]
        if stats is not None and not isinstance(stats, Mapping):
            raise ValueError("client spec: stats must be a record or null")
        task = raw["task"]
        if not isinstance(task, str):
            raise ValueError(f"client spec: task must be a name, got {task!r}")
        shape = raw["image_shape"]
        if shape is not None and not (
            isinstance(shape, list) and len(shape) in (2, 3) and all(type(s) is int for s in shape)
        ):
            raise ValueError(f"client spec: image_shape must be [H, W] or [H, W, C], got {shape!r}")
        try:
            return cls(
                seed=check_int("seed", raw["seed"], 0),
                dataset=as_image_dataset(
                    _built(object, "dataset", raw["dataset"], components), "dataset"
                ),
                features=_built(FeatureExtractor, "features", raw["features"], components),
                model=_built((AutoencoderSpec, Mlp2NN, Cnn), "model", raw["model"], components),
                train=_built((TrainSpec, SgdSpec), "train", raw["train"], components),
                assignment={
                    u: [check_int("class", c, 0) for c in cs]
                    for u, cs in _int_keys("assignment", raw["assignment"]).items()
                },
                fraction={
                    u: check_number("fraction", f, above=0.0, maximum=1.0)
                    for u, f in _int_keys("fraction", raw["fraction"]).items()
                },
                extra_classes={
                    u: [check_int("class", c, 0) for c in cs]
                    for u, cs in _int_keys("extra_classes", raw["extra_classes"]).items()
                },
                shards=check_int("shards", raw["shards"], 0),
                task=task,
                stats=None if stats is None else StatsSpec(**stats),
                image_shape=None
                if shape is None
                else tuple(check_int("image_shape", s, 1) for s in shape),
            )
        except TypeError as err:  # a list where a number belongs, unknown stats keys
            raise ValueError(f"client spec: {err}") from err

    @classmethod
    def from_json(cls, text: str) -> ClientSpec:
        """Parse and check what :meth:`to_json` wrote (``ValueError`` for anything else)."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"client spec: not JSON ({err})") from err
        return cls.from_record(raw)

    def with_data_root(self, root: str | None) -> ImageDataset:
        """The training data set, read from a node-local folder when ``root`` is given."""
        if root is None:
            return self.dataset
        if not dataclasses.is_dataclass(self.dataset) or isinstance(self.dataset, type):
            raise TypeError(f"{type(self.dataset).__name__} is not a typed data set")
        return as_image_dataset(dataclasses.replace(self.dataset, root=root))

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
