"""Grid proxies: one hands each reply on as it arrives, one counts parameter bytes per node."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from . import keys
from .uploads import record_bytes

log = logging.getLogger(__name__)


class ForwardingGrid(Grid):
    """A :class:`Grid` that forwards every call to another grid; subclasses override some."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    @property
    def run(self) -> Run:
        """The run of the wrapped grid."""
        return self._grid.run

    def set_run(self, run: Run) -> None:
        """Forwarded."""
        self._grid.set_run(run)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Forwarded."""
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Forwarded."""
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forwarded."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forwarded."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forwarded."""
        return self._grid.send_and_receive(messages, timeout=timeout)


class SimulationGrid(ForwardingGrid):
    """The grid of a simulation, carrying how many messages may wait in the SuperLink at once.

    Flower's simulation engine polls the SuperLink for every node every 0.1 s, and each poll
    scans every stored message: with N nodes and S stored messages a poll costs N * S checks.
    Pushing 1,000 messages at once makes that 10^6 checks per poll (measured: the simulation
    process kept a core busy and registered about 20 users a minute). A window of a few
    messages per concurrent client keeps S small; a deployment (real SuperNodes that each
    pull their own messages) gets no window.
    """

    def __init__(self, grid: Grid, send_window: int) -> None:
        super().__init__(grid)
        self.send_window = send_window


class StreamingGrid(ForwardingGrid):
    """A Grid proxy whose ``send_and_receive`` hands each reply to ``on_reply`` as it arrives.

    Same contract as :meth:`flwr.serverapp.Grid.send_and_receive` (push, then pull until every
    reply is in or the timeout passes), so the inherited :meth:`Strategy.start` drives it.
    When the wrapped grid is a :class:`SimulationGrid` with a ``send_window``, at most that many
    messages are pushed and unanswered at a time; the next is pushed as a reply comes in.
    """

    def __init__(
        self, grid: Grid, on_reply: Callable[[Message, int | None], None], poll_s: float = 1.0
    ) -> None:
        super().__init__(grid)
        self._on_reply = on_reply
        self._poll_s = poll_s
        self._window = grid.send_window if isinstance(grid, SimulationGrid) else 0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull replies until all are in or ``timeout`` seconds have passed.

        ``on_reply`` gets each reply and the node its message was sent to.
        """
        waiting = list(messages)
        window = self._window if self._window > 0 else len(waiting)
        # A short poll when messages are fed in: a worker should not wait for its next one.
        poll_s = min(self._poll_s, 0.05) if window < len(waiting) else self._poll_s
        dst: dict[str, int] = {}
        pending: set[str] = set()

        def push() -> None:
            batch = waiting[: max(0, window - len(pending))]
            del waiting[: len(batch)]
            if batch:
                ids = list(self._grid.push_messages(batch))
                for i, m in zip(ids, batch, strict=True):
                    if i:
                        dst[i] = m.metadata.dst_node_id
                        pending.add(i)

        push()
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while (pending or waiting) and (timeout is None or time.monotonic() < end):
            new = list(self._grid.pull_messages(pending)) if pending else []
            for msg in new:
                pending.discard(msg.metadata.reply_to_message_id)
                self._on_reply(msg, dst.get(msg.metadata.reply_to_message_id))
            replies.extend(new)
            push()
            if pending and not new:
                time.sleep(poll_s)
        if waiting:
            log.warning("%d messages were never sent: the timeout passed first", len(waiting))
        return replies


class CountingGrid(ForwardingGrid):
    """A Grid proxy that counts the parameter bytes of every message, per node and direction.

    Replies carry the user id in their MetricRecord, which maps node ids to users.
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}
        self.user_of: dict[int, int] = {}
        self.errors: dict[int, str] = {}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Count what is sent and received, then pass the replies on."""
        msgs = list(messages)
        for m in msgs:
            node = m.metadata.dst_node_id
            self.down[node] = self.down.get(node, 0) + record_bytes(m.content)
        replies = list(self._grid.send_and_receive(msgs, timeout=timeout))
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error():
                self.errors[node] = f"code {r.error.code}: {r.error.reason}"
                continue
            self.up[node] = self.up.get(node, 0) + record_bytes(r.content)
            metrics = r.content.metric_records.get(keys.METRICS_RECORD)
            user = (
                _as_int(metrics[keys.USER_ID])
                if metrics is not None and keys.USER_ID in metrics
                else None
            )
            if user is not None:
                self.user_of[node] = user
        return replies

    def per_user(self, counts: Mapping[int, int]) -> dict[str, int]:
        """Bytes per user id (nodes that never replied are keyed ``node-<id>``)."""
        return {
            str(self.user_of[n]) if n in self.user_of else f"node-{n}": b
            for n, b in sorted(counts.items(), key=lambda kv: self.user_of.get(kv[0], 1 << 62))
        }


def _as_int(value: object) -> int | None:
    """``value`` as an int when it is an integral finite number, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value)
