"""The register-once strategy: each user uploads its autoencoder(s) once; nothing goes back.

Validation of an upload is a pure function (:func:`parse_upload` for DOCL's autoencoders, or
any other parse function given to the strategy, such as the feature-statistics baseline's) so
that it is testable on fake replies without a running Flower app.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from . import keys
from .nodes import assign_users, wait_for_nodes
from .uploads import (
    UploadError,
    UploadRules,
    as_int,
    dp_metrics,
    optional_metrics,
    parse_upload,
    record_bytes,
    records,
)

log = logging.getLogger(__name__)


class Labelled(Protocol):
    """What the strategy reads of a registration: its class."""

    @property
    def label(self) -> int:
        """The class the registration is for."""
        ...


#: A registration: DOCL's autoencoder (:class:`Registration`) or another method's upload.
R = TypeVar("R", bound=Labelled)

#: Validation of one reply's content: ``(content, assignment) -> (user, registrations)``;
#: raises :class:`UploadError` with the reason.
ParseUpload = Callable[[object, Mapping[int, tuple[int, ...]]], tuple[int, Sequence[R]]]


@dataclass
class RegistrationOutcome(Generic[R]):
    """What one register-once round produced."""

    registrations: list[R] = field(default_factory=list)
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
    #: Users the bindings name that this run does not include (user -> node): a device that
    #: joined while ``num_users`` stayed as it was.
    outside_run: dict[int, int] = field(default_factory=dict)
    registered_at: dict[int, float] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    #: Differential privacy each registered user's client reported (users without DP: absent).
    dp: dict[int, dict[str, float]] = field(default_factory=dict)
    #: Wall clock (``time.time()``) when the messages were handed to Flower, after the nodes
    #: connected; and the server's own time spent on replies (validate, check, persist).
    sent_at: float | None = None
    handling_seconds: float = 0.0

    def result_fields(self) -> dict[str, Any]:
        """The per-user part of a :class:`~.results.RunResult` (JSON keys)."""
        return {
            "rounds": 1,
            "registered": sorted(self.registered),
            "registered_classes": {str(u): c for u, c in sorted(self.registered.items())},
            "failed": {str(u): r for u, r in sorted(self.failed.items())},
            "node_errors": {str(n): r for n, r in self.node_errors.items()},
            "unbound_nodes": self.unbound_nodes,
            "bound_outside_run": {str(u): n for u, n in sorted(self.outside_run.items())},
            "bytes_uploaded": {str(u): b for u, b in sorted(self.bytes_uploaded.items())},
            "bytes_downloaded": {str(u): b for u, b in sorted(self.bytes_downloaded.items())},
            "received_array_records": {
                str(u): n for u, n in sorted(self.received_array_records.items())
            },
            "receives_others_parameters": False,
            "train_seconds": {str(u): s for u, s in sorted(self.train_seconds.items())},
            "trained_on_cuda": {str(u): c for u, c in sorted(self.cuda.items())},
            "dp": {str(u): d for u, d in sorted(self.dp.items())},
        }


class RegisterOnce(Strategy, Generic[R]):
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
    rules : UploadRules or None
        What a valid DOCL upload looks like (used by the default ``parse``).
    node_wait_s : float
        Deadline for the expected number of nodes to connect; after it the strategy goes on
        with the nodes present and reports the missing users.
    existing_users : collection of int
        Users already in a saved filter: their clients skip training (see
        :data:`keys.REGISTERED_USERS`), and an upload from them is rejected unless
        ``replace_existing``.
    on_register : callable, optional
        Called as ``on_register(user, registrations, node)`` for every valid upload, to
        persist it at once; if it raises, the upload is rejected with that reason.
    vet : callable, optional
        Called with each registration of a valid upload; raises :class:`UploadError` to
        reject the upload (the server's probe check: behaves like an autoencoder, is no
        catch-all).
    bindings : mapping, optional
        Node id -> the user that node may register (set by the operator when it registers the
        node's key). With bindings, only bound nodes get a message, the strategy waits for
        exactly those nodes, and an upload that claims any other user than its node's is
        rejected, so a node can neither register nor overwrite another user's autoencoder.
        Every bound node is told its user in its message (:data:`keys.ASSIGNED_USER`).
    assign_nodes : bool
        Without ``bindings``: bind the connected nodes to the users here (a simulation, whose
        nodes are the server's own: :func:`~.nodes.assign_users`), and then hold every
        upload to its node's user as with operator bindings. False (a deployment without
        bindings, for debugging only): a node's user is the one its upload claims.
    parse : callable, optional
        Validates one reply's content: ``parse(content, assignment)`` returns the user and its
        registrations or raises :class:`UploadError`. Default: DOCL's :func:`parse_upload`
        with ``rules``. The feature-statistics baseline passes its own.
    """

    def __init__(
        self,
        assignment: Mapping[int, tuple[int, ...]],
        rules: UploadRules | None,
        node_wait_s: float = 120.0,
        existing_users: Collection[int] = (),
        replace_existing: bool = False,
        on_register: Callable[[int, list[R], int], None] | None = None,
        bindings: Mapping[int, int] | None = None,
        vet: Callable[[R], None] | None = None,
        parse: ParseUpload[R] | None = None,
        assign_nodes: bool = False,
    ) -> None:
        self.assignment = dict(assignment)
        self.rules = rules
        if parse is None:
            if rules is None:
                raise ValueError("RegisterOnce needs DOCL's upload rules or a parse function")
            # The default registrations are DOCL's autoencoders (R = Registration).
            parse = cast(ParseUpload[R], functools.partial(parse_upload, rules=rules))
        self.parse = parse
        self.node_wait_s = node_wait_s
        self.existing_users = frozenset(existing_users)
        self.replace_existing = replace_existing
        self.on_register = on_register
        self.bindings = dict(bindings) if bindings is not None else None
        self.assign_nodes = assign_nodes
        self.vet = vet
        self.outcome: RegistrationOutcome[R] = RegistrationOutcome()
        self._sent: dict[int, int] = {}
        self._handled: set[str] = set()
        self._rejected: dict[int, str] = {}
        self._reported: set[str] = set()

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
        if self.bindings is None and self.assign_nodes:
            present = wait_for_nodes(grid, len(self.assignment), self.node_wait_s)
            self.bindings = assign_users(present, self.assignment)
            log.info("simulation: the server bound %d nodes to users", len(self.bindings))
        if self.bindings is None:
            nodes = wait_for_nodes(grid, len(self.assignment), self.node_wait_s)
        else:
            bound = {n for n, u in self.bindings.items() if u in self.assignment}
            self.outcome.outside_run = {
                u: n for n, u in self.bindings.items() if u not in self.assignment
            }
            if self.outcome.outside_run:
                users = sorted(self.outcome.outside_run)
                log.warning(
                    "%s bound to a node but outside this run (its users: %s): they get no "
                    "message; set num_users=%d to include them",
                    format_users(users),
                    format_users(sorted(self.assignment)).removeprefix("users "),
                    max(users) + 1,
                )
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
            node_config = config
            if self.bindings is not None and node_id in self.bindings:
                node_config = ConfigRecord(dict(config))
                node_config[keys.ASSIGNED_USER] = self.bindings[node_id]
            content = RecordDict({keys.CONFIG_RECORD: node_config})
            self._sent[node_id] = record_bytes(content)
            messages.append(
                Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)
            )
        self.outcome.sent_at = time.time()
        return messages

    def handle_reply(self, msg: Message, dst_node: int | None) -> None:
        """Validate one reply and register it, or record why not; never raises.

        Called by :class:`StreamingGrid` as each reply arrives, with the node that the
        answered message of this run went to (``None`` when the reply answers no message this
        run sent: it is then ignored and reported). An error reply is reported against that
        node (Flower's own error replies, e.g. for a node that stopped sending heartbeats,
        come from the SuperLink).
        """
        key = str(msg.metadata.message_id or id(msg))
        if key in self._handled:
            return
        self._handled.add(key)
        start = time.perf_counter()
        try:
            self._handle(msg, dst_node)
        except Exception as err:
            node = dst_node if dst_node is not None else -1
            self.outcome.node_errors[node] = f"reply not handled: {type(err).__name__}: {err}"
            log.exception("reply from node %s could not be handled", node)
        finally:
            self.outcome.handling_seconds += time.perf_counter() - start

    def _handle(self, msg: Message, dst_node: int | None) -> None:
        out = self.outcome
        if msg.has_error():
            node = dst_node if dst_node is not None else msg.metadata.src_node_id
            reason = f"code {msg.error.code}: {msg.error.reason}"
            out.node_errors[node] = reason
            if reason in self._reported:  # each distinct error is logged once
                log.debug("node %s failed: %s", node, reason)
            else:
                self._reported.add(reason)
                log.warning(
                    "node %s failed: %s (the same error on more nodes: see the end)", node, reason
                )
            return
        node = msg.metadata.src_node_id
        if dst_node is None or node != dst_node:
            reason = (
                "answers no message of this run"
                if dst_node is None
                else f"answers the message sent to node {dst_node}"
            )
            out.node_errors[node] = f"ignored reply: {reason}"
            log.warning("ignored a reply from node %s: %s", node, reason)
            return
        claimed = _claimed_user(msg)
        # The user this reply answers for: the node's bound user, else the one it claims.
        owner = claimed if self.bindings is None else self.bindings.get(node)
        metrics = records(msg.content, "metric_records").get(keys.METRICS_RECORD)
        skipping = isinstance(metrics, Mapping) and metrics.get(keys.SKIPPED) == 1
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
            user, parsed = self.parse(msg.content, self.assignment)
            regs = list(parsed)
            privacy = dp_metrics(msg.content)
            if user in out.registered:
                raise UploadError(f"user {user} is already registered")
            if user in self.existing_users and not self.replace_existing:
                raise UploadError(f"user {user} is already in the saved filter")
            for reg in regs:
                if self.vet is not None:
                    self.vet(reg)
            if self.on_register is not None:
                self.on_register(user, regs, node)  # persist first: only saved uploads count
        except Exception as err:
            reason = str(err) if isinstance(err, UploadError) else f"{type(err).__name__}: {err}"
            if owner is not None and owner in self.assignment and owner not in out.registered:
                earlier = self._rejected.get(owner)
                self._rejected[owner] = f"{earlier}; {reason}" if earlier else reason
            else:
                out.node_errors[node] = f"rejected upload: {reason}"
            log.warning("rejected upload from node %s: %s", node, reason)
            return
        info = optional_metrics(msg.content)
        out.registrations.extend(regs)
        out.registered[user] = [r.label for r in regs]
        out.bytes_uploaded[user] = record_bytes(msg.content)
        out.bytes_downloaded[user] = self._sent.get(node, 0)
        out.train_seconds[user] = info.get(keys.TRAIN_SECONDS, math.nan)
        out.received_array_records[user] = int(info.get(keys.RECEIVED_ARRAYS, -1))
        out.cuda[user] = bool(info.get(keys.DEVICE_CUDA, 0))
        if privacy is not None:
            out.dp[user] = privacy
        out.nodes[user] = node
        out.registered_at[user] = time.time()
        log.info("registered user %d (%d/%d)", user, len(out.registered), len(self.assignment))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and register every reply; nothing is averaged and nothing is returned."""
        out = self.outcome
        for msg in replies:
            key = str(msg.metadata.message_id or id(msg))
            if key not in self._handled:  # not delivered through StreamingGrid: not ours
                self.handle_reply(msg, None)
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
        for reason, users in group_failures(out.failed).items():
            log.warning("%d user(s) failed (%s): %s", len(users), format_users(users), reason)
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


def group_failures(failed: Mapping[int, str]) -> dict[str, list[int]]:
    """Failed users grouped by their reason (each distinct reason once, users sorted).

    The node a reason came from is left out (``node 123: ...``), so that the same client
    error on many nodes is one group.
    """
    groups: dict[str, list[int]] = {}
    for user, reason in sorted(failed.items()):
        groups.setdefault(_NODE_PREFIX.sub("node N: ", reason), []).append(user)
    return groups


#: ``node <id>: `` inside a reason (node ids differ; the error does not).
_NODE_PREFIX = re.compile(r"node -?\d+: ")


def format_users(users: Sequence[int], shown: int = 12) -> str:
    """``users 0-9`` style list: runs of consecutive ids joined, at most ``shown`` runs."""
    runs: list[list[int]] = []
    for u in sorted(users):
        if runs and u == runs[-1][-1] + 1:
            runs[-1].append(u)
        else:
            runs.append([u])
    parts = [f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs[:shown]]
    more = f", ... ({len(runs) - shown} more runs)" if len(runs) > shown else ""
    return ("user " if len(users) == 1 else "users ") + ", ".join(parts) + more


def _claimed_user(msg: Message) -> int | None:
    """The user id a reply claims, if it carries a readable integer one."""
    metrics = records(msg.content, "metric_records").get(keys.METRICS_RECORD)
    if not isinstance(metrics, Mapping):
        return None
    try:
        return as_int(metrics.get(keys.USER_ID), "user id")
    except UploadError:
        return None
