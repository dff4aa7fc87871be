"""The baselines DOCL is compared with: FedAvg-family classifiers and a centralised ceiling."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from docl_flower.core.baselines.classifiers import (
    ClassifierSpec,
    SgdSpec,
    accuracy_report,
    predict,
    train_classifier,
)
from docl_flower.core.common.checks import check_int
from docl_flower.core.common.registry import Registry
from docl_flower.core.evaluation.results import RunResult
from docl_flower.core.pipeline.config import Experiment
from docl_flower.core.pipeline.inputs import split_features
from docl_flower.core.training.autoencoder import AutoencoderSpec

from .. import keys
from ..grids import CountingGrid
from . import held_test_set, steps
from .settings import MAX_EPOCHS, MAX_ROUNDS, check_flower_strategy, check_timeout

log = logging.getLogger(__name__)

#: The built-in Flower strategies a FedAvg-family baseline may name (``strategy.strategy``).
FLOWER_STRATEGIES = Registry(
    {
        "flower_strategy": {
            "flwr.serverapp.strategy.FedAvg": FedAvg,
            "flwr.serverapp.strategy.FedProx": FedProx,
        }
    }
)


@dataclass(frozen=True)
class FederatedClassifier:
    """A FedAvg-family baseline: any built-in Flower Message-API strategy trains a classifier.

    Parameters
    ----------
    strategy : mapping
        Hydra config of the Flower strategy (``flwr.serverapp.strategy.FedAvg``, ``FedProx``...).
    num_rounds : int
        Federated rounds; the global model is evaluated on the full test set after each.
    """

    CLIENT_TASK: ClassVar[str] = "classifier"
    strategy: Mapping[str, Any] = field(default_factory=dict)
    num_rounds: int = 20
    timeout_s: float = steps.DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        check_int("num_rounds", self.num_rounds, minimum=1, maximum=MAX_ROUNDS)
        check_timeout("timeout_s", self.timeout_s)
        check_flower_strategy(self.strategy)

    def run(self, grid: Grid, exp: Experiment, out_dir: Path) -> RunResult:
        """Run the rounds with server-side evaluation after each one."""
        spec = _classifier(exp)
        x_test, y_test = held_test_set(exp)
        torch.manual_seed(exp.seed)
        model = spec.build(int(x_test.shape[1]))
        counting = CountingGrid(grid)
        curve: list[dict[str, float]] = []
        final_per_class: dict[int, float] = {}

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            overall, per_class = accuracy_report(predict(model, x_test), y_test)
            users = max(1, len(exp.assignment))
            curve.append(
                {
                    "round": server_round,
                    "accuracy": overall,
                    "worst_class_accuracy": min(per_class.values()),
                    "bytes_per_user": (sum(counting.down.values()) + sum(counting.up.values()))
                    / users,
                }
            )
            final_per_class.clear()
            final_per_class.update(per_class)
            log.info("round %d: test accuracy %.4f", server_round, overall)
            return MetricRecord({"accuracy": overall})

        strategy = FLOWER_STRATEGIES.build("flower_strategy", self.strategy)
        if not isinstance(strategy, Strategy):
            raise ValueError(f"strategy.strategy builds a {type(strategy).__name__}")
        strategy.start(
            grid=counting,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=self.num_rounds,
            timeout=self.timeout_s,
            train_config=ConfigRecord({keys.SPEC: exp.client_spec.to_json()}),
            evaluate_fn=evaluate_fn,
        )
        down = counting.per_user(counting.down)
        return RunResult(
            method=type(strategy).__name__.lower(),
            overall_accuracy=curve[-1]["accuracy"],
            per_class_accuracy={str(k): v for k, v in final_per_class.items()},
            rounds=self.num_rounds,
            accuracy_curve=curve,
            registered=sorted(int(u) for u in counting.user_of.values()),
            failed={f"node-{n}": e for n, e in counting.errors.items()},
            bytes_uploaded=counting.per_user(counting.up),
            bytes_downloaded=down,
            # After round 1 every download is an average of other users' updates.
            receives_others_parameters=self.num_rounds > 1 and any(v > 0 for v in down.values()),
            train_seconds={},
        )


def _classifier(exp: Experiment) -> ClassifierSpec:
    if isinstance(exp.model, AutoencoderSpec):
        raise ValueError("the baselines train a classifier: use model=mlp2nn or model=cnn")
    return exp.model


def _sgd(exp: Experiment) -> SgdSpec:
    if not isinstance(exp.train, SgdSpec):
        raise ValueError("the baselines train with SGD: use train=sgd")
    return exp.train


@dataclass(frozen=True)
class Centralised:
    """The ceiling: every user's training images in one place, the same classifier and SGD."""

    CLIENT_TASK: ClassVar[str] = "idle"
    epochs: int = 10

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, minimum=1, maximum=MAX_EPOCHS)

    def run(self, grid: Grid, exp: Experiment, out_dir: Path) -> RunResult:
        """Train on the union of the users' partitions on the server; no client is contacted."""
        images, labels = exp.dataset.load("train")
        spec = exp.client_spec
        idx = np.unique(
            np.concatenate([spec.user_indices(u, labels) for u in sorted(exp.assignment)])
        )
        x = split_features(exp.dataset, exp.features, "train", idx, images).features
        y = torch.as_tensor(labels[idx])
        x_test, y_test = held_test_set(exp)
        torch.manual_seed(exp.seed)
        model = _classifier(exp).build(int(x.shape[1]))
        sgd = _sgd(exp)
        curve: list[dict[str, float]] = []
        seconds = 0.0
        overall, per_class = float("nan"), dict[int, float]()
        for epoch in range(1, self.epochs + 1):
            seconds += train_classifier(
                model, x, y, SgdSpec(1, sgd.batch_size, sgd.lr, sgd.momentum), exp.seed + epoch
            )
            overall, per_class = accuracy_report(predict(model, x_test), y_test)
            curve.append({"round": epoch, "accuracy": overall, "bytes_per_user": 0.0})
            log.info("epoch %d: test accuracy %.4f", epoch, overall)
        raw = {
            str(u): int(np.isin(labels[idx], exp.assignment[u]).sum()) * int(images[0].size)
            for u in sorted(exp.assignment)
        }
        return RunResult(
            method="centralised",
            overall_accuracy=overall,
            per_class_accuracy={str(k): v for k, v in per_class.items()},
            rounds=self.epochs,
            accuracy_curve=curve,
            registered=sorted(exp.assignment),
            failed={},
            # Users hand over their raw images (uint8 pixels): the privacy cost of the ceiling.
            bytes_uploaded=raw,
            bytes_downloaded={str(u): 0 for u in sorted(exp.assignment)},
            receives_others_parameters=False,
            uploads_raw_images=True,
            train_seconds={"server": seconds},
        )
