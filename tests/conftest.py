"""Shared fixtures: small synthetic autoencoders and a tiny MNIST-format data set."""

from __future__ import annotations

import gzip
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from docl_flower.core.data.idx import IdxDataset
from docl_flower.core.filter.global_filter import Registration
from docl_flower.core.training.autoencoder import AutoencoderSpec
from docl_flower.operations.processes import process_table

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: ``make test`` runs the suite in two phases. First two pytest sessions side by side, one per
#: core: the tests marked ``serial`` one after another (Flower's managed SuperLink on its fixed
#: ports, Ray heads, tests that time real processes: a command refused "within 10 s", a
#: SIGKILLed run cleaned up "within 10 s"), and the rest of the suite, whose Flower runs
#: (:data:`FIRST`) come first. Then the tests marked ``alone`` (:data:`ALONE`), by themselves:
#: the deployment fault test, whose SuperLink database was "locked" and whose replies were
#: lost in transport on a busy machine. Entries are files, or ``file::test`` for one test.
SERIAL = (
    # the longest first
    "test_flwr_run.py",
    "test_e2e.py::test_a_multirun_runs_each_job_as_one_flower_run_that_writes_its_results",
    "test_startup.py",  # shares the multirun above (a session fixture)
    "test_signals.py",
    "test_ray_cluster.py",
    "test_filter_lock.py",
    "test_settings.py",
    "test_hostile_files.py",
    "test_config.py::test_a_bad_value_on_the_command_line_fails_in_one_line_before_flower_starts",
    "test_features.py::test_two_processes_asking_at_once_compute_once",
    "test_serve.py::test_the_command_serves_over_tls_and_drains_requests_in_flight_on_sigterm",
)
#: Flower runs of the other session, first in it (they take about as long as the serial ones).
FIRST = ("test_e2e.py", "test_feature_stats_e2e.py")
#: Run by themselves, after both sessions.
ALONE = ("test_faults.py",)

# CI (.ci/run) draws the same hypothesis examples every time, so that a run lands or fails on
# the code, not on the draw; a local `make test` draws new ones (and replays saved failures).
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("DOCL_FLOWER_HYPOTHESIS_PROFILE", "default"))


def random_registration(
    rng: np.random.Generator, user: int, label: int, dim: int = 20, hidden: int = 4
) -> Registration:
    shapes = AutoencoderSpec(hidden=hidden).shapes(dim)
    params = {k: rng.normal(0, 0.5, size=s).astype(np.float32) for k, s in shapes.items()}
    return Registration(user, label, params, err_mean=1.0 + user, err_std=0.5, num_examples=10)


def trained_registration(
    x, user: int, label: int, epochs: int, seed: int = 0, hidden: int = 8, std_scale: float = 1.0
) -> Registration:
    """A small autoencoder trained on ``x`` with its error statistics."""
    from docl_flower.core.training.autoencoder import (
        TrainSpec,
        error_stats,
        reconstruction_errors,
        state_to_numpy,
        train_autoencoder,
    )

    model, _ = train_autoencoder(
        x, AutoencoderSpec(hidden=hidden), TrainSpec(epochs=epochs, batch_size=16), seed
    )
    mu, sd = error_stats(reconstruction_errors(model, x))
    return Registration(user, label, state_to_numpy(model), mu, std_scale * sd, len(x))


