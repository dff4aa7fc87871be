"""Calibrating the privacy interval of a user with few images (held-out errors, one-sided)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from docl_flower.core.data.idx import IdxDataset
from docl_flower.core.data.partitions import class_indices
from docl_flower.core.features.extractors import Identity
from docl_flower.core.filter.global_filter import ArgminGuard, GlobalFilter, Registration
from docl_flower.core.training.autoencoder import (
    AutoencoderSpec,
    TrainSpec,
    reconstruction_errors,
    state_to_numpy,
)
from docl_flower.core.training.calibration import method_for, train_and_calibrate

from .conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = IdxDataset("mnist", str(PROJECT_ROOT / "data" / "mnist")).load("test")
    idx = class_indices(labels, 3)
    x = Identity()(images[idx[:60]])
    return x[:7], x[7:]  # 7 photos of the user, 53 unseen ones of the same class


def test_auto_uses_heldout_errors_for_few_images_only():
    spec = TrainSpec(calibration="auto", heldout_below=200)
    assert method_for(spec, 7) == "heldout" and method_for(spec, 5000) == "train"
    assert method_for(TrainSpec(calibration="heldout"), 1) == "train"  # nothing to hold out


def test_heldout_calibration_covers_unseen_photos_where_training_errors_do_not(digits):
    seen, unseen = digits
    recipe = {"epochs": 300, "batch_size": 8, "folds": 0}
    model_spec = AutoencoderSpec(hidden=16)
    fits = {
        method: train_and_calibrate(seen, model_spec, TrainSpec(calibration=method, **recipe), 0)
        for method in ("train", "heldout")
    }
    # The uploaded autoencoder is the same: trained on all seven photos, same seed.
    assert torch.equal(fits["train"].model.encoder.weight, fits["heldout"].model.encoder.weight)
    assert fits["heldout"].folds == 7 and fits["train"].folds == 0
    errors = reconstruction_errors(fits["train"].model, unseen)

    def covered(method: str, sided: str) -> float:
        fit = fits[method]
        reg = Registration(0, 3, state_to_numpy(fit.model), fit.err_mean, fit.err_std, 7)
        flt = GlobalFilter([reg])
        return float(flt.inside(errors[:, None], 1.5, sided).float().mean())

    # Training errors: unseen photos of the person fall outside the interval.
    assert fits["heldout"].err_mean > 2 * fits["train"].err_mean
    assert covered("train", "two") < 0.3
    # Held-out errors and the one-sided rule cover most of them.
    assert covered("heldout", "one") > 0.7
    assert covered("heldout", "one") >= covered("heldout", "two")


def test_one_sided_guard_blocks_an_image_reconstructed_better_than_the_owners_own():
    rng = np.random.default_rng(0)
    params = {
        "encoder.weight": rng.normal(size=(2, 4)).astype(np.float32),
        "encoder.bias": np.zeros(2, np.float32),
        "decoder.weight": rng.normal(size=(4, 2)).astype(np.float32),
        "decoder.bias": np.zeros(4, np.float32),
    }
    flt = GlobalFilter([Registration(0, 0, params, 10.0, 1.0, 5)])
    scores = torch.tensor([[2.0], [10.5], [20.0]])  # far below, inside, far above mu = 10
    assert ArgminGuard(1.5, "two").block(flt, scores, -1).tolist() == [False, True, False]
    assert ArgminGuard(1.5, "one").block(flt, scores, -1).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="sided"):
        ArgminGuard(1.5, "both")
