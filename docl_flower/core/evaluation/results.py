"""The results of one run (``results.json``): one typed object, written and read here only.

Every workflow returns a :class:`RunResult`; the ServerApp adds the resolved config and its
own time and writes it; ``docl-flower`` adds the wall time of the whole command; the scripts
read it back with :func:`read_results`. The JSON keys are the field names.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docl_flower.core.common.files import write_json_atomic

RESULTS_FILE = "results.json"


@dataclass
class RunResult:
    """What one run measured (DOCL or a baseline); optional fields are ``None`` where N/A.

    Keys of the per-user mappings are user ids as strings (JSON object keys); baselines key a
    node that never named its user ``node-<id>``.
    """

    method: str
    overall_accuracy: float
    per_class_accuracy: dict[str, float]
    rounds: int
    registered: list[int]
    failed: dict[str, str]
    bytes_uploaded: dict[str, int]
    bytes_downloaded: dict[str, int]
    receives_others_parameters: bool
    train_seconds: dict[str, float]
    # --- DOCL and feature statistics: the Guard and the filter
    alpha: float | None = None
    guard: str | None = None
    guarded_accuracy: float | None = None
    acceptance_rate: float | None = None
    ood_auroc: float | None = None
    num_test_images: int | None = None
    num_harmless_images: int | None = None
    already_registered: list[int] = field(default_factory=list)
    filter_users: list[int] = field(default_factory=list)
    registered_classes: dict[str, list[int]] = field(default_factory=dict)
    node_errors: dict[str, str] = field(default_factory=dict)
    bindings_enforced: bool = False
    unbound_nodes: list[int] = field(default_factory=list)
    bound_outside_run: dict[str, int] = field(default_factory=dict)
    received_array_records: dict[str, int] = field(default_factory=dict)
    trained_on_cuda: dict[str, bool] = field(default_factory=dict)
    #: Differential privacy per user (``train.dp``): ``{"epsilon", "delta", "noise_multiplier"}``
    #: that user's upload spent, as its client reported; empty when DP is off.
    dp: dict[str, dict[str, float]] = field(default_factory=dict)
    filter_path: str | None = None
    #: The scoring path the ServerApp's filter used (``native`` or ``torch``).
    scoring_kernel: str | None = None
    #: Server-side images per set (test, harmless) for which the extractor fell back
    #: (faces: no face detected, the whole image used).
    feature_fallbacks: dict[str, int] = field(default_factory=dict)
    #: Guarded accuracy and acceptance rate over a grid of alphas (same Guard rule and sides),
    #: to compare methods at a common acceptance level.
    guard_curve: list[dict[str, float]] = field(default_factory=list)
    #: Many users per class: ``i*`` belongs to the test image's owner (and, guarded: blocked
    #: too); ``None`` where test images have no owners (one user per class: owner = class).
    owner_accuracy: float | None = None
    owner_guarded_accuracy: float | None = None
    #: Where the ServerApp's time went (seconds): ``setup`` (test sets, filter, probe),
    #: ``wait_for_nodes``, ``registration`` (first message to last reply),
    #: ``server_handling`` (validating, checking and saving replies, within registration),
    #: ``after_last_reply``, ``evaluation``.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    #: The Guard calibrated to ``guard.target_acceptance`` (:mod:`~docl_flower.core.filter.
    #: conformal`): the chosen alpha, the calibration set, the guaranteed bound, and the
    #: harmless images the acceptance was measured on with the finite-sample ``slack``.
    calibration: dict[str, Any] | None = None
    # --- feature statistics: the classifier trained on features sampled from the uploads
    sampled_classifier_accuracy: float | None = None
    sampled_classifier_per_class_accuracy: dict[str, float] = field(default_factory=dict)
    # --- baselines
    accuracy_curve: list[dict[str, float]] = field(default_factory=list)
    uploads_raw_images: bool = False
    #: The Ray cluster of a simulation (``gcs_address``, ``alive_nodes``, ``cpus``, ``gpus``).
    ray_cluster: dict[str, Any] | None = None
    #: ``num_users`` was taken from the federation's node count (``flwr run .``), not the config.
    users_from_federation: bool = False
    # --- added by the ServerApp and by ``docl-flower``
    #: The Flower run that wrote these results (``docl-flower`` waits for it).
    flower_run_id: int | None = None
    server_seconds: float | None = None
    wall_seconds: float | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def worst_class_accuracy(self) -> float:
        """The lowest per-class accuracy."""
        return min(self.per_class_accuracy.values(), default=float("nan"))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``results.json`` layout)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunResult:
        """Parse a ``results.json`` payload; unknown keys are an error (a different format)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"not a docl-flower results file: unknown keys {unknown}")
        return cls(**raw)


def write_results(path: Path, result: RunResult) -> None:
    """Write ``result`` to ``path`` atomically."""
    write_json_atomic(path, result.to_dict())


def read_results(path: Path) -> RunResult:
    """Read a ``results.json`` written by :func:`write_results`."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read results {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    try:
        return RunResult.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err