def processes_with(marker: str, settle_s: float = 5.0) -> list[int]:
    """Live processes whose environment holds ``marker`` (``NAME=value``), after a grace.

    Waits up to ``settle_s`` for them to go (a killed process is gone once reaped).
    """
    needle = marker.encode()
    deadline = time.monotonic() + settle_s
    while True:
        found = []
        for pid, info in process_table().items():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if not info.dead and needle in environ.split(b"\0"):
                found.append(pid)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a gzip IDX file (uint8 data)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_tiny_root(
    root: Path,
    per_class: int = 60,
    test_per_class: int = 30,
    classes: tuple[int, ...] = tuple(range(10)),
) -> Path:
    """A small MNIST/Fashion-MNIST copy (first images of each class of the real data)."""
    for name in ("mnist", "fashion-mnist"):
        src = IdxDataset(name, str(PROJECT_ROOT / "data" / name))
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        splits = (
            {"test": test_per_class}
            if name == "fashion-mnist"
            else {"train": per_class, "test": test_per_class}
        )
        for split, count in splits.items():
            images, labels = src.load(split)  # type: ignore[arg-type]
            keep = np.concatenate([np.flatnonzero(labels == c)[:count] for c in classes])
            prefix = "train" if split == "train" else "t10k"
            write_idx(out / f"{prefix}-images-idx3-ubyte.gz", images[keep])
            write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", labels[keep])
    return root


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_root(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(autouse=True, scope="session")
def _filter_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests sign saved filters with a key of their own, never the user's real key file.

    Set in ``os.environ`` for the whole session (module fixtures save filters too), so the
    subprocesses of a test (``docl-flower``, Flower, the ServerApp) use the same key.
    """
    key_dir = tmp_path_factory.mktemp("filter-key")
    before = os.environ.get("DOCL_FLOWER_FILTER_KEY")
    os.environ["DOCL_FLOWER_FILTER_KEY"] = str(key_dir / "filter.key")
    yield
    if before is None:
        os.environ.pop("DOCL_FLOWER_FILTER_KEY", None)
    else:
        os.environ["DOCL_FLOWER_FILTER_KEY"] = before


@dataclass(frozen=True)
class Multirun:
    """One ``docl-flower -m`` sweep and what it printed (see the ``multirun`` fixture)."""

    proc: subprocess.CompletedProcess[str]
    sweep: Path
    marker: str


@pytest.fixture(scope="session")
def multirun(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Multirun:
    """``docl-flower -m ... guard.alpha=1.0,2.0``: two jobs of 3 users, each one Flower run.

    Run once per session and shared by the tests that read what a run writes (each full
    run costs 20-40 s). Every process of the runs has ``DOCL_TEST_MARKER=<marker>`` in its
    environment.
    """
    from .test_e2e import run_cli, small_run_args

    marker = uuid.uuid4().hex
    sweep = tmp_path_factory.mktemp("multirun") / "sweep"
    args = [a for a in small_run_args(tiny_root, sweep.parent / "unused") if "hydra" not in a]
    proc = run_cli(
        "-m",
        *args,
        "guard.alpha=1.0,2.0",
        f"hydra.sweep.dir={sweep}",
        timeout=600,
        env={"DOCL_TEST_MARKER": marker},
    )
    return Multirun(proc, sweep, marker)


def _entry_rank(item: pytest.Item, entries: tuple[str, ...]) -> int | None:
    """Position in ``entries`` of the entry naming ``item`` (None: none names it)."""
    file = item.path.name
    name = f"{file}::{item.originalname if isinstance(item, pytest.Function) else item.name}"
    for rank, entry in enumerate(entries):
        if entry in (file, name):
            return rank
    return None


def _serial_rank(item: pytest.Item) -> int | None:
    """Position in :data:`SERIAL` of the entry naming ``item`` (None: not serial)."""
    return _entry_rank(item, SERIAL)


def _alone(item: pytest.Item) -> bool:
    return _serial_rank(item) is None and _entry_rank(item, ALONE) is not None


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark the serial tests and those run alone as they are collected (``-m serial``)."""
    if _serial_rank(item) is not None:
        item.add_marker(pytest.mark.serial)
    elif _alone(item):
        item.add_marker(pytest.mark.alone)


def order_key(item: pytest.Item) -> tuple[int, int]:
    """Serial tests first (in :data:`SERIAL`'s order), then FIRST, the rest, and ALONE."""
    rank = _serial_rank(item)
    if rank is not None:
        return (0, rank)
    if _alone(item):
        return (3, 0)
    first = _entry_rank(item, FIRST)
    return (1, first) if first is not None else (2, 0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the session by :func:`order_key` (stable: files keep their order otherwise)."""
    order = {id(item): i for i, item in enumerate(items)}

    def key(item: pytest.Item) -> tuple[int, int, int]:
        return (*order_key(item), order[id(item)])

    items.sort(key=key)
