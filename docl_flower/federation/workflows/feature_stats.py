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
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

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
from docl_flower.core.filter.probe import (
    DEFAULT_MAX_BLOCK_SHARE,
    DEFAULT_PROBE_IMAGES,
    DEFAULT_PROBE_NOISE,
)
from docl_flower.core.pipeline.config import Experiment

from ..nodes import is_simulation
from ..stats_uploads import StatsRules, parse_stats_upload
from ..strategy import RegisterOnce
from ..uploads import UploadError
from . import steps
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
    node_wait_s: float = steps.DEFAULT_NODE_WAIT_S
    timeout_s: float = steps.DEFAULT_TIMEOUT_S
    bindings_path: str | None = None
    probe_images: int = DEFAULT_PROBE_IMAGES
    probe_noise: int = DEFAULT_PROBE_NOISE
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

    def run(self, grid: Grid, exp: Experiment, out_dir: Path) -> RunResult:
        """Register each user's statistics once (validated, probe-checked), then evaluate."""
        prepared = steps.prepare(exp, self)
        rules = StatsRules(StatsLimits(self.stats_spec(), prepared.dim))

        def vet(stats: ClassStats) -> None:
            problem = probe_problem(stats, prepared.probe, exp.max_alpha, self.max_block_share)
            if problem is not None:
                raise UploadError(f"class {stats.label}: {problem}")

        strategy: RegisterOnce[ClassStats] = RegisterOnce(
            exp.assignment,
            None,
            node_wait_s=self.node_wait_s,
            bindings=prepared.bindings,
            assign_nodes=prepared.bindings is None and is_simulation(grid),
            vet=vet,
            parse=functools.partial(parse_stats_upload, rules=rules),
        )
        timeline = steps.register_once(grid, strategy, exp, self.timeout_s)
        outcome = strategy.outcome
        stats = sorted(outcome.registrations, key=lambda s: (s.label, s.user_id))
        if not stats:
            raise RuntimeError(f"no statistics were registered; failures: {outcome.failed}")
        sets = prepared.sets
        flt = LikelihoodFilter(stats)
        choice = steps.choose_guard(exp, flt, sets.harmless, sets.harmless_labels)
        ev = evaluate(flt, choice.guard, sets.x_test, sets.y_test, choice.harmless, ALPHA_GRID)
        classifier = train_sampled_classifier(stats, self.classifier_spec(), exp.seed)
        sampled, per_class = class_accuracy(
            classifier.predict(sets.x_test), sets.y_test, flt.labels
        )
        log.info(
            "likelihood classifier %.4f, sampled-feature classifier %.4f",
            ev.overall_accuracy,
            sampled,
        )
        return steps.guarded_result(
            "feature_stats",
            choice,
            ev,
            flt.labels,
            prepared,
            timeline,
            outcome,
            sampled_classifier_accuracy=sampled,
            sampled_classifier_per_class_accuracy={str(k): v for k, v in per_class.items()},
        )
