"""An in-process stand-in for a ``docl-flower`` run, for the experiment tests (no Flower).

:class:`FakeLaunch` takes the place of :func:`docl_flower.operations.runs.launch` in an
experiment module. It composes the run's overrides as the command does, builds the
experiment, trains one small autoencoder per user on what the partition gives that user
(``client_spec.training_indices``: its class, a fraction of it, plus any ``extra_classes``)
and writes what a run leaves in its folder: ``experiment.yaml``, the saved filter (each entry
with ``trained_on`` and ``fraction``, as the DOCL workflow saves them) and ``results.json``.
The recipe is the fake's own (a few epochs), whatever the overrides say.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from docl_flower.core.evaluation.results import RESULTS_FILE, RunResult, write_results
from docl_flower.core.filter.store import save_filter
from docl_flower.core.pipeline.config import compose_config
from docl_flower.core.pipeline.inputs import split_features
from docl_flower.experiments.privacy_attack import one_thread
from docl_flower.federation.components import build_experiment

from .conftest import trained_registration


class FakeLaunch:
    """Record each launch's overrides and folder; "run" it in-process with tiny autoencoders."""

    def __init__(self, epochs: int = 3, hidden: int = 8) -> None:
        self.epochs = epochs
        self.hidden = hidden
        self.calls: list[tuple[list[str], Path]] = []

    def __call__(
        self,
        overrides: Sequence[str],
        run_dir: Path,
        reuse: bool = False,
        needs: Sequence[str] = (),
    ) -> RunResult:
        self.calls.append((list(overrides), run_dir))
        cfg = compose_config(list(overrides))
        exp = build_experiment(cfg)
        images, labels = exp.dataset.load("train")
        features = split_features(exp.dataset, exp.features, "train", images=images).features
        regs, entries = [], {}
        with one_thread():  # tiny products: one thread is faster (and fair to other jobs)
            self._train(exp, features, labels, regs, entries)
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "experiment.yaml", resolve=True)
        save_filter(run_dir / "filter", regs, entries, info={"config": exp.config})
        users = sorted(exp.assignment)
        result = RunResult(
            method="docl",
            overall_accuracy=0.9,
            per_class_accuracy={},
            rounds=1,
            registered=users,
            failed={},
            bytes_uploaded={str(u): 1 for u in users},
            bytes_downloaded={str(u): 0 for u in users},
            receives_others_parameters=False,
            train_seconds={str(u): 1.0 + u for u in users},
            alpha=1.5,
            guarded_accuracy=0.8,
            acceptance_rate=0.99,
        )
        write_results(run_dir / RESULTS_FILE, result)
        return result

    def _train(self, exp, features, labels, regs, entries):
        for user, classes in sorted(exp.assignment.items()):
            for label in classes:
                rows = exp.client_spec.training_indices(user, label, labels)
                entries[len(regs)] = {
                    "fraction": exp.client_spec.fraction.get(user, 1.0),
                    "trained_on": sorted({label, *exp.client_spec.extra_classes.get(user, [])}),
                }
                regs.append(
                    trained_registration(
                        features[rows], user, label, self.epochs, seed=user, hidden=self.hidden
                    )
                )

    def runs(self, name: str) -> list[list[str]]:
        """The overrides of every launch into a folder called ``name``."""
        return [overrides for overrides, folder in self.calls if folder.name == name]
