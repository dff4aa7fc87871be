"""What a user's device computes: one autoencoder per class it owns, from its own rows only.

The ClientApp (:mod:`docl_flower.federation.client_tasks`) and the plain loop without Flower
(:mod:`.plain`) both call :func:`fit_user`, so that both train the same autoencoders: same
data rows, features, recipe and seeds. No Flower here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from docl_flower.core.data.base import ImageDataset
from docl_flower.core.data.seeds import derive_seed
from docl_flower.core.pipeline.client_spec import ClientSpec
from docl_flower.core.pipeline.inputs import split_features
from docl_flower.core.training.autoencoder import AutoencoderSpec, TrainSpec
from docl_flower.core.training.calibration import Calibrated, train_and_calibrate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassFit:
    """One of a user's autoencoders: its class, the training rows it saw, the fit."""

    label: int
    rows: NDArray[np.int64]
    fit: Calibrated


#: Seconds a training runs before its progress is logged (at each quarter of its epochs).
PROGRESS_AFTER_S = 1.0


def _progress(
    user: int, cls: int, epochs: int, clock: Callable[[], float] = time.perf_counter
) -> Callable[[int, float], None]:
    """Log a training's loss at each quarter of its epochs, once it has run a second.

    A short training (60 images: 0.3 s) logs only its start and its result: at 1,000 users,
    five progress lines each were 5,000 lines through Ray's log monitor, the simulation, the
    SuperLink and ``flwr run``, for nothing anyone reads.
    """
    step = max(1, epochs // 4)
    started = clock()

    def report(epoch: int, loss: float) -> None:
        if (epoch + 1) % step and epoch + 1 != epochs:
            return
        if clock() - started >= PROGRESS_AFTER_S:
            log.info("user %d class %d: epoch %d/%d, loss %.3f", user, cls, epoch + 1, epochs, loss)

    return report


def fit_user(
    spec: ClientSpec,
    user: int,
    dataset: ImageDataset,
    images: NDArray[np.uint8],
    labels: NDArray[np.int64],
    device: torch.device,
) -> list[ClassFit]:
    """Train and calibrate ``user``'s autoencoder(s) on the rows the partition gives it.

    ``images``, ``labels``: the training split of ``dataset`` (loaded by the caller, once per
    process). Features come from the feature cache or are extracted here, for these rows only.
    """
    model_spec, train_spec = spec.model, spec.train
    if not isinstance(model_spec, AutoencoderSpec) or not isinstance(train_spec, TrainSpec):
        raise ValueError("the DOCL task needs an autoencoder model and its training recipe")
    features = spec.features
    out = []
    for c in spec.assignment[user]:
        idx = spec.training_indices(user, c, labels)
        if idx.size == 0:
            raise ValueError(f"user {user} holds no training image of class {c}")
        x = split_features(dataset, features, "train", idx, images).features
        log.info("user %d: training class %d on %d images (%s)", user, c, len(idx), device)
        fit = train_and_calibrate(
            x,
            model_spec,
            train_spec,
            derive_seed(spec.seed, user, c),
            device,
            on_epoch=_progress(user, c, train_spec.epochs_for(len(idx))),
        )
        log.info(
            "user %d class %d: mu %.3f sigma %.3f (%s errors), %.1fs",
            user,
            c,
            fit.err_mean,
            fit.err_std,
            fit.method,
            fit.report.seconds,
        )
        out.append(ClassFit(int(c), idx, fit))
    return out
