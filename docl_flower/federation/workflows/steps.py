"""The steps DOCL and the feature-statistics workflow share: prepare, register once, one result.

Both workflows ask every user for one upload and send nothing back (:class:`RegisterOnce`);
they differ in what an upload is (autoencoders or statistics), how it is vetted, and what
the filter is. So the steps are written once here:

1. :func:`prepare`: the server's evaluation data, the operator's bindings and the probe set;
2. :func:`register_once`: the train message (the typed client spec as a record), the strategy
   run, and the time stamps of each phase;
3. :func:`guarded_result`: the :class:`~docl_flower.core.evaluation.results.RunResult` every
   guarded method shares (accuracy, Guard, acceptance, AUROC, phases), plus the method's own
   fields.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from docl_flower.core.evaluation.metrics import Evaluation
from docl_flower.core.evaluation.results import RunResult
from docl_flower.core.filter.conformal import (
    Calibration,
    calibrate,
    finite_sample_slack,
    split_harmless,
)
from docl_flower.core.filter.global_filter import Guard, ScoredFilter
from docl_flower.core.filter.probe import ProbeSet, probe_set
from docl_flower.core.pipeline.config import Experiment
from docl_flower.core.pipeline.inputs import ServerSets, server_sets

from .. import keys
from ..grids import StreamingGrid
from ..nodes import load_bindings
from ..strategy import RegisterOnce, RegistrationOutcome
from .settings import RegistrationSettings

log = logging.getLogger(__name__)

#: Default seconds to wait for the nodes (``strategy.node_wait_s``). Ray actors and SuperNodes
#: connect within seconds on the machines measured; two minutes leave room for a loaded host.
DEFAULT_NODE_WAIT_S = 120.0
#: Default seconds to wait for the replies (``strategy.timeout_s``): an hour, far above the
#: longest registration measured (1,000 simulated users, about 3 minutes on 2 cores).
DEFAULT_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Prepared:
    """What the server holds before the first message."""

    #: Test and harmless features (the filter's evaluation data).
    sets: ServerSets
    #: Feature dimension D.
    dim: int
    #: The operator's node -> user bindings (``strategy.bindings_path``), or None.
    bindings: dict[int, int] | None
    #: The probe check's images: the first harmless images plus uniform noise.
    probe: ProbeSet
    #: When the run began (``time.time()``).
    began: float


def prepare(
    exp: Experiment, settings: RegistrationSettings, began: float | None = None
) -> Prepared:
    """Load the evaluation data, the bindings and the probe set of ``exp``."""
    began = time.time() if began is None else began
    path = settings.bindings_path
    bindings = load_bindings(path) if path else None
    sets = server_sets(exp)
    dim = int(sets.x_test.shape[1])
    probe = probe_set(sets.harmless, dim, settings.probe_images, settings.probe_noise, exp.seed)
    return Prepared(sets, dim, bindings, probe, began)


@dataclass(frozen=True)
class Timeline:
    """When each phase of the registration ended (``time.time()``)."""

    set_up: float
    replied: float


def register_once(
    grid: Grid,
    strategy: RegisterOnce[Any],
    exp: Experiment,
    timeout_s: float,
    registered_users: Iterable[int] = (),
) -> Timeline:
    """Send the typed client spec to every node once and collect the uploads.

    ``registered_users``: users already in a saved filter, whose clients skip training.
    """
    config = ConfigRecord({keys.SPEC: exp.client_spec.to_json()})
    already = sorted(registered_users)
    if already:
        config[keys.REGISTERED_USERS] = already
    set_up = time.time()
    # While clients train (in a simulation: on the same cores), the server's checks are
    # small products: with 2+ OpenMP threads they stall at barriers whenever a client holds
    # a core (measured: 84 ms per probe check instead of 4 ms). One thread until the last
    # reply; the evaluation uses them all again.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        strategy.start(
            grid=StreamingGrid(grid, strategy.handle_reply),
            initial_arrays=ArrayRecord(),
            num_rounds=1,
            timeout=timeout_s,
            train_config=config,
        )
    finally:
        torch.set_num_threads(threads)
    return Timeline(set_up=set_up, replied=time.time())


@dataclass(frozen=True)
class GuardChoice:
    """The Guard a run evaluates with, and the harmless images that measure its acceptance."""

    guard: Guard
    #: Harmless images the calibration did not see (all of them without calibration).
    harmless: torch.Tensor | None
    calibration: Calibration | None = None

    def result_fields(self) -> dict[str, Any]:
        """The calibration's fields of :class:`RunResult` (with the finite-sample slack)."""
        cal = self.calibration
        if cal is None or self.harmless is None:
            return {}
        tested = int(self.harmless.shape[0])
        record = cal.to_dict()
        record["test_images"] = tested
        record["slack"] = finite_sample_slack(cal.images, tested) if tested else None
        return {"calibration": record}


