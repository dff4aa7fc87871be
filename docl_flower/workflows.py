"""Server-side workflows, one per ``strategy`` config option: DOCL and the baselines.

Each workflow runs inside the ServerApp and returns the method-specific part of
``results.json``; the ServerApp adds what every run shares. The ``strategy`` config group
selects a workflow with ``_target_``; the FedAvg-family workflow instantiates any built-in
Flower strategy from its own ``strategy`` sub-config, so FedProx and others need no new code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import keys
from .classifier import ClassifierSpec, SgdSpec, accuracy_report, predict, train_classifier
from .filter import GlobalFilter, Registration
from .metrics import evaluate
from .store import META_FILE, entry_extra, load_filter, load_history, save_filter
from .strategy import (
    RegisterOnce,
    RegistrationOutcome,
    StreamingGrid,
    UploadRules,
    load_bindings,
    record_bytes,
)

log = logging.getLogger(__name__)


class ExperimentLike(Protocol):
    """What a workflow reads from :class:`docl_flower.config.Experiment`."""

    seed: int
    client_spec: Any
    assignment: Mapping[int, tuple[int, ...]]
    features: Any
    dataset: Any
    harmless: Any
    guard: Any
    scoring: Any
    model: Any
    train: Any


def _test_set(exp: ExperimentLike) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = exp.dataset.load("test")
    return exp.features(images), torch.as_tensor(labels)


def _held_test_set(exp: ExperimentLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Test images of the classes the users hold (what DOCL's overall accuracy covers)."""
    x, y = _test_set(exp)
    held = torch.tensor(sorted({c for cs in exp.assignment.values() for c in cs}))
    mask = torch.isin(y, held)
    return x[mask], y[mask]


# ------------------------------------------------------------------------------ DOCL
@dataclass(frozen=True)
class Docl:
    """DOCL: register every user's autoencoder(s) once, compose and evaluate the global filter."""

    CLIENT_TASK: ClassVar[str] = "docl_flower.client_app.train_docl"
    node_wait_s: float = 120.0
    timeout_s: float = 3600.0
    filter_path: str | None = None
    replace_existing: bool = False
    bindings_path: str | None = None

    def run(
        self, grid: Grid, exp: ExperimentLike, cfg: DictConfig, out_dir: Path
    ) -> dict[str, Any]:
        """Register the users not in the saved filter yet, persist each registration, evaluate.

        The filter lives in ``filter_path`` (default: ``OUT/filter``). Users already in it skip
        training; with ``replace_existing`` they retrain, and their previous version moves to
        the file's history. With ``bindings_path`` (the operator's node -> user JSON), a node
        may only register the user it is bound to.
        """
        bindings = load_bindings(self.bindings_path) if self.bindings_path else None
        x_test, y_test = _test_set(exp)
        dim = int(x_test.shape[1])
        rules = UploadRules(shapes=exp.model.shapes(dim), max_error=float(dim))
        filter_dir = Path(self.filter_path) if self.filter_path else out_dir / "filter"
        store = PersistentFilter(filter_dir, {"config": OmegaConf.to_container(cfg)})
        strategy = RegisterOnce(
            exp.assignment,
            rules,
            node_wait_s=self.node_wait_s,
            existing_users=store.users,
            replace_existing=self.replace_existing,
            on_register=lambda outcome: store.save(outcome, exp.client_spec),
            bindings=bindings,
        )
        config = ConfigRecord({keys.SPEC: exp.client_spec.to_json()})
        if store.users and not self.replace_existing:
            config[keys.REGISTERED_USERS] = sorted(store.users)
        strategy.start(
            grid=cast(Grid, StreamingGrid(grid, strategy.handle_reply)),
            initial_arrays=ArrayRecord(),
            num_rounds=1,
            timeout=self.timeout_s,
            train_config=config,
        )
        outcome = strategy.outcome
        regs = store.combined(outcome)[0]
        if not regs:
            raise RuntimeError(f"no autoencoder was registered; failures: {outcome.failed}")
        return {
            "method": "docl",
            **self._evaluate(exp, regs, x_test, y_test),
            "rounds": 1,
            "registered": sorted(outcome.registered),
            "already_registered": sorted(outcome.skipped),
            "filter_users": sorted({r.user_id for r in regs}),
            "registered_classes": {str(u): c for u, c in sorted(outcome.registered.items())},
            "failed": {str(u): r for u, r in sorted(outcome.failed.items())},
            "node_errors": {str(n): r for n, r in outcome.node_errors.items()},
            "bindings_enforced": bindings is not None,
            "unbound_nodes": outcome.unbound_nodes,
            "bytes_uploaded": {str(u): b for u, b in sorted(outcome.bytes_uploaded.items())},
            "bytes_downloaded": {str(u): b for u, b in sorted(outcome.bytes_downloaded.items())},
            "received_array_records": {
                str(u): n for u, n in sorted(outcome.received_array_records.items())
            },
            "receives_others_parameters": False,
            "train_seconds": {str(u): s for u, s in sorted(outcome.train_seconds.items())},
            "trained_on_cuda": {str(u): c for u, c in sorted(outcome.cuda.items())},
            "filter_path": str(filter_dir),
        }

    @staticmethod
    def _evaluate(
        exp: ExperimentLike,
        regs: Sequence[Registration],
        x_test: torch.Tensor,
        y_test: torch.Tensor,
    ) -> dict[str, Any]:
        flt = GlobalFilter(sorted(regs, key=lambda r: r.label), exp.scoring)
        harmless = None
        if exp.harmless is not None:
            harmless = exp.features(exp.harmless.load("test")[0])
        ev = evaluate(flt, exp.guard, x_test, y_test, harmless)
        return {
            "overall_accuracy": ev.overall_accuracy,
            "per_class_accuracy": {str(k): v for k, v in ev.per_class_accuracy.items()},
            "alpha": ev.alpha,
            "guard": type(exp.guard).__name__,
            "guarded_accuracy": ev.guarded_accuracy,
            "acceptance_rate": ev.acceptance_rate,
            "ood_auroc": ev.ood_auroc,
            "num_test_images": int(torch.isin(y_test, flt.labels).sum()),
            "num_harmless_images": None if harmless is None else int(harmless.shape[0]),
        }


