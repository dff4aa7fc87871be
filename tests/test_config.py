from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from docl_flower.core.config import ClientSpec, build_experiment

from .conftest import PROJECT_ROOT

CONF = PROJECT_ROOT / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_option_composes_and_builds(group, option):
    overrides = [f"{group}={option}"]
    if group == "partition" and option != "one_class_per_user":
        overrides.append("num_users=5")
    exp = build_experiment(_compose(overrides))
    assert exp.assignment
    # What a client receives round-trips through JSON to the same typed objects.
    spec = ClientSpec.from_json(exp.client_spec.to_json())
    assert spec.model_spec() == exp.model and spec.train_spec() == exp.train


def test_command_line_overrides_reach_the_typed_objects():
    exp = build_experiment(_compose(["model.hidden=64", "guard.alpha=1.25", "num_users=5"]))
    assert exp.model.hidden == 64
    assert exp.guard.alpha == 1.25
    assert exp.assignment == {u: (u,) for u in range(5)}
    assert Path(exp.dataset.root).is_dir()


def test_invalid_configs_fail_before_any_run():
    with pytest.raises(ValueError):
        build_experiment(_compose(["num_users=11"]))
    with pytest.raises(ValueError):
        build_experiment(_compose(["guard.alpha=0"]))
    with pytest.raises(ValueError):
        build_experiment(_compose(["train.epochs=0"]))


def test_gpu_clients_on_a_machine_without_cuda_fail_with_a_clear_error():
    from docl_flower.operations.main import check_resources

    check_resources(0.0, cuda_available=False)
    check_resources(0.5, cuda_available=True)
    with pytest.raises(ValueError, match="no CUDA device"):
        check_resources(0.25, cuda_available=False)
