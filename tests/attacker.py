"""A compromised device for the fault tests: a ``flwr-clientapp`` that tampers with its reply.

A SuperNode starts its ClientApp process as ``flwr-clientapp`` from its PATH. The fault test
puts an executable of that name first on one SuperNode's PATH; it runs this module, which
wraps Flower's ``push_message`` so that the honest DOCL upload is altered just before it leaves
the device, then runs the real ``flwr-clientapp``. ``DOCL_ATTACK`` names the alteration and
``DOCL_VICTIM`` the user id that a ``claim`` attack pretends to be.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ATTACKS = ("nan", "shape", "sigma-zero", "sigma-huge", "claim")


def tamper(content: Any, attack: str, victim: int) -> None:
    """Alter a DOCL upload (a RecordDict) in place."""
    from flwr.app import Array

    from docl_flower.federation import keys

    if keys.ARRAYS_RECORD not in content.array_records:
        return
    arrays = content.array_records[keys.ARRAYS_RECORD]
    metrics = content.metric_records[keys.METRICS_RECORD]
    name = sorted(arrays.keys())[0]
    value = arrays[name].numpy()
    if attack == "nan":
        bad = value.copy()
        bad.flat[0] = np.nan
        arrays[name] = Array(bad)
    elif attack == "shape":
        arrays[name] = Array(np.zeros((*value.shape[:-1], value.shape[-1] + 1), np.float32))
    elif attack == "sigma-zero":
        metrics[keys.ERR_STD] = [0.0 for _ in metrics[keys.ERR_STD]]
    elif attack == "sigma-huge":
        metrics[keys.ERR_STD] = [1e12 for _ in metrics[keys.ERR_STD]]
    elif attack == "claim":
        metrics[keys.USER_ID] = victim
    else:
        raise ValueError(f"unknown attack {attack!r}; one of {ATTACKS}")


def main() -> None:
    """Patch the reply path, then run the real ``flwr-clientapp``."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli import flwr_clientapp

    attack = os.environ["DOCL_ATTACK"]
    victim = int(os.environ.get("DOCL_VICTIM", "0"))
    honest: Callable[..., None] = runtime.push_message

    def push_tampered(client: Any, message: Any, context: Any) -> None:
        if not message.has_error():
            tamper(message.content, attack, victim)
        honest(client, message, context)

    runtime.push_message = push_tampered  # type: ignore[assignment]
    flwr_clientapp()


def install(bindir: Path) -> Path:
    """Write an executable ``flwr-clientapp`` into ``bindir`` that runs :func:`main`."""
    from .wrapped import install as install_command

    return install_command(bindir, "flwr-clientapp", "attacker")


if __name__ == "__main__":
    main()
