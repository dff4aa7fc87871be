"""The register-once strategy: each user uploads its autoencoder(s) once; nothing goes back.

Validation of an upload is a pure function (:func:`parse_upload`) so that it is testable on
fake replies without a running Flower app.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from . import keys
from .filter import Registration
from .model import PARAM_NAMES

log = logging.getLogger(__name__)


class UploadError(ValueError):
    """An upload that cannot be registered; the message is the reason."""


@dataclass(frozen=True)
class UploadRules:
    """What a valid upload looks like.

    Parameters
    ----------
    shapes : mapping
        Expected shape of each of the four tensors of one autoencoder.
    max_error : float
        Upper bound of any reconstruction error: D for features in [0, 1] (eq. 6).
    min_std : float
        Smallest acceptable sigma (a degenerate interval would block nothing or everything).
    """

    shapes: Mapping[str, tuple[int, ...]]
    max_error: float
    min_std: float = 1e-6


def record_bytes(content: RecordDict) -> int:
    """Parameter bytes (array elements x item size) of all ArrayRecords in a message's content."""
    return sum(
        int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
        for rec in content.array_records.values()
        for arr in rec.values()
    )


def parse_upload(
    content: RecordDict,
    assignment: Mapping[int, tuple[int, ...]],
    rules: UploadRules,
) -> tuple[int, list[Registration]]:
    """Validate one reply's content and turn it into registrations.

    Raises
    ------
    UploadError
        With the reason, for a missing record or key, a user id that is not expected, classes
        that are not the user's, a wrong shape or dtype, a non-finite value, or error
        statistics outside ``0 <= mu <= max_error`` and ``min_std <= sigma <= max_error``.
    """
    if keys.METRICS_RECORD not in content.metric_records:
        raise UploadError(f"no MetricRecord {keys.METRICS_RECORD!r}")
    if keys.ARRAYS_RECORD not in content.array_records:
        raise UploadError(f"no ArrayRecord {keys.ARRAYS_RECORD!r}")
    metrics = content.metric_records[keys.METRICS_RECORD]
    arrays = content.array_records[keys.ARRAYS_RECORD]
    for key in (keys.USER_ID, keys.CLASSES, keys.ERR_MEAN, keys.ERR_STD, keys.NUM_EXAMPLES):
        if key not in metrics:
            raise UploadError(f"metric {key!r} missing")
    raw_user = metrics[keys.USER_ID]
    if not isinstance(raw_user, int | float) or raw_user != int(raw_user):
        raise UploadError(f"user id {raw_user!r} is not an integer")
    user = int(raw_user)
    if user not in assignment:
        raise UploadError(f"user id {user} is not an expected user")

    def as_list(key: str) -> list[float]:
        value = metrics[key]
        return [float(v) for v in (value if isinstance(value, list) else [value])]

    classes = [int(c) for c in as_list(keys.CLASSES)]
    if sorted(classes) != sorted(assignment[user]):
        raise UploadError(f"user {user} uploaded classes {classes}, owns {list(assignment[user])}")
    means, stds, counts = as_list(keys.ERR_MEAN), as_list(keys.ERR_STD), as_list(keys.NUM_EXAMPLES)
    if not len(means) == len(stds) == len(counts) == len(classes):
        raise UploadError("err-mean, err-std, num-examples and classes differ in length")
    expected_keys = {f"{c}{keys.ARRAY_KEY_SEP}{n}" for c in classes for n in PARAM_NAMES}
    if set(arrays.keys()) != expected_keys:
        extra = sorted(set(arrays.keys()) - expected_keys)
        missing = sorted(expected_keys - set(arrays.keys()))
        raise UploadError(f"array keys differ: missing {missing}, unexpected {extra}")
    registrations = []
    for c, mu, sd, n in zip(classes, means, stds, counts, strict=True):
        params: dict[str, np.ndarray] = {}
        for name in PARAM_NAMES:
            arr = arrays[f"{c}{keys.ARRAY_KEY_SEP}{name}"]
            if tuple(arr.shape) != tuple(rules.shapes[name]):
                raise UploadError(
                    f"class {c} {name}: shape {tuple(arr.shape)}, need {tuple(rules.shapes[name])}"
                )
            try:
                value = arr.numpy()
            except Exception as err:  # malformed bytes from a client
                raise UploadError(f"class {c} {name}: unreadable array ({err})") from err
            if value.dtype != np.float32:
                raise UploadError(f"class {c} {name}: dtype {value.dtype}, need float32")
            if not np.isfinite(value).all():
                raise UploadError(f"class {c} {name}: non-finite values")
            params[name] = value
        if not (math.isfinite(mu) and 0.0 <= mu <= rules.max_error):
            raise UploadError(f"class {c}: err-mean {mu} outside [0, {rules.max_error}]")
        if not (math.isfinite(sd) and rules.min_std <= sd <= rules.max_error):
            raise UploadError(
                f"class {c}: err-std {sd} outside [{rules.min_std}, {rules.max_error}]"
            )
        if not (n >= 1 and n == int(n)):
            raise UploadError(f"class {c}: num-examples {n} is not a positive integer")
        registrations.append(Registration(user, c, params, float(mu), float(sd), int(n)))
    return user, registrations


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


