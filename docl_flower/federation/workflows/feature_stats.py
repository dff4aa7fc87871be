"""One-shot feature statistics (FedPFT-style): register every user's statistics once, evaluate.

The fair one-shot competitor of DOCL: each user uploads, once, a Gaussian (or a small mixture)
per class it owns, fitted to its features, plus the mean and std of held-out log-likelihoods
of its own images; nothing is sent back. The server builds the likelihood classifier with the
Guard (scored like DOCL's filter) and FedPFT's classifier trained on features sampled from the
statistics, and evaluates both on the same test and harmless images as DOCL.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from docl_flower.core.baselines.fedpft import (
    ClassStats,
    LikelihoodFilter,
    SampledClassifierSpec,
    StatsLimits,
    StatsSpec,
    class_accuracy,
    probe_problem,
    train_sampled_classifier,
)
from docl_flower.core.evaluation.metrics import ALPHA_GRID, evaluate
from docl_flower.core.evaluation.results import RunResult
from docl_flower.core.filter.probe import DEFAULT_MAX_BLOCK_SHARE, DEFAULT_PROBE_IMAGES, probe_set
from docl_flower.core.pipeline.config import Experiment
from docl_flower.core.pipeline.inputs import server_sets

from .. import keys
from ..grids import StreamingGrid
from ..nodes import is_simulation, load_bindings
from ..stats_uploads import StatsRules, parse_stats_upload
from ..strategy import RegisterOnce
from ..uploads import UploadError
from .settings import check_registration_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureStats:
    """Per-class feature statistics uploaded once; likelihood and sampled-feature classifiers.

    Parameters
    ----------
    covariance, components, ridge, shrinkage, folds, em_iterations
        The statistics each client fits (:class:`StatsSpec`; sent in the ClientSpec).
    samples_per_class, classifier_hidden, classifier_epochs, classifier_lr
        The server's classifier of sampled features (:class:`SampledClassifierSpec`).
    node_wait_s, timeout_s, bindings_path
        As for DOCL: node deadline, reply deadline, operator's node -> user bindings.
    probe_images, probe_noise, max_block_share
        The probe check: at most ``max_block_share`` of the probe set (first harmless images
        and uniform noise) may fall in an upload's blocking range (no catch-alls).
    """

    CLIENT_TASK: ClassVar[str] = "feature_stats"
    covariance: str = "shrunk"
    components: int = 1
    ridge: float = 1e-3
    shrinkage: float | None = None
    folds: int = 5
    em_iterations: int = 100
    samples_per_class: int = 2000
    classifier_hidden: int = 0
    classifier_epochs: int = 30
    classifier_lr: float = 1e-2
    node_wait_s: float = 120.0
    timeout_s: float = 3600.0
    bindings_path: str | None = None
    probe_images: int = DEFAULT_PROBE_IMAGES
    probe_noise: int = 64
    max_block_share: float = DEFAULT_MAX_BLOCK_SHARE

    def __post_init__(self) -> None:
        self.stats_spec()
        try:
            self.classifier_spec()
        except ValueError as err:  # name the setting, not the classifier spec's field
            text = str(err)
            for field_name in ("hidden", "epochs", "lr"):
                if text.startswith(field_name + " "):
                    text = f"classifier_{text}"
            raise ValueError(text) from err
        check_registration_settings(self)

    def stats_spec(self) -> StatsSpec:
        """What each client fits."""
        return StatsSpec(
            covariance=self.covariance,
            components=self.components,
            ridge=self.ridge,
            shrinkage=self.shrinkage,
            folds=self.folds,
            em_iterations=self.em_iterations,
        )

    def classifier_spec(self) -> SampledClassifierSpec:
        """The server's classifier of sampled features."""
        return SampledClassifierSpec(
            samples_per_class=self.samples_per_class,
            hidden=self.classifier_hidden,
            epochs=self.classifier_epochs,
            lr=self.classifier_lr,
        )

    def client_options(self) -> dict[str, Any]:
        """The statistics' options, sent to every client in the ClientSpec."""
        return asdict(self.stats_spec())

    def run(self, grid: Grid, exp: Experiment, out_dir: Path) -> RunResult:
        """Register each user's statistics once (validated, probe-checked), then evaluate."""
        bindings = load_bindings(self.bindings_path) if self.bindings_path else None
        sets = server_sets(exp)
        x_test, y_test, harmless = sets.x_test, sets.y_test, sets.harmless
        dim = int(x_test.shape[1])
        rules = StatsRules(StatsLimits(self.stats_spec(), dim))
        probe = probe_set(harmless, dim, self.probe_images, self.probe_noise, exp.seed)
        guard = exp.guard

        def vet(stats: ClassStats) -> None:
            problem = probe_problem(stats, probe, exp.max_alpha, self.max_block_share)
            if problem is not None:
                raise UploadError(f"class {stats.label}: {problem}")

        strategy: RegisterOnce[ClassStats] = RegisterOnce(
            exp.assignment,
            None,
            node_wait_s=self.node_wait_s,
            bindings=bindings,
            assign_nodes=bindings is None and is_simulation(grid),
            vet=vet,
            parse=functools.partial(parse_stats_upload, rules=rules),
        )
        strategy.start(
            grid=StreamingGrid(grid, strategy.handle_reply),
            initial_arrays=ArrayRecord(),
            num_rounds=1,
            timeout=self.timeout_s,
            train_config=ConfigRecord({keys.SPEC: exp.client_spec.to_json()}),
        )
        outcome = strategy.outcome
        stats = sorted(outcome.registrations, key=lambda s: (s.label, s.user_id))
        if not stats:
            raise RuntimeError(f"no statistics were registered; failures: {outcome.failed}")
        flt = LikelihoodFilter(stats)
        ev = evaluate(flt, guard, x_test, y_test, harmless, ALPHA_GRID)
        classifier = train_sampled_classifier(stats, self.classifier_spec(), exp.seed)
        sampled, sampled_per_class = class_accuracy(classifier.predict(x_test), y_test, flt.labels)
        log.info(
            "likelihood classifier %.4f, sampled-feature classifier %.4f",
            ev.overall_accuracy,
            sampled,
        )
        return RunResult(
            method="feature_stats",
            overall_accuracy=ev.overall_accuracy,
            per_class_accuracy={str(k): v for k, v in ev.per_class_accuracy.items()},
            alpha=ev.alpha,
            guard=type(guard).__name__,
            guarded_accuracy=ev.guarded_accuracy,
            acceptance_rate=ev.acceptance_rate,
            ood_auroc=ev.ood_auroc,
            guard_curve=list(ev.guard_curve),
            sampled_classifier_accuracy=sampled,
            sampled_classifier_per_class_accuracy={str(k): v for k, v in sampled_per_class.items()},
            num_test_images=int(torch.isin(y_test, flt.labels).sum()),
            num_harmless_images=None if harmless is None else int(harmless.shape[0]),
            bindings_enforced=bindings is not None,
            **outcome.result_fields(),
            feature_fallbacks=sets.fallbacks,
        )
