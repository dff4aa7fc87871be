"""The edited re-uploads experiment on a small in-process run: edits, measurements, summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from docl_flower.experiments import robustness
from docl_flower.operations import deciding

from .conftest import PROJECT_ROOT
from .fake_runs import FakeLaunch


def _photos() -> np.ndarray:
    root = PROJECT_ROOT / "data" / "att-faces"
    return np.stack([np.asarray(Image.open(root / f"s{p}" / "1.pgm")) for p in (1, 2, 3)])


@pytest.mark.parametrize("name", list(robustness.EDITS))
def test_every_edit_keeps_the_shape_and_changes_the_photo_except_none(name):
    photos = _photos()
    out = robustness.edited(photos, robustness.EDITS[name], (112, 92))
    assert out.shape == photos.shape and out.dtype == np.uint8
    if name == "none":
        np.testing.assert_array_equal(out, photos)
    else:
        assert not np.array_equal(out, photos), name
    # deterministic: the same edit twice gives the same pixels
    np.testing.assert_array_equal(out, robustness.edited(photos, robustness.EDITS[name], (112, 92)))


def test_an_rgb_filter_reads_edited_grey_photos_as_rgb():
    out = robustness.edited(_photos(), robustness.EDITS["crop 10%"], (48, 40, 3))
    assert out.shape == (3, 48, 40, 3)


def test_a_run_is_measured_per_edit_as_filter_check_decides(tmp_path):
    # Prepare: the pixel setting on ORL, one seed, an in-process run of tiny autoencoders.
    settings = robustness.RobustnessSettings(out=tmp_path, settings=("pixels",), seeds=(0,))
    fake = FakeLaunch(epochs=2)
    # Execute
    found = robustness.run_robustness(settings, runner=lambda o, f: fake(o, f))
    # Assert: one run, calibrated to the stated target; a row per edit, in order.
    ((overrides, folder),) = fake.calls
    assert "guard.target_acceptance=0.98" in overrides and "seed=0" in overrides
    (run,) = found["pixels"]
    assert [r["edit"] for r in run["edits"]] == list(robustness.EDITS)
    assert (run["own_photos"], run["held_out_photos"], run["other_people_photos"]) == (70, 30, 300)
    for r in run["edits"]:
        assert 0.0 <= r["own_blocked"] <= 1.0 and 0.0 <= r["held_out_blocked"] <= 1.0
    # The unedited row is what the saved filter decides for the photos themselves.
    exp = robustness.load_experiment(folder / "experiment.yaml")
    images, labels = exp.dataset.load("train")
    own = images[np.isin(labels, [c for classes in exp.assignment.values() for c in classes])]
    decided = deciding.decide(deciding.load(folder / "filter"), own, -1)
    assert run["edits"][0]["own_blocked"] == sum(d.block for d in decided) / len(decided)
    assert json.loads((tmp_path / "robustness.json").read_text()) == json.loads(json.dumps(found))
    text = (tmp_path / "summary.md").read_text()
    assert "| horizontal flip |" in text and "| others accepted |" in text


def test_unknown_settings_and_targets_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown settings"):
        robustness.RobustnessSettings(out=tmp_path, settings=("cifar",))
    with pytest.raises(ValueError, match="target"):
        robustness.RobustnessSettings(out=tmp_path, target=1.0)
