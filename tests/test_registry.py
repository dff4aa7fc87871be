"""Nothing is imported or called by a name from a message, a config or a saved filter."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from docl_flower.core import components
from docl_flower.core.config import ClientSpec
from docl_flower.core.model import AutoencoderSpec, TrainSpec, train_autoencoder
from docl_flower.core.registry import UnknownComponentError
from docl_flower.federation import keys
from docl_flower.federation.client_tasks import TASKS, handle_train

from .test_client import _spec


def hostile_nodes(tmp_path):
    """Config nodes naming code that must never run, each with the trace it would leave."""
    target = tmp_path / "pwned"
    return target, [
        {"_target_": "builtins.open", "file": str(target), "mode": "w"},
        {"_target_": "os.system", "command": f"touch {target}"},
        {"_target_": "shutil.copyfile", "src": __file__, "dst": str(target)},
        {"_target_": "subprocess.run", "args": ["touch", str(target)]},
    ]


@pytest.mark.parametrize("group", ["features", "dataset", "model", "train", "optimizer", "augment"])
def test_unregistered_names_are_refused_in_every_group(tmp_path, group):
    target, nodes = hostile_nodes(tmp_path)
    for node in nodes:
        with pytest.raises(UnknownComponentError, match="not a registered component"):
            components.build(group, node)
        with pytest.raises(UnknownComponentError):
            components.build(group, {**node, "_partial_": True})
    assert not target.exists()


def test_registered_names_still_build():
    assert isinstance(
        components.build("model", {"_target_": "docl_flower.core.model.AutoencoderSpec"}),
        AutoencoderSpec,
    )
    make = components.build(
        "optimizer", {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}
    )
    assert callable(make)


def _message(spec: ClientSpec) -> RecordDict:
    return RecordDict({keys.CONFIG_RECORD: ConfigRecord({keys.SPEC: spec.to_json()})})


def test_a_message_naming_a_task_outside_the_registry_is_refused(tiny_root, tmp_path):
    target, _ = hostile_nodes(tmp_path)
    for task in ("os.system", "builtins.open", "docl_flower.federation.client_tasks.train_docl"):
        spec = dataclasses.replace(_spec(tiny_root), task=task)
        with pytest.raises(ValueError, match="unknown task"):
            handle_train(_message(spec), {"partition-id": 0})
    assert sorted(TASKS) == ["classifier", "docl", "feature_stats", "idle"]
    assert not target.exists()


@pytest.mark.parametrize("field", ["features", "dataset", "model", "train"])
def test_a_message_naming_code_in_a_component_is_refused_before_it_runs(tiny_root, tmp_path, field):
    target, nodes = hostile_nodes(tmp_path)
    for node in nodes:
        spec = dataclasses.replace(_spec(tiny_root), **{field: node})
        with pytest.raises(ValueError, match="not a registered component"):
            handle_train(_message(spec), {"partition-id": 0})
    assert not target.exists()


def test_an_optimizer_named_by_a_message_is_looked_up_not_imported(tmp_path):
    target, nodes = hostile_nodes(tmp_path)
    for node in nodes:
        with pytest.raises(ValueError):
            recipe = TrainSpec(epochs=1, batch_size=4, optimizer={**node, "_partial_": True})
            train_autoencoder(torch.rand(8, 6), AutoencoderSpec(hidden=2), recipe, 0)
    assert not target.exists()