class PersistentFilter:
    """The saved global filter of a DOCL deployment: load once, rewrite after each registration.

    Registrations already in the folder stand unless a user re-registers with
    ``replace_existing``; a replaced version is kept in the file's history.
    """

    def __init__(self, folder: Path, info: Mapping[str, Any]) -> None:
        self.folder = folder
        self.info = dict(info)
        self.existing: list[tuple[Registration, dict[str, Any]]] = []
        self.history: list[tuple[Registration, dict[str, Any]]] = []
        if (folder / META_FILE).is_file():
            regs, meta = load_filter(folder)
            self.existing = [
                (r, entry_extra(e)) for r, e in zip(regs, meta["entries"], strict=True)
            ]
            self.history = load_history(folder, meta)
            log.info("loaded %d autoencoders from %s", len(regs), folder)

    @property
    def users(self) -> set[int]:
        """Users with an autoencoder in the saved filter."""
        return {r.user_id for r, _ in self.existing}

    def combined(
        self, outcome: RegistrationOutcome, spec: Any = None
    ) -> tuple[
        list[Registration], dict[int, dict[str, Any]], list[tuple[Registration, dict[str, Any]]]
    ]:
        """The filter after this run's registrations: kept old ones, then the new ones."""
        now = time.time()
        replaced = set(outcome.registered) & self.users
        keep = [(r, e) for r, e in self.existing if r.user_id not in replaced]
        history = self.history + [
            (r, {**e, "replaced_at": now}) for r, e in self.existing if r.user_id in replaced
        ]
        new = sorted(outcome.registrations, key=lambda r: (r.label, r.user_id))
        regs = [r for r, _ in keep] + new
        extra = {k: e for k, (_, e) in enumerate(keep)}
        for k, r in enumerate(new, start=len(keep)):
            extra[k] = {
                "node_id": outcome.nodes.get(r.user_id),
                "registered_at": outcome.registered_at.get(r.user_id),
                "fraction": spec.fraction.get(r.user_id, 1.0) if spec else 1.0,
                "trained_on": sorted(
                    {r.label, *(spec.extra_classes.get(r.user_id, []) if spec else [])}
                ),
            }
        return regs, extra, history

    def save(self, outcome: RegistrationOutcome, spec: Any) -> None:
        """Atomically rewrite the folder with every registration so far."""
        regs, extra, history = self.combined(outcome, spec)
        save_filter(self.folder, regs, extra, info=self.info, history=history)


