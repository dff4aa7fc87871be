"""The calibration experiment on tiny runs: the split, the measurements, the summary."""

from __future__ import annotations

import json

import pytest

from docl_flower.experiments import calibration

from .fake_runs import FakeLaunch

# Two-sided: the tiny, weak autoencoders reconstruct some harmless images better than their
# own (one-sided, no alpha > 0 would hold the target then; tested in test_conformal.py).
TINY = (
    "dataset.verify=false",
    "dataset.harmless.verify=false",
    "num_users=3",
    "guard.sided=two",
)


def test_each_seed_is_one_run_and_every_target_is_measured_on_unseen_harmless_images(
    tiny_root, tmp_path
):
    # Prepare: two seeds of the MNIST setting, tiny data, a fake launcher.
    settings = calibration.CalibrationSettings(
        out=tmp_path,
        settings=("mnist",),
        seeds=(0, 1),
        targets=(0.8, 0.9),
        extra=(f"data_root={tiny_root}", *TINY),
    )
    fake = FakeLaunch(epochs=2)

    # Execute
    found = calibration.run_calibration(settings, runner=lambda o, f: fake(o, f))

    # Assert: one run per seed with its seed, and a row per (seed, target).
    assert [
        o[o.index("seed=0") if "seed=0" in o else o.index("seed=1")] for o, _ in fake.calls
    ] == [
        "seed=0",
        "seed=1",
    ]
    rows = found["mnist"]
    assert [(r["seed"], r["target"]) for r in rows] == [(0, 0.8), (0, 0.9), (1, 0.8), (1, 0.9)]
    for r in rows:
        # half of the harmless images calibrate, the other half measure
        assert abs(r["calibration_images"] - r["test_images"]) <= 1
        assert 0 < r["alpha"] <= 2.0 and r["holds"] == (r["acceptance"] >= r["target"] - r["slack"])
    # A higher target never picks a wider interval (it blocks fewer harmless images).
    for seed in (0, 1):
        low, high = (r for r in rows if r["seed"] == seed)
        assert high["alpha"] <= low["alpha"] and high["acceptance"] >= low["acceptance"]
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["mnist"] == json.loads(json.dumps(rows))
    text = (tmp_path / "summary.md").read_text()
    assert "## mnist" in text and "| 0.80 |" in text and "fixed alpha" in text


def test_unknown_settings_and_targets_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown settings"):
        calibration.CalibrationSettings(out=tmp_path, settings=("cifar",))
    with pytest.raises(ValueError, match="targets"):
        calibration.CalibrationSettings(out=tmp_path, targets=(1.0,))
