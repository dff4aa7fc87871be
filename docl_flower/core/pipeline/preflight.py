"""Checks that need the machine, run before any process starts: data on disk, memory.

:func:`build_experiment` checks every setting on its own; what it cannot know without looking
at the machine is checked here, by ``docl-flower`` before it starts a SuperLink or Ray:

- every data set the run reads is present and passes its checksum (a missing archive is
  downloaded where the data set allows it), with the one line that says how to get it;
- the model fits: a memory estimate of training one model (clients at once) and of the
  server's filter, against this machine's memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from docl_flower.core.data.base import DataError, ImageDataset
from docl_flower.core.pipeline.config import Experiment
from docl_flower.core.training.autoencoder import AutoencoderSpec

#: Bytes of one float32 parameter and the copies training keeps of each (the weight, its
#: gradient and the two moments of Adam, the optimiser of every recipe here).
FLOAT_BYTES = 4
TRAINING_COPIES = 4
#: Copies the server holds of every registered autoencoder (the tensors, and the fused
#: kernel's packed layout).
SERVER_COPIES = 2
#: Activations kept per image and feature during a training step (input, reconstruction,
#: their gradients, the loss terms).
ACTIVATION_COPIES = 6
#: Share of the machine's memory that the estimate may take: the rest is Python, torch, Ray
#: and Flower themselves (about 0.4 GB per process).
MEMORY_SHARE = 0.8


def check_data(exp: Experiment) -> None:
    """Raise ``ValueError`` (one line, how to get the data) unless every data set is usable.

    The training data set needs both splits (clients train, the server evaluates); the
    harmless data set its test split.
    """
    needed: list[tuple[ImageDataset, str, tuple[str, ...]]] = [
        (exp.dataset, "dataset", ("train", "test"))
    ]
    if exp.harmless is not None:
        needed.append((exp.harmless, "dataset.harmless", ("test",)))
    for dataset, key, splits in needed:
        for split in splits:
            try:
                dataset.check(split)  # type: ignore[arg-type]
            except DataError as err:
                raise ValueError(f"{key} ({split} split): {' '.join(str(err).split())}") from err
            except OSError as err:
                raise ValueError(f"{key} ({split} split): cannot read it ({err})") from err


def parameter_count(exp: Experiment, dim: int) -> int:
    """Parameters of one model of ``exp`` for features of dimension ``dim`` (none allocated)."""
    model = exp.model
    if isinstance(model, AutoencoderSpec):
        return sum(math.prod(shape) for shape in model.shapes(dim).values())
    with torch.device("meta"):
        module: nn.Module = model.build(dim)
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class MemoryEstimate:
    """What a run needs at its peak, in bytes."""

    dim: int
    parameters: int
    per_client: int
    clients_at_once: int
    server: int

    @property
    def total(self) -> int:
        """Clients training at once, plus the server's filter."""
        return self.per_client * self.clients_at_once + self.server


def estimate_memory(exp: Experiment, clients_at_once: int) -> MemoryEstimate:
    """The memory that training ``clients_at_once`` models and holding the filter needs."""
    dim = exp.features.dim(exp.dataset.image_shape)
    params = parameter_count(exp, dim)
    batch = int(getattr(exp.train, "batch_size", 1))
    per_client = FLOAT_BYTES * (TRAINING_COPIES * params + ACTIVATION_COPIES * batch * dim)
    models = sum(len(c) for c in exp.assignment.values())
    registered = models if isinstance(exp.model, AutoencoderSpec) else 1
    server = FLOAT_BYTES * SERVER_COPIES * params * registered
    return MemoryEstimate(dim, params, per_client, max(1, clients_at_once), server)


def machine_memory() -> int | None:
    """Physical memory of this machine in bytes (``None`` where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def check_memory(exp: Experiment, clients_at_once: int, available: int | None = None) -> None:
    """Raise ``ValueError`` naming the model when the estimate exceeds the machine's memory."""
    available = machine_memory() if available is None else available
    est = estimate_memory(exp, clients_at_once)
    if available is None or est.total <= MEMORY_SHARE * available:
        return
    key = "model.hidden" if isinstance(exp.model, AutoencoderSpec) else "model"
    raise ValueError(
        f"{key}: the model does not fit this machine: {est.parameters:,} parameters at "
        f"D = {est.dim}; training needs about {_gb(est.per_client)} per client "
        f"({est.clients_at_once} at once) and the server's filter {_gb(est.server)}, "
        f"{_gb(est.total)} in all, over {MEMORY_SHARE:.0%} of this machine's "
        f"{_gb(available)}"
    )
