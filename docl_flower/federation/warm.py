"""Warm Ray workers of a simulation: import the ClientApp while the ServerApp sets up.

Flower creates its Ray actors when the simulation starts, but an actor imports the ClientApp
(torch, flwr, this package) only when its first message arrives, and torch imports its
compiler on the first optimiser: 3-4 s of one core per actor on the critical path of a short
run. Ray runs a job's ``worker_process_setup_hook`` in each of its workers as it starts, so
these imports overlap the ServerApp's own set-up instead. Flower's backend calls
``ray.init`` with a runtime environment of its own; Ray passes that environment through the
hook named by ``RAY_RUNTIME_ENV_HOOK``, which adds ours (:func:`runtime_env_hook`).
``docl-flower`` sets that variable for the simulations it starts
(:func:`~docl_flower.operations.simulation.run_app`); warming changes no result.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

#: The environment variable through which Ray's ``ray.init`` calls :func:`runtime_env_hook`.
RAY_RUNTIME_ENV_HOOK = "RAY_RUNTIME_ENV_HOOK"
HOOK = f"{__name__}.runtime_env_hook"
SETUP = f"{__name__}.prepare_worker"


def runtime_env_hook(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """The job's runtime environment with :func:`prepare_worker` as its worker set-up hook.

    A set-up hook the job names already is kept.
    """
    env = dict(runtime_env or {})
    env.setdefault("worker_process_setup_hook", SETUP)
    return env


def prepare_worker() -> None:
    """Import what a ClientApp's first message needs; never fail the worker."""
    try:
        import torch._dynamo  # noqa: F401  (imported by the first optimiser otherwise)

        from . import client_app, client_tasks  # noqa: F401
    except Exception:  # warming is an optimisation: the first message imports it again
        log.warning("could not pre-import the ClientApp in this Ray worker", exc_info=True)
