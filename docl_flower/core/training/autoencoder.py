"""The one-class autoencoder of the paper (eq. 2-6): module, training loop, reconstruction errors.

No Flower here. A client calls :func:`train_autoencoder` on its own features and uploads the
parameters plus the mean and standard deviation of :func:`reconstruction_errors`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from docl_flower.core.common.checks import check_int, check_node
from docl_flower.core.training.augment import RandomAffine
from docl_flower.core.training.dp_spec import DpSpec, dp_from_config
from docl_flower.core.training.recipes import build_augment, build_optimizer, build_scheduler

log = logging.getLogger(__name__)

#: Names of the four tensors of one autoencoder, in upload order.
PARAM_NAMES: tuple[str, ...] = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")

#: Values of :attr:`AutoencoderSpec.init`.
INITS: tuple[str, ...] = ("glorot", "torch")


@dataclass(frozen=True)
class AutoencoderSpec:
    """Architecture: ``D -> M -> D`` with ReLU encoder and sigmoid decoder (eq. 2-3).

    Parameters
    ----------
    hidden : int
        Size M of the representation layer (paper: 32; 132 for the larger face model).
    init : str
        ``"glorot"`` (Xavier-uniform weights, zero biases) or ``"torch"`` (PyTorch default).
    """

    hidden: int = 32
    init: str = "glorot"

    def __post_init__(self) -> None:
        check_int("hidden", self.hidden, minimum=1)
        if not isinstance(self.init, str) or self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")

    def shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        """Expected tensor shapes for input dimension ``dim``."""
        m = self.hidden
        return {
            "encoder.weight": (m, dim),
            "encoder.bias": (m,),
            "decoder.weight": (dim, m),
            "decoder.bias": (dim,),
        }


#: How a client estimates ``mu`` and ``sigma`` of its errors (see :mod:`.calibration`).
CALIBRATIONS = ("train", "heldout", "auto")


@dataclass(frozen=True)
class TrainSpec:
    """How a client trains its autoencoder (eq. 4-5) and calibrates its privacy interval.

    ``optimizer``, ``scheduler`` and ``augment`` are registered components named by
    ``_target_`` (see :mod:`.registry`). The loss is the paper's: binary cross-entropy
    summed over the D features, averaged over the batch.

    ``calibration``: ``"train"`` takes ``mu``, ``sigma`` from the errors on the training
    images (the paper); ``"heldout"`` from errors on images held out of training (``folds``
    folds, at most one per image; 0 = leave-one-out), then trains the uploaded autoencoder
    on all images;
    ``"auto"`` uses ``"heldout"`` for a user with fewer than ``heldout_below`` images.

    ``dp``: differential privacy of the upload (:class:`~.dp_spec.DpSpec`, from the ``dp:``
    mapping of the config); off unless ``dp.epsilon`` is set. With it, ``"auto"`` means
    ``"train"`` and ``"heldout"`` is refused (see :mod:`.dp`).
    """

    epochs: int = 100
    batch_size: int = 128
    optimizer: Mapping[str, Any] = field(
        default_factory=lambda: {
            "_target_": "torch.optim.Adadelta",
            "_partial_": True,
            "lr": 1.0,
            "rho": 0.95,
            "eps": 1e-7,
        }
    )
    scheduler: Mapping[str, Any] | None = None
    augment: Mapping[str, Any] | None = None
    num_threads: int = 0
    min_steps: int = 0
    calibration: str = "train"
    folds: int = 5
    heldout_below: int = 50
    dp: DpSpec = field(default_factory=lambda: dp_from_config(None))

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise ValueError(
                f"calibration must be one of {list(CALIBRATIONS)}, got {self.calibration!r}"
            )
        check_int("folds", self.folds, minimum=0)
        check_int("heldout_below", self.heldout_below, minimum=0)
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("num_threads", self.num_threads, minimum=0)
        check_int("min_steps", self.min_steps, minimum=0)
        check_node("optimizer", self.optimizer)
        check_node("scheduler", self.scheduler, optional=True)
        check_node("augment", self.augment, optional=True)
        object.__setattr__(self, "dp", dp_from_config(self.dp))
        if self.dp.enabled and self.calibration == "heldout":
            raise ValueError(
                "calibration: 'heldout' is not available with dp.epsilon set (each of its k "
                "fold models would spend privacy budget); use 'train' or 'auto'"
            )

    def epochs_for(self, num_examples: int) -> int:
        """Epochs to run: ``epochs``, or more when that gives fewer than ``min_steps`` updates.

        A user with few images then gets as many optimiser steps as one with many.
        """
        steps_per_epoch = math.ceil(num_examples / self.batch_size)
        return max(self.epochs, math.ceil(self.min_steps / steps_per_epoch))


class Autoencoder(nn.Module):
    """``x_hat = sigmoid(W' relu(W x + b) + b')`` (eq. 2-3)."""

    def __init__(self, dim: int, spec: AutoencoderSpec) -> None:
        super().__init__()
        self.encoder = nn.Linear(dim, spec.hidden)
        self.decoder = nn.Linear(spec.hidden, dim)
        if spec.init == "glorot":
            for layer in (self.encoder, self.decoder):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        elif spec.init != "torch":
            raise ValueError(f"unknown init {spec.init!r} (use 'glorot' or 'torch')")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid decoder output."""
        out: torch.Tensor = self.decoder(F.relu(self.encoder(x)))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``x_hat`` in ``(0, 1)``."""
        return torch.sigmoid(self.logits(x))


def bce_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Eq. 4 summed over features, averaged over the batch (computed from logits, stably)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


@dataclass
class TrainReport:
    """What training measured: loss per epoch and wall time."""

    losses: list[float]
    seconds: float


def prepare_training(
    x: torch.Tensor,
    model_spec: AutoencoderSpec,
    train_spec: TrainSpec,
    seed: int,
    device: torch.device | str,
) -> tuple[torch.device, torch.Generator, Autoencoder, torch.optim.Optimizer, RandomAffine | None]:
    """The start of every training loop (plain and DP-SGD), in one order for reproducibility.

    Threads, seeds, the freshly initialised autoencoder on ``device``, its optimiser and the
    augmentation, all from ``train_spec``; returns them with the batch-order generator.
    """
    if train_spec.num_threads > 0:
        torch.set_num_threads(train_spec.num_threads)
    dev = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Autoencoder(int(x.shape[1]), model_spec).to(dev)
    optimizer = build_optimizer(train_spec.optimizer, model.parameters())
    augment = build_augment(train_spec.augment)
    return dev, gen, model, optimizer, augment


def train_autoencoder(
    x: torch.Tensor,
    model_spec: AutoencoderSpec,
    train_spec: TrainSpec,
    seed: int,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[Autoencoder, TrainReport]:
    """Train one one-class autoencoder on features ``x`` (shape ``(n, D)``, values in [0, 1]).

    Deterministic for a given seed on a given device.

    Returns
    -------
    tuple of Autoencoder and TrainReport
        The trained model (in eval mode, on the CPU) and the per-epoch losses.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need a non-empty (n, D) feature matrix, got shape {tuple(x.shape)}")
    if train_spec.dp.enabled:
        raise ValueError(
            "train_autoencoder trains without differential privacy; with dp.epsilon set use "
            "calibration.train_and_calibrate (DP-SGD and a private mu, sigma)"
        )
    device, gen, model, optimizer, augment = prepare_training(
        x, model_spec, train_spec, seed, device
    )
    steps_per_epoch = math.ceil(x.shape[0] / train_spec.batch_size)
    epochs = train_spec.epochs_for(x.shape[0])
    scheduler = build_scheduler(train_spec.scheduler, optimizer, steps_per_epoch * epochs)
    data = x.to(device=device, dtype=torch.float32)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(data.shape[0], generator=gen).to(device)
        total = 0.0
        for i in range(0, data.shape[0], train_spec.batch_size):
            batch = data[order[i : i + train_spec.batch_size]]
            if augment is not None:
                batch = augment(batch, generator=gen)
            loss = bce_loss(model.logits(batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += float(loss.detach()) * batch.shape[0]
        losses.append(total / data.shape[0])
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    model.eval()
    return model.cpu(), TrainReport(losses=losses, seconds=time.perf_counter() - start)


@torch.no_grad()
def reconstruction_errors(
    model: Autoencoder, x: torch.Tensor, batch_size: int = 4096
) -> torch.Tensor:
    """Eq. 6: ``d(x, x_hat) = sum_l (x_l - x_hat_l)^2`` for every row of ``x``."""
    device = next(model.parameters()).device
    out = [
        ((model(xb.to(device)) - xb.to(device)) ** 2).sum(dim=1).cpu()
        for xb in torch.split(x, batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)


def error_stats(errors: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) standard deviation of the training errors (the upload's mu, sigma)."""
    return float(errors.mean()), float(errors.std(unbiased=False))


def state_to_numpy(model: Autoencoder) -> dict[str, Any]:
    """Parameters as float32 numpy arrays keyed by :data:`PARAM_NAMES`."""
    state = model.state_dict()
    return {name: state[name].detach().cpu().numpy().astype("float32") for name in PARAM_NAMES}