# ------------------------------------------------------------------ FedAvg family
class CountingGrid:
    """A Grid proxy that counts the parameter bytes of every message, per node and direction.

    Replies carry the user id in their MetricRecord, which maps node ids to users.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}
        self.user_of: dict[int, int] = {}
        self.errors: dict[int, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Count what is sent and received, then pass the replies on."""
        msgs = list(messages)
        for m in msgs:
            node = m.metadata.dst_node_id
            self.down[node] = self.down.get(node, 0) + record_bytes(m.content)
        replies = list(self._grid.send_and_receive(msgs, timeout=timeout))
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error():
                self.errors[node] = f"code {r.error.code}: {r.error.reason}"
                continue
            self.up[node] = self.up.get(node, 0) + record_bytes(r.content)
            metrics = r.content.metric_records.get(keys.METRICS_RECORD)
            if metrics is not None and keys.USER_ID in metrics:
                self.user_of[node] = int(cast(int, metrics[keys.USER_ID]))
        return replies

    def per_user(self, counts: Mapping[int, int]) -> dict[str, int]:
        """Bytes per user id (nodes that never replied are keyed ``node-<id>``)."""
        return {
            str(self.user_of[n]) if n in self.user_of else f"node-{n}": b
            for n, b in sorted(counts.items(), key=lambda kv: self.user_of.get(kv[0], 1 << 62))
        }


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

    CLIENT_TASK: ClassVar[str] = "docl_flower.client_app.train_classifier"
    strategy: Mapping[str, Any] = field(default_factory=dict)
    num_rounds: int = 20
    timeout_s: float = 3600.0

    def run(
        self, grid: Grid, exp: ExperimentLike, cfg: DictConfig, out_dir: Path
    ) -> dict[str, Any]:
        """Run the rounds with server-side evaluation after each one."""
        spec: ClassifierSpec = exp.model
        x_test, y_test = _held_test_set(exp)
        torch.manual_seed(exp.seed)
        model = spec.build(int(x_test.shape[1]))
        counting = CountingGrid(grid)
        curve: list[dict[str, Any]] = []

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
            curve[-1]["per_class_accuracy"] = {str(k): v for k, v in per_class.items()}
            log.info("round %d: test accuracy %.4f", server_round, overall)
            return MetricRecord({"accuracy": overall})

        strategy = instantiate(dict(self.strategy))
        strategy.start(
            grid=cast(Grid, counting),
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=self.num_rounds,
            timeout=self.timeout_s,
            train_config=ConfigRecord({keys.SPEC: exp.client_spec.to_json()}),
            evaluate_fn=evaluate_fn,
        )
        final = curve[-1]
        down = counting.per_user(counting.down)
        return {
            "method": type(strategy).__name__.lower(),
            "overall_accuracy": final["accuracy"],
            "per_class_accuracy": final["per_class_accuracy"],
            "rounds": self.num_rounds,
            "accuracy_curve": [
                {k: v for k, v in row.items() if k != "per_class_accuracy"} for row in curve
            ],
            "registered": sorted(int(u) for u in counting.user_of.values()),
            "failed": {f"node-{n}": e for n, e in counting.errors.items()},
            "bytes_uploaded": counting.per_user(counting.up),
            "bytes_downloaded": down,
            # After round 1 every download is an average of other users' updates.
            "receives_others_parameters": self.num_rounds > 1 and any(v > 0 for v in down.values()),
            "train_seconds": {},
        }


@dataclass(frozen=True)
class Centralised:
    """The ceiling: every user's training images in one place, the same classifier and SGD."""

    CLIENT_TASK: ClassVar[str] = "docl_flower.client_app.idle"
    epochs: int = 10

    def run(
        self, grid: Grid, exp: ExperimentLike, cfg: DictConfig, out_dir: Path
    ) -> dict[str, Any]:
        """Train on the union of the users' partitions on the server; no client is contacted."""
        from .client_app import user_indices

        images, labels = exp.dataset.load("train")
        idx = np.unique(
            np.concatenate(
                [user_indices(exp.client_spec, u, labels) for u in sorted(exp.assignment)]
            )
        )
        x, y = exp.features(images[idx]), torch.as_tensor(labels[idx])
        x_test, y_test = _held_test_set(exp)
        torch.manual_seed(exp.seed)
        model = exp.model.build(int(x.shape[1]))
        sgd: SgdSpec = exp.train
        curve = []
        seconds = 0.0
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
        return {
            "method": "centralised",
            "overall_accuracy": overall,
            "per_class_accuracy": {str(k): v for k, v in per_class.items()},
            "rounds": self.epochs,
            "accuracy_curve": curve,
            "registered": sorted(exp.assignment),
            "failed": {},
            # Users hand over their raw images (uint8 pixels): the privacy cost of the ceiling.
            "bytes_uploaded": raw,
            "bytes_downloaded": {str(u): 0 for u in sorted(exp.assignment)},
            "receives_others_parameters": False,
            "uploads_raw_images": True,
            "train_seconds": {"server": seconds},
        }
