"""DOCL: register every user's autoencoder(s) once, compose and evaluate the global filter."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from flwr.serverapp import Grid

from docl_flower.core.data.partitions import owner_shards
from docl_flower.core.evaluation.metrics import ALPHA_GRID, evaluate
from docl_flower.core.evaluation.results import RunResult
from docl_flower.core.filter.global_filter import GlobalFilter, Registration
from docl_flower.core.filter.lock import FilterLockedError, check_wait, run_lock
from docl_flower.core.filter.probe import (
    DEFAULT_MAX_BLOCK_SHARE,
    DEFAULT_PROBE_IMAGES,
    DEFAULT_PROBE_NOISE,
    ProbeCheck,
)
from docl_flower.core.filter.store import PersistentFilter
from docl_flower.core.pipeline.config import Experiment
from docl_flower.core.training.autoencoder import AutoencoderSpec

from ..nodes import is_simulation
from ..strategy import RegisterOnce
from ..uploads import UploadError, UploadRules
from . import steps
from .settings import check_path, check_registration_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Docl:
    """DOCL: register every user's autoencoder(s) once, compose and evaluate the global filter."""

    CLIENT_TASK: ClassVar[str] = "docl"
    node_wait_s: float = steps.DEFAULT_NODE_WAIT_S
    timeout_s: float = steps.DEFAULT_TIMEOUT_S
    filter_path: str | None = None
    replace_existing: bool = False
    bindings_path: str | None = None
    probe_images: int = DEFAULT_PROBE_IMAGES
    probe_noise: int = DEFAULT_PROBE_NOISE
    max_block_share: float = DEFAULT_MAX_BLOCK_SHARE
    #: How long a run waits for another run that writes the same filter (seconds; 0: it fails
    #: at once, in one line that names the other run). See :mod:`~docl_flower.core.filter.lock`.
    lock_wait_s: float = 0.0

    def __post_init__(self) -> None:
        check_registration_settings(self)
        check_path("filter_path", self.filter_path)
        check_wait(self.lock_wait_s)

    def filter_folder(self, out_dir: Path) -> Path:
        """Where the run's filter lives: ``filter_path``, else ``OUT/filter``."""
        return Path(self.filter_path) if self.filter_path else out_dir / "filter"

    def open_filter(self, out_dir: Path, config: Mapping[str, Any]) -> PersistentFilter:
        """The run's filter, loaded under its writer lock, held until it is closed.

        Waits up to ``lock_wait_s`` for another writer of the folder; then raises
        :class:`~docl_flower.core.filter.lock.FilterLockedError` (one line naming the holder).
        """
        try:
            return PersistentFilter(
                self.filter_folder(out_dir), {"config": config}, lock_wait_s=self.lock_wait_s
            )
        except FilterLockedError as err:
            log.error("docl-flower: %s", err)
            raise

    def run_lock(self, out_dir: Path) -> AbstractContextManager[None]:
        """Held by the command that starts this run (``docl-flower``) until the run ends.

        The filter folder's run lock (:func:`~docl_flower.core.filter.lock.run_lock`): a second
        command on the same folder fails before it starts Flower (or waits ``lock_wait_s``).
        """
        return run_lock(self.filter_folder(out_dir), self.lock_wait_s)

    def run(self, grid: Grid, exp: Experiment, out_dir: Path) -> RunResult:
        """Register the users not in the saved filter yet, persist each registration, evaluate.

        The filter lives in ``filter_path`` (default: ``OUT/filter``). Users already in it skip
        training; with ``replace_existing`` they retrain, and their previous version moves to
        the file's history. With ``bindings_path`` (the operator's node -> user JSON), a node
        may only register the user it is bound to. The run holds the filter's writer lock from
        before it loads the filter to its end: a second run on the folder is refused.
        """
        began = time.time()
        with self.open_filter(out_dir, exp.config) as store:
            return self._run(grid, exp, store, began)

    def _run(self, grid: Grid, exp: Experiment, store: PersistentFilter, began: float) -> RunResult:
        if not isinstance(exp.model, AutoencoderSpec):
            raise ValueError(f"DOCL trains autoencoders; model is a {type(exp.model).__name__}")
        prepared = steps.prepare(exp, self, began)
        spec = exp.client_spec
        probe = ProbeCheck(
            prepared.probe,
            max_alpha=exp.max_alpha,
            scoring=exp.scoring,
            max_block_share=self.max_block_share,
        )

        # The probe check's record of each vetted upload, saved with it (the upload service
        # holds a filter's autoencoders to its own limit with these).
        checked: dict[int, dict[str, object]] = {}

        def vet(reg: Registration) -> None:
            result = probe.measure(reg)
            if result.problem is not None:
                raise UploadError(f"class {reg.label}: {result.problem}")
            checked[id(reg)] = result.record()

        def persist(user: int, regs: Sequence[Registration], node: int) -> None:
            now = time.time()
            metas = [
                {
                    "node_id": node,
                    "registered_at": now,
                    "fraction": spec.fraction.get(user, 1.0),
                    "trained_on": sorted({r.label, *spec.extra_classes.get(user, [])}),
                    "probe": checked.pop(id(r)),
                }
                for r in regs
            ]
            store.register(user, regs, metas)

        strategy = RegisterOnce(
            exp.assignment,
            UploadRules.for_autoencoder(exp.model, prepared.dim),
            node_wait_s=self.node_wait_s,
            existing_users=store.users,
            replace_existing=self.replace_existing,
            on_register=persist,
            bindings=prepared.bindings,
            assign_nodes=prepared.bindings is None and is_simulation(grid),
            vet=vet,
        )
        skip = () if self.replace_existing else store.users
        timeline = steps.register_once(grid, strategy, exp, self.timeout_s, skip)
        outcome = strategy.outcome
        regs = store.registrations
        if not regs:
            raise RuntimeError(f"no autoencoder was registered; failures: {outcome.failed}")
        flt = GlobalFilter(sorted(regs, key=lambda r: (r.label, r.user_id)), exp.scoring)
        sets = prepared.sets
        owners = None
        if exp.partition.sharded_classes:
            owners = torch.from_numpy(
                owner_shards(sets.y_test.numpy(), exp.assignment, exp.partition.shards, exp.seed)
            )
        choice = steps.choose_guard(exp, flt, sets.harmless, sets.harmless_labels)
        if choice.calibration is not None:  # saved and signed with the filter
            store.info["calibration"] = choice.calibration.to_dict()
            store.save()
        ev = evaluate(
            flt, choice.guard, sets.x_test, sets.y_test, choice.harmless, ALPHA_GRID, owners
        )
        return steps.guarded_result(
            "docl",
            choice,
            ev,
            flt.labels,
            prepared,
            timeline,
            outcome,
            owner_accuracy=ev.owner_accuracy,
            owner_guarded_accuracy=ev.owner_guarded_accuracy,
            already_registered=sorted(outcome.skipped),
            filter_users=sorted({r.user_id for r in regs}),
            filter_path=str(store.folder),
            scoring_kernel=flt.kernel,
        )
