"""Every setting is range-checked before anything starts.

The walk below takes every leaf of the composed config, for every option of every config
group, and puts out-of-range values in it (NaN, infinities, negatives, wrong types, empty
strings and lists, unknown names): each must fail in one line that names the key, before any
Flower or Ray process starts. Values a setting accepts on purpose are listed with the reason.
Data sets that are missing or fail their checksum, and a model that cannot fit the machine,
are found the same way.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from docl_flower.core.pipeline.config import compose_config
from docl_flower.core.pipeline.preflight import MemoryEstimate, check_memory, estimate_memory
from docl_flower.operations import main as docl_main

from .conftest import PROJECT_ROOT, processes_with

CONF = PROJECT_ROOT / "conf"
GROUPS = {
    g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in sorted(CONF.iterdir()) if g.is_dir()
}

#: (key, value) pairs a setting accepts on purpose.
ACCEPTED = {  # keyed by (key, repr(value))
    ("features.low", "-1.0"): "the lower end of a feature range may be negative (face: -0.55)",
    ("features.mean", "-1.0"): "a pixel mean to subtract; any finite value",
    ("strategy.filter_path", "'x'"): "a relative folder, created on first save",
    ("strategy.filter_path", "'no-such-thing-xyz'"): "a relative folder, created on first save",
    ("dataset.search", "['x']"): "more folders to look in; a missing one holds nothing",
    ("dataset.harmless.search", "['x']"): "more folders to look in; a missing one holds nothing",
}
#: Keys whose value names files: a bad value fails with the data set's own message, which
#: shows the value (the path it looked in) instead of the key.
DATA_LOCATIONS = ("data_root", "dataset.root", "dataset.filename", "dataset.name", "dataset.search")
DATA_LOCATIONS += tuple(f"dataset.harmless.{k}" for k in ("root", "name", "search"))


#: Options that only compose into a runnable experiment together with others.
COMPANIONS = {
    "model=cnn": ["strategy=fedavg", "model=cnn"],
    "model=mlp2nn": ["strategy=fedavg"],
    "train=sgd": ["strategy=fedavg"],
    "partition=two_classes_per_user": ["partition=two_classes_per_user", "num_users=5"],
}


def _overrides(option: str) -> list[str]:
    return COMPANIONS.get(option, [option])


def _leaves(node: object, path: tuple[str, ...] = ()) -> Iterator[tuple[str, object]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, str(key)))
    elif path and path[-1] not in ("_target_", "_partial_"):
        yield ".".join(path), node


def _bad_values(value: object) -> list[object]:
    if isinstance(value, bool):
        return ["maybe", 2]
    if isinstance(value, int):
        return [-1, math.nan, "x", True]
    if isinstance(value, float):
        return [math.nan, math.inf, -math.inf, -1.0, "x"]
    if isinstance(value, str):
        return ["", "no-such-thing-xyz", 5]
    if isinstance(value, list):
        return ["x", ["x"], [-1]]
    if value is None:
        return ["x", -1]
    return []


def _preflight(cfg: DictConfig) -> None:
    """What ``docl-flower`` checks before it starts any process (the recipe built too)."""
    exp = docl_main.build_experiment(cfg, check_recipe=True)
    docl_main.check_data(exp)
    docl_main.check_memory(exp, docl_main.clients_at_once(exp))


def _usable_bases() -> dict[str, DictConfig]:
    """Every option's config that passes the checks (some lack only their data set here)."""
    bases = {}
    for group, options in GROUPS.items():
        for option in options:
            override = f"{group}={option}"
            cfg = compose_config(_overrides(override))
            try:
                _preflight(cfg)
            except ValueError as err:  # fashion_mnist, cifar10: training data not shipped
                assert str(err).startswith("dataset"), (override, str(err))
                continue
            bases[override] = cfg
    return bases


