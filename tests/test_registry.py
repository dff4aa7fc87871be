"""Nothing is imported or called by a name from a message, a config or a saved filter."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from docl_flower.core.common.registry import UnknownComponentError
from docl_flower.core.pipeline import components
from docl_flower.core.pipeline.client_spec import ClientSpec
from docl_flower.core.training.autoencoder import AutoencoderSpec, TrainSpec, train_autoencoder
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


def _message(spec: ClientSpec | dict) -> RecordDict:
    text = spec.to_json() if isinstance(spec, ClientSpec) else json.dumps(spec)
    return RecordDict({keys.CONFIG_RECORD: ConfigRecord({keys.SPEC: text})})


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
        record = {**_spec(tiny_root).to_record(), field: node}  # a hostile server's record
        with pytest.raises(ValueError, match="not a registered component"):
            handle_train(_message(record), {"partition-id": 0})
    assert not target.exists()


def test_an_optimizer_named_by_a_message_is_looked_up_not_imported(tmp_path):
    target, nodes = hostile_nodes(tmp_path)
    for node in nodes:
        with pytest.raises(ValueError):
            recipe = TrainSpec(epochs=1, batch_size=4, optimizer={**node, "_partial_": True})
            train_autoencoder(torch.rand(8, 6), AutoencoderSpec(hidden=2), recipe, 0)
    assert not target.exists()


def test_workflows_are_named_in_one_table_and_importing_them_registers_nothing():
    # Prepare: a fresh interpreter imports every workflow module, then looks at the tables.
    import subprocess
    import sys

    code = (
        "import docl_flower.federation.workflows.docl, docl_flower.federation.workflows.baselines\n"
        "import docl_flower.federation.workflows.feature_stats\n"
        "from docl_flower.core.pipeline.components import COMPONENTS as core\n"
        "print(core.names('strategy'))\n"
        "from docl_flower.federation.components import COMPONENTS, WORKFLOWS\n"
        "print(sorted(WORKFLOWS) == COMPONENTS.names('strategy'), core.names('strategy'))\n"
    )

    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    # Assert: the core's table stays without workflows; the Flower layer's has all four.
    assert out.stdout.split("\n")[:2] == ["[]", "True []"]


def test_a_core_build_of_a_whole_run_names_where_the_workflows_are():
    from docl_flower.core.pipeline.config import build_experiment, compose_config
    from docl_flower.federation.components import COMPONENTS, WORKFLOWS

    cfg = compose_config()
    with pytest.raises(ValueError, match=r"docl_flower\.federation\.components\.COMPONENTS"):
        build_experiment(cfg, check_recipe=False)
    exp = build_experiment(cfg, check_recipe=False, components=COMPONENTS)
    assert type(exp.workflow) in WORKFLOWS.values()


def test_extending_a_registry_refuses_a_name_given_twice():
    from docl_flower.core.common.registry import Registry

    base = Registry({"model": {"a": dict}})
    both = base.extended({"model": {"b": list}, "strategy": {"s": set}})
    assert both.names("model") == ["a", "b"] and base.names("model") == ["a"]
    with pytest.raises(ValueError, match=r"names registered twice: \['a'\]"):
        base.extended({"model": {"a": list}})
