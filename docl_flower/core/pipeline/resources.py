"""Where a simulation's clients run: Ray resources per client and the Ray cluster."""

from __future__ import annotations

import re
from dataclasses import dataclass

from docl_flower.core.common.checks import check_int, check_number

#: ``HOST:PORT`` of a Ray head: a host name or IPv4 address and a port.
_RAY_ADDRESS = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]*:[0-9]{1,5}")


@dataclass(frozen=True)
class SimulationSpec:
    """Ray simulation resources per client (``num_gpus > 0`` puts clients on the GPU).

    ``ray_address``: the Ray cluster the simulation runs on. ``None`` (default):
    ``RAY_ADDRESS`` if set, else a one-node Ray head of the run's own, started next to the
    SuperLink and killed at the end; ``"local"``: Flower's simulation starts a new local
    instance itself; ``"auto"``: the cluster started on this machine with ``ray start
    --head``; ``"HOST:PORT"``: the cluster whose head (GCS) listens there.

    ``send_window``: at most this many messages wait in the SuperLink at once (0: all at
    once); ``None``: 4 per client slot of this machine, 64 on a joined cluster.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    ray_address: str | None = None
    send_window: int | None = None

    def __post_init__(self) -> None:
        check_number("num_cpus", self.num_cpus, above=0.0)
        check_number("num_gpus", self.num_gpus, minimum=0.0)
        if self.send_window is not None:
            check_int("send_window", self.send_window, minimum=0)
        address = self.ray_address
        if address is not None and not (
            isinstance(address, str)
            and (address in ("auto", "local") or _RAY_ADDRESS.fullmatch(address))
        ):
            raise ValueError(
                f"ray_address must be null, 'auto', 'local' or HOST:PORT, got {address!r}"
            )