def _cases(bases: dict[str, DictConfig]) -> list[tuple[str, str, object]]:
    """(option, key, bad value): each key once, in the first usable option that has it."""
    seen: set[str] = set()
    cases = []
    for override, cfg in bases.items():
        for key, value in _leaves(OmegaConf.to_container(cfg, resolve=True)):
            if key in seen:
                continue
            seen.add(key)
            for bad in _bad_values(value):
                if (key, repr(bad)) not in ACCEPTED:
                    cases.append((override, key, bad))
    return cases


def test_every_leaf_of_every_option_refuses_out_of_range_values(monkeypatch):
    # Prepare
    monkeypatch.setenv("DOCL_DATA_ROOT", str(PROJECT_ROOT / "data"))
    bases = _usable_bases()
    cases = _cases(bases)
    failures = []
    # Execute: each bad value alone in an otherwise good config.
    for override, key, bad in cases:
        cfg = copy.deepcopy(bases[override])
        OmegaConf.update(cfg, key, bad, force_add=True)
        try:
            _preflight(cfg)
        except ValueError as err:
            message = str(err)
            named = key in message or key.rsplit(".", 1)[-1] in message
            shows_value = key in DATA_LOCATIONS and str(bad) in message
            if "\n" in message or not (named or shows_value):
                failures.append(f"{override} {key}={bad!r}: {message[:200]}")
        except Exception as err:  # anything else is a crash, not a refusal
            failures.append(f"{override} {key}={bad!r}: {type(err).__name__}: {err}")
        else:
            failures.append(f"{override} {key}={bad!r}: accepted")
    # Assert: every bad value refused in one line naming its key; the walk covered the config.
    assert not failures, "\n".join(failures)
    assert len(bases) >= 25 and len(cases) >= 380, (len(bases), len(cases))


def test_a_model_that_cannot_fit_is_refused_with_the_estimate():
    exp = docl_main.build_experiment(compose_config(["model.hidden=100000000"]), check_recipe=False)
    est = estimate_memory(exp, 2)
    assert isinstance(est, MemoryEstimate) and est.parameters == 2 * 784 * 10**8 + 784 + 10**8
    with pytest.raises(ValueError, match=r"model.hidden: the model does not fit .* GB"):
        check_memory(exp, 2, available=24 * 10**9)
    small = docl_main.build_experiment(compose_config([]), check_recipe=False)
    check_memory(small, 2, available=24 * 10**9)  # the default run fits


def test_nothing_is_started_when_a_setting_is_refused(tmp_path, monkeypatch):
    # Prepare: starting anything would call run_app.
    def started(**_kwargs: object) -> None:
        raise AssertionError("run_app was called")

    monkeypatch.setattr(docl_main, "run_app", started)
    for overrides in (["strategy.max_block_share=5"], ["model.hidden=100000000"]):
        # Execute / Assert
        with pytest.raises(ValueError):
            docl_main.run_experiment(compose_config(overrides), tmp_path / "run")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["strategy.max_block_share=5"], "docl-flower: strategy.max_block_share must be"),
        (["model.hidden=100000000"], "docl-flower: model.hidden: the model does not fit"),
        (
            ["dataset=fashion_mnist", "dataset.download=false"],
            "docl-flower: dataset (train split): fashion-mnist: train-images-idx3-ubyte.gz",
        ),
    ],
)
def test_the_command_refuses_in_one_line_within_10_s_and_starts_nothing(
    tmp_path, overrides, expected
):
    # Prepare: the real console script; a marker in its environment finds its processes.
    marker = f"DOCL_FLOWER_TEST_MARK={tmp_path.name}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    env["DOCL_FLOWER_FILTER_KEY"] = str(tmp_path / "key")
    cli = Path(sys.executable).parent / "docl-flower"
    # Execute
    start = time.monotonic()
    proc = subprocess.run(
        [str(cli), *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - start
    # Assert
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert elapsed < 10, elapsed
    assert processes_with(marker, settle_s=0.5) == []
    assert not (tmp_path / "run" / "experiment.yaml").exists()
