import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from docl_flower.core.pipeline.client_spec import ClientSpec
from docl_flower.federation.components import build_experiment

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
    if (group, option) in {("model", "mlp2nn"), ("model", "cnn"), ("train", "sgd")}:
        overrides.append("strategy=fedavg")  # the baselines' parts; DOCL refuses them
    exp = build_experiment(_compose(overrides))
    assert exp.assignment
    # What a client receives round-trips through JSON to the same typed objects.
    spec = ClientSpec.from_json(exp.client_spec.to_json())
    assert spec == exp.client_spec
    assert spec.model == exp.model and spec.train == exp.train and spec.dataset == exp.dataset


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


# Each bad value, and the config key its one-line message must start with.
BAD_VALUES = [
    (["model.hidden=0"], "model.hidden"),
    (["model.hidden=-5"], "model.hidden"),
    (["model.hidden=abc"], "model.hidden"),
    (["model.hidden=2.5"], "model.hidden"),
    (["model.hidden=true"], "model.hidden"),
    (["model.init=xavier"], "model.init"),
    (["train.epochs=0"], "train.epochs"),
    (["train.epochs=1.5"], "train.epochs"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.batch_size=abc"], "train.batch_size"),
    (["train.min_steps=-1"], "train.min_steps"),
    (["train.num_threads=-1"], "train.num_threads"),
    (["train.num_threads=2.5"], "train.num_threads"),
    (["train.optimizer.lr=-1"], "train.optimizer.lr"),
    (["train.optimizer.lr=inf"], "train.optimizer.lr"),
    (["strategy.max_block_share=5"], "strategy.max_block_share"),
    (["strategy.probe_noise=-5"], "strategy.probe_noise"),
    (["strategy.probe_images=0", "strategy.probe_noise=0"], "strategy.probe_images"),
    (["strategy.timeout_s=-1"], "strategy.timeout_s"),
    (["strategy.node_wait_s=1e12"], "strategy.node_wait_s"),
    (["strategy.bindings_path=no-such-bindings.json"], "strategy.bindings_path"),
    (["guard.alpha=2.5"], "guard.alpha"),
    (["guard.max_alpha=0"], "guard.max_alpha"),
    (["guard.max_alpha=1e9"], "guard.max_alpha"),
    (["+train.optimizer.bogus=1"], "train.optimizer"),
    (["strategy=fedavg", "train.lr=0"], "train.lr"),
    (["strategy=fedavg", "train.lr=-0.1"], "train.lr"),
    (["strategy=fedavg", "train.lr=nan"], "train.lr"),
    (["strategy=fedavg", "train.lr=inf"], "train.lr"),
    (["strategy=fedavg", "train.lr=abc"], "train.lr"),
    (["strategy=fedavg", "train.lr=true"], "train.lr"),
    (["strategy=fedavg", "train.momentum=-0.5"], "train.momentum"),
    (["strategy=fedavg", "train.momentum=nan"], "train.momentum"),
    (["strategy=fedavg", "train.epochs=0"], "train.epochs"),
    (["strategy=fedavg", "train.batch_size=2.5"], "train.batch_size"),
    (["strategy=fedavg", "model.hidden=0"], "model.hidden"),
    (["strategy=fedavg", "model.num_classes=5"], "model.num_classes"),
    (["strategy=fedavg", "model=cnn", "model.image_shape=[2,2]"], "model.image_shape"),
    (["strategy=fedavg", "model=cnn", "model.num_classes=abc"], "model.num_classes"),
    (["model=mlp2nn"], "model"),
    (["train=sgd"], "train"),
    (["simulation.num_cpus=0"], "simulation.num_cpus"),
    (["simulation.num_cpus=-1"], "simulation.num_cpus"),
    (["simulation.num_cpus=inf"], "simulation.num_cpus"),
    (["simulation.num_cpus=nan"], "simulation.num_cpus"),
    (["simulation.num_cpus=abc"], "simulation.num_cpus"),
    (["simulation.num_gpus=-1"], "simulation.num_gpus"),
    (["simulation.num_gpus=inf"], "simulation.num_gpus"),
    (["simulation.num_gpus=true"], "simulation.num_gpus"),
    (["guard.alpha=0"], "guard.alpha"),
    (["guard.alpha=-1"], "guard.alpha"),
    (["guard.alpha=nan"], "guard.alpha"),
    (["guard.alpha=inf"], "guard.alpha"),
    (["guard.alpha=abc"], "guard.alpha"),
    (["guard.alpha=true"], "guard.alpha"),
    (["guard.name=lenient"], "guard.name"),
    (["scoring.chunk_images=0"], "scoring.chunk_images"),
    (["scoring.chunk_images=2.5"], "scoring.chunk_images"),
    (["scoring.chunk_models=0"], "scoring.chunk_models"),
    (["scoring.chunk_models=abc"], "scoring.chunk_models"),
    (["scoring.kernel=cuda"], "scoring.kernel"),
    (["num_users=0"], "num_users"),
    (["num_users=-3"], "num_users"),
    (["num_users=abc"], "num_users"),
    (["num_users=2.5"], "num_users"),
    (["num_users=true"], "num_users"),
    (["num_users=11"], "partition.num_users"),
    (["partition.num_users=0"], "partition.num_users"),
    (
        ["partition=two_classes_per_user", "partition.classes_per_user=0"],
        "partition.classes_per_user",
    ),
    (["partition=two_classes_per_user", "num_users=6"], "partition.num_users"),
    (["num_users=2", "partition.user_classes=[[0],[12]]"], "partition.user_classes"),
    (["num_users=2", "partition.user_classes=[[0],[0]]"], "partition.user_classes"),
    (["num_users=3", "partition.user_classes=[[0],[1]]"], "partition.user_classes"),
    (["seed=-1"], "seed"),
    (["seed=abc"], "seed"),
    (["seed=1.5"], "seed"),
    (["seed=true"], "seed"),
    (["dataset.num_classes=0"], "dataset.num_classes"),
    (["run_timeout_s=0"], "run_timeout_s"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_values_fail_with_one_line_naming_the_key(overrides, key):
    # Prepare
    cfg = _compose(overrides)
    # Execute
    with pytest.raises(ValueError) as err:
        build_experiment(cfg)
    # Assert: one line that starts with the key (``key.field ...`` or ``key: ...``).
    message = str(err.value)
    assert re.match(rf"{re.escape(key)}([ :=]|$)", message), message
    assert "\n" not in message


def test_good_values_next_to_the_bad_ones_still_build():
    exp = build_experiment(
        _compose(
            [
                "model.hidden=1",
                "train.num_threads=0",
                "simulation.num_cpus=0.5",
                "simulation.num_gpus=0",
                "guard.alpha=1e-3",
                "seed=4294967295",
            ]
        )
    )
    assert exp.model.hidden == 1 and exp.simulation.num_cpus == 0.5 and exp.seed == 2**32 - 1


def test_a_bad_value_on_the_command_line_fails_in_one_line_before_flower_starts(tmp_path):
    # Prepare: the real console script, its Hydra run folder in tmp_path.
    cli = Path(sys.executable).parent / "docl-flower"
    # Execute
    start = time.monotonic()
    proc = subprocess.run(
        [str(cli), "model.hidden=0", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    # Assert: non-zero exit, one line naming the key, no traceback, Flower never started.
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode != 0
    assert output.splitlines() == ["docl-flower: model.hidden must be >= 1, got 0"], output
    assert "Traceback" not in output and "flwr run" not in output
    assert elapsed < 30
