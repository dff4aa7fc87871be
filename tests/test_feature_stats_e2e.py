"""End-to-end: the feature-statistics baseline as a `flwr run` simulation (3 users, tiny data)."""

from __future__ import annotations

import json

import pytest

from .test_e2e import run_cli, small_run_args

pytestmark = pytest.mark.slow


def test_feature_statistics_register_once_and_nothing_is_sent_back(tiny_root, tmp_path):
    # Execute: 3 users, one digit each; a small classifier of sampled features.
    args = [a for a in small_run_args(tiny_root, tmp_path / "run") if not a.startswith("train.")]
    proc = run_cli(
        *args,
        "strategy=feature_stats",
        "strategy.samples_per_class=200",
        "strategy.classifier_epochs=5",
    )
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "feature_stats"
    assert results["registered"] == [0, 1, 2] and results["failed"] == {}
    assert set(results["per_class_accuracy"]) == {"0", "1", "2"}
    assert 0.8 < results["overall_accuracy"] <= 1.0
    assert 0.5 < results["sampled_classifier_accuracy"] <= 1.0
    for key in ("guarded_accuracy", "acceptance_rate", "ood_auroc"):
        assert 0.0 <= results[key] <= 1.0, key
    assert len(results["guard_curve"]) > 10
    # One upload per user: a float32 mean (784), a packed full covariance and one weight.
    assert results["bytes_uploaded"] == {str(u): 4 * (784 + 784 * 785 // 2 + 1) for u in range(3)}
    assert results["bytes_downloaded"] == {"0": 0, "1": 0, "2": 0}
    assert results["received_array_records"] == {"0": 0, "1": 0, "2": 0}
    assert results["receives_others_parameters"] is False
    assert "sampled-feature classifier accuracy" in proc.stdout
