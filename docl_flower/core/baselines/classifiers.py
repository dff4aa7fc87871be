"""Multi-class classifiers for the FedAvg baselines (McMahan et al. 2017): 2NN and CNN (no Flower).

Both take the same ``(n, D)`` features as the autoencoders (reshaped to the data set's image
shape for the CNN) and are trained with SGD; ``proximal_mu > 0`` adds FedProx's proximal term.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from docl_flower.core.common.checks import check_int, check_number


@dataclass(frozen=True)
class Mlp2NN:
    """The "2NN" of McMahan et al.: 784-200-200-10 with ReLU."""

    hidden: int = 200
    num_classes: int = 10

    def __post_init__(self) -> None:
        check_int("hidden", self.hidden, minimum=1)
        check_int("num_classes", self.num_classes, minimum=2)

    def build(self, dim: int) -> nn.Module:
        """A fresh, untrained module for inputs of dimension ``dim``."""
        return nn.Sequential(
            nn.Linear(dim, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, self.num_classes),
        )


class _ImageLayout(nn.Module):
    """``(N, H*W*C)`` rows (images flattened row-major from ``(H, W, C)``) to ``(N, C, H, W)``."""

    def __init__(self, height: int, width: int, channels: int) -> None:
        super().__init__()
        self.height, self.width, self.channels = height, width, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reshape and move the channels first."""
        return x.reshape(x.shape[0], self.height, self.width, self.channels).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class Cnn:
    """The CNN of McMahan et al.: two 5x5 conv layers with 2x2 max pooling, dense 512, softmax.

    The conv layers have 32 and 64 channels. ``image_shape`` is the data set's: ``(H, W)`` for
    grey or ``(H, W, C)``; features are images flattened row-major from that shape.
    """

    image_shape: Sequence[int]
    num_classes: int = 10

    def __post_init__(self) -> None:
        check_int("num_classes", self.num_classes, minimum=2)
        shape = self.image_shape
        if (
            isinstance(shape, str | bytes)
            or not isinstance(shape, Sequence)
            or len(shape) not in (2, 3)
        ):
            raise ValueError(f"image_shape must be [H, W] or [H, W, C], got {shape!r}")
        dims = tuple(
            check_int("image_shape", d, minimum=1 if i == 2 else 4)  # two 2x2 poolings
            for i, d in enumerate(shape)
        )
        object.__setattr__(self, "image_shape", dims)

    def build(self, dim: int) -> nn.Module:
        """A fresh, untrained module; ``dim`` must be the product of ``image_shape``."""
        if dim != math.prod(self.image_shape):
            raise ValueError(
                f"the CNN needs inputs of shape {list(self.image_shape)} "
                f"(D={math.prod(self.image_shape)}), got D={dim}"
            )
        height, width = self.image_shape[0], self.image_shape[1]
        channels = self.image_shape[2] if len(self.image_shape) == 3 else 1
        return nn.Sequential(
            _ImageLayout(height, width, channels),
            nn.Conv2d(channels, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (height // 4) * (width // 4), 512),
            nn.ReLU(),
            nn.Linear(512, self.num_classes),
        )


ClassifierSpec = Mlp2NN | Cnn


@dataclass(frozen=True)
class SgdSpec:
    """Local training of a classifier: plain SGD (McMahan et al.), optional momentum."""

    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.05
    momentum: float = 0.0

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_number("lr", self.lr, above=0.0)
        check_number("momentum", self.momentum, minimum=0.0)


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: SgdSpec,
    seed: int,
    proximal_mu: float = 0.0,
    device: torch.device | str = "cpu",
) -> float:
    """Train ``model`` in place with cross-entropy; return the wall seconds.

    With ``proximal_mu > 0`` the loss gets FedProx's ``mu/2 * ||w - w_start||^2``.
    """
    device = torch.device(device)
    model.to(device).train()
    start_params = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)
    gen = torch.Generator().manual_seed(seed)
    x, y = x.to(device), y.to(device)
    start = time.perf_counter()
    for _ in range(spec.epochs):
        order = torch.randperm(x.shape[0], generator=gen).to(device)
        for i in range(0, x.shape[0], spec.batch_size):
            idx = order[i : i + spec.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if proximal_mu > 0:
                prox = sum(
                    ((p - p0) ** 2).sum()
                    for p, p0 in zip(model.parameters(), start_params, strict=True)
                )
                loss = loss + 0.5 * proximal_mu * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
            opt.step()
    model.eval().cpu()
    return time.perf_counter() - start


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Predicted class per row of ``x``."""
    model.eval()
    return torch.cat([model(xb).argmax(dim=1) for xb in torch.split(x, batch_size)])


def accuracy_report(pred: torch.Tensor, y: torch.Tensor) -> tuple[float, dict[int, float]]:
    """Overall and per-class accuracy."""
    overall = float((pred == y).double().mean())
    per_class = {
        int(c): float((pred[y == c] == c).double().mean()) for c in torch.unique(y).tolist()
    }
    return overall, per_class
