"""Grid proxies: one hands each reply on as it arrives, one counts parameter bytes per node."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

import httpx
from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from . import keys
from .uploads import record_bytes

log = logging.getLogger(__name__)

#: Reply errors that say the reply was lost on its way, not that the node failed: the SuperLink
#: kept the reply's header but lost objects of its body (Flower's ``MESSAGE_UNAVAILABLE``,
#: "Reply message objects are unavailable ... the object could not be found"). Seen once in CI
#: on a loaded 2-core machine in the deployment fault test. Such a message is sent once more.
TRANSPORT_ERRORS = frozenset({ErrorCode.MESSAGE_UNAVAILABLE})
#: How many times one message is sent again after a transport error.
MAX_RESENDS = 1


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
        self,
        grid: Grid,
        on_reply: Callable[[Message, int | None], None],
        poll_s: float = 1.0,
        max_resends: int = MAX_RESENDS,
    ) -> None:
        super().__init__(grid)
        self._on_reply = on_reply
        self._poll_s = poll_s
        self._window = grid.send_window if isinstance(grid, SimulationGrid) else 0
        self._max_resends = max_resends
        #: node id -> how many times its message was sent again (after a transport error)
        self.resent: dict[int, int] = {}
        #: pulls that the SuperLink answered with a server error (5xx) and that were repeated
        self.failed_pulls = 0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull replies until all are in or ``timeout`` seconds have passed.

        ``on_reply`` gets each reply and the node its message was sent to. A reply that says
        it was lost in transport (:data:`TRANSPORT_ERRORS`) is not handed on while the message
        may still be sent again (``max_resends`` times, within the timeout): a fresh copy goes
        to the same node instead, and its reply counts.
        """
        waiting = list(messages)
        window = self._window if self._window > 0 else len(waiting)
        # A short poll when messages are fed in: a worker should not wait for its next one.
        poll_s = min(self._poll_s, 0.05) if window < len(waiting) else self._poll_s
        sent: dict[str, Message] = {}
        pending: set[str] = set()

        def push(batch: list[Message]) -> None:
            if batch:
                ids = list(self._grid.push_messages(batch))
                for i, m in zip(ids, batch, strict=True):
                    if i:
                        sent[i] = m
                        pending.add(i)

        def feed() -> None:
            batch = waiting[: max(0, window - len(pending))]
            del waiting[: len(batch)]
            push(batch)

        def lost_in_transport(reply: Message, node: int | None) -> bool:
            return (
                node is not None
                and reply.has_error()
                and reply.error.code in TRANSPORT_ERRORS
                and self.resent.get(node, 0) < self._max_resends
                and (timeout is None or time.monotonic() < end)
            )

        feed()
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while (pending or waiting) and (timeout is None or time.monotonic() < end):
            try:
                new = list(self._grid.pull_messages(pending)) if pending else []
            except httpx.HTTPStatusError as err:
                if err.response.status_code < 500:
                    raise
                # The SuperLink failed this one call (seen under load: its SQLite database
                # "is locked"); the replies wait in its store, so ask again at the next poll.
                self.failed_pulls += 1
                log.warning("pulling replies failed (%s); asking again", err)
                time.sleep(max(poll_s, 0.5))
                continue
            for msg in new:
                key = msg.metadata.reply_to_message_id
                pending.discard(key)
                original = sent.get(key)
                node = original.metadata.dst_node_id if original is not None else None
                if original is not None and lost_in_transport(msg, node):
                    assert node is not None
                    self.resent[node] = self.resent.get(node, 0) + 1
                    log.warning(
                        "node %d: its reply was lost in transport (%s); sending its message "
                        "again (%d of %d)",
                        node,
                        msg.error.reason,
                        self.resent[node],
                        self._max_resends,
                    )
                    push([self._copy(original)])
                    continue
                self._on_reply(msg, node)
                replies.append(msg)
            feed()
            if pending and not new:
                time.sleep(poll_s)
        if waiting:
            log.warning("%d messages were never sent: the timeout passed first", len(waiting))
        return replies

    def _copy(self, message: Message) -> Message:
        """A new message with the same content, type, group, destination and time to live."""
        meta = message.metadata
        return self._grid.create_message(
            message.content, meta.message_type, meta.dst_node_id, meta.group_id, meta.ttl
        )


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
