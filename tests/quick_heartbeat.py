"""A ``flower-supernode`` that sends heartbeats every few seconds, for deployment fault tests.

Flower 1.42 fixes a SuperNode's heartbeat interval at 30 s (``HEARTBEAT_DEFAULT_INTERVAL``, no
option), and the SuperLink declares a node gone after twice its interval: a test that kills a
device waits a minute for that verdict. This executable sets the interval to the SuperLink's
minimum (10 s; heartbeats every ~4 s, the verdict ~20 s after a death), then runs the real
``flower-supernode``. Nothing else changes: the same verdict reaches the ServerApp by the same
path, only sooner.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: The SuperLink's lowest accepted interval (``HEARTBEAT_MIN_INTERVAL``).
INTERVAL_S = 10


def main() -> None:
    """Set the heartbeat interval, then run the real ``flower-supernode``."""
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as connection
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL
    from flwr.supernode.cli import flower_supernode

    for module in (heartbeat, connection):
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):  # a Flower that moved it
            raise SystemExit(f"{module.__name__} has no HEARTBEAT_DEFAULT_INTERVAL to set")
        module.HEARTBEAT_DEFAULT_INTERVAL = max(INTERVAL_S, HEARTBEAT_MIN_INTERVAL)  # type: ignore[attr-defined]
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


def install(bindir: Path) -> Path:
    """Write an executable ``flower-supernode`` into ``bindir`` that runs :func:`main`."""
    from .wrapped import install as install_command

    return install_command(bindir, "flower-supernode", "quick_heartbeat")


if __name__ == "__main__":
    main()