def choose_guard(
    exp: Experiment,
    flt: ScoredFilter,
    harmless: torch.Tensor | None,
    groups: torch.Tensor | None = None,
) -> GuardChoice:
    """The configured Guard, or (``guard.target_acceptance``) the calibrated one.

    The calibration split is drawn with the experiment's seed; the Guard's alpha is then the
    conformal alpha of :func:`~docl_flower.core.filter.conformal.calibrate`, capped by
    ``guard.max_alpha``, and the acceptance is measured on the other harmless images only.
    With ``groups`` (the person of each harmless image: faces), the split is by person.
    """
    if exp.calibration is None:
        return GuardChoice(exp.guard, harmless)
    if harmless is None or int(harmless.shape[0]) < 2:
        raise ValueError("guard.target_acceptance needs harmless images to calibrate on")
    share = exp.calibration.calibration_share
    cal_set, test_set = split_harmless(harmless, share, exp.seed, groups)
    cal = calibrate(exp.guard, flt, cal_set, exp.calibration.target_acceptance, exp.max_alpha)
    log.info(
        "calibrated the Guard on %d harmless images: alpha %.4f for acceptance >= %.3f "
        "(conformal alpha %.4f, max_alpha %.2f)",
        cal.images,
        cal.alpha,
        cal.target_acceptance,
        cal.conformal_alpha,
        exp.max_alpha,
    )
    return GuardChoice(dataclasses.replace(exp.guard, alpha=cal.alpha), test_set, cal)


def phase_seconds(
    prepared: Prepared, timeline: Timeline, outcome: RegistrationOutcome[Any], done: float
) -> dict[str, float]:
    """Where the run's time went (see :attr:`RunResult.phase_seconds`)."""
    sent = outcome.sent_at or timeline.set_up
    last = max(outcome.registered_at.values(), default=sent)
    return {
        "setup": timeline.set_up - prepared.began,
        "wait_for_nodes": sent - timeline.set_up,
        "registration": last - sent,
        "server_handling": outcome.handling_seconds,
        "after_last_reply": timeline.replied - last,
        "evaluation": done - timeline.replied,
    }


def guarded_result(
    method: str,
    choice: GuardChoice,
    ev: Evaluation,
    labels: torch.Tensor,
    prepared: Prepared,
    timeline: Timeline,
    outcome: RegistrationOutcome[Any],
    **extra: Any,
) -> RunResult:
    """The result of a guarded method: what DOCL and the feature statistics both report.

    ``labels``: the classes in the filter (test images of other classes are not counted).
    ``extra``: the method's own fields of :class:`RunResult`.
    """
    sets, harmless = prepared.sets, choice.harmless
    fields: Mapping[str, Any] = {
        "method": method,
        "overall_accuracy": ev.overall_accuracy,
        "per_class_accuracy": {str(k): v for k, v in ev.per_class_accuracy.items()},
        "alpha": ev.alpha,
        "guard": type(choice.guard).__name__,
        "guarded_accuracy": ev.guarded_accuracy,
        "acceptance_rate": ev.acceptance_rate,
        "ood_auroc": ev.ood_auroc,
        "guard_curve": list(ev.guard_curve),
        "num_test_images": int(torch.isin(sets.y_test, labels).sum()),
        "num_harmless_images": None if harmless is None else int(harmless.shape[0]),
        "bindings_enforced": prepared.bindings is not None,
        "phase_seconds": phase_seconds(prepared, timeline, outcome, time.time()),
        "feature_fallbacks": sets.fallbacks,
        **outcome.result_fields(),
        **choice.result_fields(),
    }
    twice = sorted(set(fields) & set(extra))
    if twice:
        raise ValueError(f"{method}: result fields given twice: {twice}")
    return RunResult(**fields, **extra)
