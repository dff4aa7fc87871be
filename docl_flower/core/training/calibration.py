"""Calibrating a user's privacy interval: ``mu`` and ``sigma`` of its autoencoder's errors.

The paper takes them from the errors on the training images. With thousands of images that
is what unseen images of the class give too; with a few photos of a person, the autoencoder
fits them far more closely than the person's other photos, so every new photo falls outside
the interval. The ``heldout`` calibration estimates the errors of unseen photos on the
device: k-fold (leave-one-out by default) autoencoders, each scored on the images it did not
see; the uploaded autoencoder is then trained on all images. Nothing but ``mu``, ``sigma``
and the final autoencoder leaves the device.

With differential privacy (``train.dp.epsilon``), :mod:`.dp` trains with DP-SGD and releases
``mu``, ``sigma`` of the training errors through a Gaussian mechanism; the held-out
calibration is not used then (its fold models would spend budget too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from docl_flower.core.data.seeds import derive_seed
from docl_flower.core.training.autoencoder import (
    Autoencoder,
    AutoencoderSpec,
    TrainReport,
    TrainSpec,
    error_stats,
    reconstruction_errors,
    train_autoencoder,
)
from docl_flower.core.training.dp import PrivacySpent, train_and_release

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibrated:
    """The autoencoder to upload and the statistics of its interval."""

    model: Autoencoder
    report: TrainReport
    err_mean: float
    err_std: float
    method: str
    folds: int
    #: What the upload spent of its privacy budget (``None`` without differential privacy).
    privacy: PrivacySpent | None = None


def method_for(train_spec: TrainSpec, num_examples: int) -> str:
    """``"train"`` or ``"heldout"``: what ``train_spec.calibration`` means for this user."""
    method = train_spec.calibration
    if method == "auto" and train_spec.dp.enabled:
        return "train"  # the held-out folds would spend privacy budget (see TrainSpec)
    if method == "auto":
        method = "heldout" if num_examples < train_spec.heldout_below else "train"
    if method == "heldout" and num_examples < 2:
        log.warning("one image only: nothing to hold out, calibrating on the training error")
        method = "train"
    return method


def train_and_calibrate(
    x: torch.Tensor,
    model_spec: AutoencoderSpec,
    train_spec: TrainSpec,
    seed: int,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float], None] | None = None,
) -> Calibrated:
    """Train the autoencoder on all of ``x`` and estimate ``mu``, ``sigma`` as configured."""
    n = int(x.shape[0])
    method = method_for(train_spec, n)
    if train_spec.dp.enabled:
        fit = train_and_release(x, model_spec, train_spec, seed, device, on_epoch=on_epoch)
        return Calibrated(fit.model, fit.report, fit.err_mean, fit.err_std, method, 0, fit.spent)
    model, report = train_autoencoder(x, model_spec, train_spec, seed, device, on_epoch=on_epoch)
    if method == "train":
        mu, sd = error_stats(reconstruction_errors(model, x))
        return Calibrated(model, report, mu, sd, method, 0)
    folds = min(train_spec.folds or n, n)
    order = np.random.default_rng(derive_seed(seed, 0xCA1)).permutation(n)
    held_errors = []
    for k, held in enumerate(np.array_split(order, folds)):
        keep = np.setdiff1d(order, held)
        fold_model, _ = train_autoencoder(
            x[torch.from_numpy(keep)], model_spec, train_spec, derive_seed(seed, k + 1), device
        )
        held_errors.append(reconstruction_errors(fold_model, x[torch.from_numpy(held)]))
    mu, sd = error_stats(torch.cat(held_errors))
    return Calibrated(model, report, mu, sd, method, folds)
