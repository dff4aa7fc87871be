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


class StreamingGrid(ForwardingGrid):
    """A Grid proxy whose ``send_and_receive`` hands each reply to ``on_reply`` as it arrives.

    Same contract as :meth:`flwr.serverapp.Grid.send_and_receive` (push, then pull until every
    reply is in or the timeout passes), so the inherited :meth:`Strategy.start` drives it.
    """

    def __init__(
        self, grid: Grid, on_reply: Callable[[Message, int | None], None], poll_s: float = 1.0
    ) -> None:
        super().__init__(grid)
        self._on_reply = on_reply
        self._poll_s = poll_s

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull replies until all are in or ``timeout`` seconds have passed.

        ``on_reply`` gets each reply and the node its message was sent to.
        """
        msgs = list(messages)
        ids = list(self._grid.push_messages(msgs))
        dst = {i: m.metadata.dst_node_id for i, m in zip(ids, msgs, strict=True) if i}
        pending = set(dst)
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while pending and (timeout is None or time.monotonic() < end):
            new = list(self._grid.pull_messages(pending))
            for msg in new:
                pending.discard(msg.metadata.reply_to_message_id)
                self._on_reply(msg, dst.get(msg.metadata.reply_to_message_id))
            replies.extend(new)
            if pending and not new:
                time.sleep(self._poll_s)
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
