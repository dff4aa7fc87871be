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

#: Tests marked ``serial``: ``make test`` runs them one after another in one pytest session and
#: the rest of the suite in a second session beside it (one per core): whole Flower runs and
#: deployments, Ray heads, Flower's managed SuperLink on its fixed ports, and tests that time
#: real processes (a command refused "within 10 s", a SIGKILLed run cleaned up "within 10 s").
#: Files, or ``file::test`` for one test of a file.
SERIAL = (
    # Flower runs first (the other session runs beside them: about 6 minutes) ...
    "test_e2e.py",
    "test_flwr_run.py",
    "test_feature_stats_e2e.py",
    "test_ray_cluster.py",
    # ... then the deployment fault test and the timed ones, which come once the other session
    # has ended: the SuperLink's SQLite database was "locked" on a busy machine.
    "test_faults.py",
    "test_startup.py",
    "test_signals.py",
    "test_filter_lock.py",
    "test_settings.py",
    "test_hostile_files.py",
    "test_config.py::test_a_bad_value_on_the_command_line_fails_in_one_line_before_flower_starts",
    "test_features.py::test_two_processes_asking_at_once_compute_once",
    "test_serve.py::test_the_command_serves_over_tls_and_drains_requests_in_flight_on_sigterm",
)

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


def _serial_rank(item: pytest.Item) -> int | None:
    """Position in :data:`SERIAL` of the entry naming ``item`` (None: not serial)."""
    file = item.path.name
    name = f"{file}::{item.originalname if isinstance(item, pytest.Function) else item.name}"
    for rank, entry in enumerate(SERIAL):
        if entry in (file, name):
            return rank
    return None


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark each serial test as it is collected (``-m serial`` selects them)."""
    if _serial_rank(item) is not None:
        item.add_marker(pytest.mark.serial)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the serial tests first, in :data:`SERIAL`'s order (the longest first)."""
    ranks = {id(item): _serial_rank(item) for item in items}
    order = {id(item): i for i, item in enumerate(items)}

    def key(item: pytest.Item) -> tuple[int, int]:
        rank = ranks[id(item)]
        return (rank if rank is not None else len(SERIAL), order[id(item)])

    items.sort(key=key)