@dataclass
class RegistrationOutcome:
    """What one register-once round produced."""

    registrations: list[Registration] = field(default_factory=list)
    registered: dict[int, list[int]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    node_errors: dict[int, str] = field(default_factory=dict)
    bytes_uploaded: dict[int, int] = field(default_factory=dict)
    bytes_downloaded: dict[int, int] = field(default_factory=dict)
    train_seconds: dict[int, float] = field(default_factory=dict)
    received_array_records: dict[int, int] = field(default_factory=dict)
    cuda: dict[int, bool] = field(default_factory=dict)
    nodes: dict[int, int] = field(default_factory=dict)
    unbound_nodes: list[int] = field(default_factory=list)
    registered_at: dict[int, float] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)


class RegisterOnce(Strategy):
    """Register-once strategy of DOCL.

    After Shamsabadi, Haddadi and Cavallaro, *Distributed One-Class Learning*, Sec. 2.

    Each node receives one config-only TRAIN message (never an ArrayRecord: neither its own
    parameters nor anyone else's). Each user trains its one-class autoencoder(s) locally and
    replies once with the parameters and ``mu``, ``sigma`` of its reconstruction errors
    (eq. 6). Every reply is validated; a bad one is rejected with a reason while all others
    register. There is no aggregation: the server composes the global filter (eq. 7-8) from
    the registrations in :attr:`outcome`.

    Parameters
    ----------
    assignment : mapping
        User id -> classes that user owns (one autoencoder per class).
    rules : UploadRules
        What a valid upload looks like.
    node_wait_s : float
        Deadline for the expected number of nodes to connect; after it the strategy goes on
        with the nodes present and reports the missing users.
    existing_users : collection of int
        Users already in a saved filter: their clients skip training (see
        :data:`keys.REGISTERED_USERS`), and an upload from them is rejected unless
        ``replace_existing``.
    on_register : callable, optional
        Called with the outcome after every accepted registration (to persist it at once).
    bindings : mapping, optional
        Node id -> the user that node may register (set by the operator when it registers the
        node's key). With bindings, only bound nodes get a message, the strategy waits for
        exactly those nodes, and an upload that claims any other user than its node's is
        rejected, so a node can neither register nor overwrite another user's autoencoder.
        Without bindings (simulation) a node's user is the one its node config names.
    """

    def __init__(
        self,
        assignment: Mapping[int, tuple[int, ...]],
        rules: UploadRules,
        node_wait_s: float = 120.0,
        existing_users: Collection[int] = (),
        replace_existing: bool = False,
        on_register: Callable[[RegistrationOutcome], None] | None = None,
        bindings: Mapping[int, int] | None = None,
    ) -> None:
        self.assignment = dict(assignment)
        self.rules = rules
        self.node_wait_s = node_wait_s
        self.existing_users = frozenset(existing_users)
        self.replace_existing = replace_existing
        self.on_register = on_register
        self.bindings = dict(bindings) if bindings is not None else None
        self.outcome = RegistrationOutcome()
        self._sent: dict[int, int] = {}
        self._handled: set[str] = set()
        self._rejected: dict[int, str] = {}

    def summary(self) -> None:
        """Log the strategy's settings."""
        log.info(
            "RegisterOnce: %d expected users, %d autoencoders, node deadline %.0fs",
            len(self.assignment),
            sum(len(c) for c in self.assignment.values()),
            self.node_wait_s,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One config-only message per connected node; ``arrays`` is never sent."""
        if self.bindings is None:
            nodes = wait_for_nodes(grid, len(self.assignment), self.node_wait_s)
        else:
            bound = {n for n, u in self.bindings.items() if u in self.assignment}
            present = wait_for_nodes(grid, len(bound), self.node_wait_s, required=bound)
            self.outcome.unbound_nodes = [n for n in present if n not in self.bindings]
            for n in self.outcome.unbound_nodes:
                log.warning("node %s is not bound to any user: it gets no message", n)
            nodes = [n for n in present if n in bound]
        log.info(
            "configure_train: %d nodes connected, %d users expected",
            len(nodes),
            len(self.assignment),
        )
        messages = []
        for node_id in nodes:
            content = RecordDict({keys.CONFIG_RECORD: config})
            self._sent[node_id] = record_bytes(content)
            messages.append(
                Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)
            )
        return messages

    def handle_reply(self, msg: Message, dst_node: int | None = None) -> None:
        """Validate one reply and register it.

        Called as each reply arrives (through :class:`StreamingGrid`, which passes the node
        the answered message went to), and by :meth:`aggregate_train` for any reply not
        handled yet. An error reply is reported against that node (Flower's own error replies,
        e.g. for a node that stopped sending heartbeats, come from the SuperLink).
        """
        key = msg.metadata.message_id or str(id(msg))
        if key in self._handled:
            return
        self._handled.add(key)
        out = self.outcome
        node = msg.metadata.src_node_id
        if msg.has_error():
            node = dst_node if dst_node is not None else node
            out.node_errors[node] = f"code {msg.error.code}: {msg.error.reason}"
            log.warning("node %s failed: %s", node, out.node_errors[node])
            return
        claimed = _claimed_user(msg)
        # The user this reply answers for: the node's bound user, else the one it claims.
        owner = claimed if self.bindings is None else self.bindings.get(node)
        metrics = msg.content.metric_records.get(keys.METRICS_RECORD)
        skipping = metrics is not None and metrics.get(keys.SKIPPED)
        if skipping and claimed is not None and claimed == owner and claimed in self.existing_users:
            out.skipped[claimed] = "already in the saved filter"
            log.info("user %d is already registered: skipped", claimed)
            return
        try:
            if self.bindings is not None and claimed != owner:
                raise UploadError(
                    f"node {node} is bound to user {owner}, its upload claims user {claimed}"
                    if owner is not None
                    else f"node {node} is not bound to any user"
                )
            user, regs = parse_upload(msg.content, self.assignment, self.rules)
            if user in out.registered:
                raise UploadError(f"user {user} is already registered")
            if user in self.existing_users and not self.replace_existing:
                raise UploadError(f"user {user} is already in the saved filter")
        except UploadError as err:
            reason = str(err)
            if owner is not None and owner in self.assignment and owner not in out.registered:
                earlier = self._rejected.get(owner)
                self._rejected[owner] = f"{earlier}; {reason}" if earlier else reason
            else:
                out.node_errors[node] = f"rejected upload: {reason}"
            log.warning("rejected upload from node %s: %s", node, reason)
            return
        out.registrations.extend(regs)
        out.registered[user] = [r.label for r in regs]
        out.bytes_uploaded[user] = record_bytes(msg.content)
        out.bytes_downloaded[user] = self._sent.get(node, 0)
        metrics = msg.content.metric_records[keys.METRICS_RECORD]
        out.train_seconds[user] = float(metrics.get(keys.TRAIN_SECONDS, math.nan))  # type: ignore[arg-type]
        out.received_array_records[user] = int(metrics.get(keys.RECEIVED_ARRAYS, -1))  # type: ignore[arg-type]
        out.cuda[user] = bool(metrics.get(keys.DEVICE_CUDA, 0))
        out.nodes[user] = node
        out.registered_at[user] = time.time()
        log.info("registered user %d (%d/%d)", user, len(out.registered), len(self.assignment))
        if self.on_register is not None:
            self.on_register(out)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and register every reply; nothing is averaged and nothing is returned."""
        out = self.outcome
        for msg in replies:
            self.handle_reply(msg)
        for user in self.assignment:
            if user in out.registered or user in out.skipped:
                continue
            if user in self._rejected:
                out.failed[user] = f"rejected: {self._rejected[user]}"
            elif self.bindings is not None:
                mine = sorted(n for n, u in self.bindings.items() if u == user)
                out.failed[user] = "no valid reply: " + (
                    "; ".join(
                        f"node {n}: {out.node_errors.get(n, 'not connected or no reply')}"
                        for n in mine
                    )
                    or "no node is bound to this user"
                )
            else:
                detail = "; ".join(f"node {n}: {r}" for n, r in sorted(out.node_errors.items()))
                out.failed[user] = "no valid reply" + (
                    f" (node errors: {detail})" if detail else ""
                )
        return None, MetricRecord({"registered": len(out.registered), "failed": len(out.failed)})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the filter is evaluated on the server."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate."""
        return None


def _claimed_user(msg: Message) -> int | None:
    """The user id a reply claims, if it carries a readable one."""
    try:
        value = msg.content.metric_records[keys.METRICS_RECORD][keys.USER_ID]
        return int(value)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return None


class StreamingGrid:
    """A Grid proxy whose ``send_and_receive`` hands each reply to ``on_reply`` as it arrives.

    Same contract as :meth:`flwr.serverapp.Grid.send_and_receive` (push, then pull until every
    reply is in or the timeout passes), so the inherited :meth:`Strategy.start` drives it.
    """

    def __init__(
        self, grid: Grid, on_reply: Callable[[Message, int | None], None], poll_s: float = 1.0
    ) -> None:
        self._grid = grid
        self._on_reply = on_reply
        self._poll_s = poll_s

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

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
