"""Server-side workflows, one per ``strategy`` config option: DOCL and the baselines.

Every workflow runs inside the ServerApp and returns a
:class:`~docl_flower.core.evaluation.results.RunResult`; the ServerApp adds what every run shares
and writes it. The ``strategy`` config group selects a workflow with ``_target_``; its
``CLIENT_TASK`` names the task the clients run (a key of the ClientApp's task registry). The
baselines: FedAvg-family classifiers, a centralised reference, and one-shot per-class feature
statistics (FedPFT-style: like DOCL, each user uploads once and receives nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import torch
from flwr.serverapp import Grid

from docl_flower.core.evaluation.results import RunResult
from docl_flower.core.pipeline.config import Experiment
from docl_flower.core.pipeline.inputs import server_sets


@runtime_checkable
class Workflow(Protocol):
    """A server-side workflow: drive the clients through ``grid``, evaluate, return results."""

    CLIENT_TASK: ClassVar[str]

    def run(self, grid: Grid, exp: Experiment, out_dir: Path) -> RunResult:
        """Run the experiment ``exp``; ``out_dir`` holds the run's files."""
        ...


def as_workflow(spec: object) -> Workflow:
    """``spec`` as a :class:`Workflow` (raises ``TypeError`` when it is none)."""
    if not isinstance(spec, Workflow):
        raise TypeError(f"{type(spec).__name__} is not a workflow (no run method)")
    return spec


def held_test_set(exp: Experiment) -> tuple[torch.Tensor, torch.Tensor]:
    """Test images of the classes the users hold (what DOCL's overall accuracy covers)."""
    sets = server_sets(exp)
    held = torch.tensor(sorted({c for cs in exp.assignment.values() for c in cs}))
    mask = torch.isin(sets.y_test, held)
    return sets.x_test[mask], sets.y_test[mask]
