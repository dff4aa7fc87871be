"""Which nodes take part: waiting for connections, and the operator's node -> user bindings."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from pathlib import Path

from flwr.serverapp import Grid

log = logging.getLogger(__name__)


def wait_for_nodes(
    grid: Grid,
    expected: int,
    deadline_s: float,
    poll_s: float = 1.0,
    required: Collection[int] | None = None,
) -> list[int]:
    """Wait until ``expected`` nodes (or every node in ``required``) are connected.

    Returns the nodes present when that happens or when the deadline passes.
    """
    start = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        done = set(required) <= set(nodes) if required is not None else len(nodes) >= expected
        if done or time.monotonic() - start >= deadline_s:
            return nodes
        log.info("Waiting for nodes: %d/%d connected", len(nodes), expected)
        time.sleep(poll_s)


def is_simulation(grid: Grid) -> bool:
    """Whether ``grid`` (or the grid it wraps) is a simulation's, whose nodes the server owns.

    Flower's simulation engine gives the ServerApp an ``InMemoryGrid``; a deployment gives it
    a gRPC grid. Where that class cannot be imported, the run is treated as a deployment.
    """
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # pragma: no cover - a Flower without it: no simulation binding
        return False
    seen = 0
    while seen < 8:  # our wrappers keep the grid they forward to as ``_grid``
        if isinstance(grid, InMemoryGrid):
            return True
        inner = getattr(grid, "_grid", None)
        if not isinstance(inner, Grid):
            return False
        grid, seen = inner, seen + 1
    return False


def assign_users(nodes: Collection[int], users: Collection[int]) -> dict[int, int]:
    """Bind a simulation's nodes to users: the i-th smallest node id plays the i-th user.

    Node ids are random per run, so no user is tied to a node across runs; what matters is
    that the server, not the node, decides. Nodes beyond the users stay unbound.
    """
    return dict(zip(sorted(nodes), sorted(users), strict=False))


def load_bindings(path: str | Path) -> dict[int, int]:
    """Read the operator's node -> user bindings: a JSON object ``{"<node id>": user id}``."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read node bindings {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"node bindings {path}: expected a JSON object node id -> user id")
    try:
        return {int(node): int(user) for node, user in raw.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"node bindings {path}: node and user ids must be integers") from err


def federation_nodes(
    grid: Grid, deadline_s: float = 120.0, settle_s: float = 2.0, poll_s: float = 0.5
) -> list[int]:
    """The nodes of the federation: wait for the first, then until none joins for ``settle_s``.

    For a run whose number of users follows the federation (``flwr run .`` without
    ``num_users``). Returns ``[]`` when no node connects before the deadline.
    """
    start = time.monotonic()
    seen: list[int] = []
    stable_since = start
    while time.monotonic() - start < deadline_s:
        nodes = sorted(grid.get_node_ids())
        now = time.monotonic()
        if nodes != seen:
            seen, stable_since = nodes, now
        elif seen and now - stable_since >= settle_s:
            break
        time.sleep(poll_s)
    return seen
