"""What a training recipe names: optimisers, schedulers and the augmentation, by name.

The table of the components a client builds from its recipe (``train.optimizer``,
``train.scheduler``, ``train.augment``), and the builders the training loops use. Below the
model in the import graph: it knows torch and :mod:`.augment` only.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from docl_flower.core.common.registry import Registry
from docl_flower.core.training.augment import RandomAffine

#: The optimisers, schedulers and augmentations a recipe may name.
RECIPES = Registry(
    {
        "optimizer": {
            "torch.optim.Adam": torch.optim.Adam,
            "torch.optim.AdamW": torch.optim.AdamW,
            "torch.optim.Adadelta": torch.optim.Adadelta,
            "torch.optim.SGD": torch.optim.SGD,
        },
        "scheduler": {
            "torch.optim.lr_scheduler.OneCycleLR": torch.optim.lr_scheduler.OneCycleLR,
            "torch.optim.lr_scheduler.CosineAnnealingLR": (
                torch.optim.lr_scheduler.CosineAnnealingLR
            ),
        },
        # The name the configs have always used (the class lived in the model module).
        "augment": {"docl_flower.core.model.RandomAffine": RandomAffine},
    }
)


def build_optimizer(
    cfg: Mapping[str, Any], params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """The optimiser ``cfg`` names, over ``params``."""
    make = RECIPES.build("optimizer", cfg, partial=True)
    assert callable(make)
    optimizer = make(params)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"builds a {type(optimizer).__name__}, not an optimiser")
    return optimizer


def build_augment(cfg: Mapping[str, Any] | None) -> RandomAffine | None:
    """The augmentation ``cfg`` names, or ``None``."""
    if cfg is None:
        return None
    augment = RECIPES.build("augment", cfg)
    if not isinstance(augment, RandomAffine):
        raise ValueError(f"builds a {type(augment).__name__}, not an augmentation")
    return augment


def build_scheduler(
    cfg: Mapping[str, Any] | None, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Instantiate a per-step scheduler, passing the step count where it asks for one."""
    if cfg is None:
        return None
    factory = RECIPES.build("scheduler", cfg, partial=True)
    assert isinstance(factory, functools.partial)
    params = inspect.signature(factory.func).parameters
    kwargs: dict[str, int] = {}
    if "total_steps" in params and "total_steps" not in factory.keywords:
        kwargs["total_steps"] = total_steps
    if "T_max" in params and "T_max" not in factory.keywords:
        kwargs["T_max"] = total_steps
    sched: torch.optim.lr_scheduler.LRScheduler = factory(optimizer, **kwargs)
    return sched
