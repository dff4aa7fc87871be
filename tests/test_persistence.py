"""The saved filter grows as users join; replaced versions go to its history."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from docl_flower.core.filter.store import (
    KEY_ENV,
    PersistentFilter,
    content_hash,
    load_filter,
    load_history,
)
from docl_flower.federation import keys
from docl_flower.federation.grids import StreamingGrid
from docl_flower.federation.strategy import RegisterOnce

from .conftest import random_registration
from .test_strategy import ASSIGNMENT, RULES, reply, run_round, upload


@pytest.fixture(autouse=True)
def filter_key(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A key file of this test only (never the real ``~/.config``)."""
    path = tmp_path_factory.mktemp("key") / "filter.key"
    monkeypatch.setenv(KEY_ENV, str(path))
    return path


def _register(store: PersistentFilter, regs) -> None:
    for r in regs:
        store.register(r.user_id, [r], [{}])


def test_new_users_join_and_old_registrations_stay_byte_identical(tmp_path):
    rng = np.random.default_rng(0)
    first = [random_registration(rng, u, u) for u in (0, 1)]
    _register(PersistentFilter(tmp_path, {}), first)
    before = {e["user_id"]: e["sha256"] for e in load_filter(tmp_path)[1]["entries"]}
    # A later run: user 2 joins.
    store = PersistentFilter(tmp_path, {})
    assert store.users == {0, 1}
    _register(store, [random_registration(rng, 2, 2)])
    regs, meta = load_filter(tmp_path)
    assert sorted(r.user_id for r in regs) == [0, 1, 2]
    after = {e["user_id"]: e["sha256"] for e in meta["entries"]}
    assert {u: after[u] for u in (0, 1)} == before
    assert meta["history"] == []


def test_replacing_a_user_keeps_the_previous_version_in_history(tmp_path):
    rng = np.random.default_rng(0)
    old = random_registration(rng, 0, 0)
    _register(PersistentFilter(tmp_path, {}), [old, random_registration(rng, 1, 1)])
    new = random_registration(rng, 0, 0)
    _register(PersistentFilter(tmp_path, {}), [new])
    regs, meta = load_filter(tmp_path)
    current = {r.user_id: content_hash(r.params) for r in regs}
    assert current[0] == content_hash(new.params) and len(regs) == 2
    ((past, info),) = load_history(tmp_path, meta)
    assert past.user_id == 0 and content_hash(past.params) == content_hash(old.params)
    assert "replaced_at" in info


def test_users_in_the_saved_filter_skip_and_cannot_overwrite_by_default():
    skipped = RecordDict({keys.METRICS_RECORD: MetricRecord({keys.USER_ID: 0, keys.SKIPPED: 1})})
    strat = RegisterOnce(ASSIGNMENT, RULES, existing_users={0, 1})
    run_round(strat, [reply(skipped, 10), reply(upload(1), 11), reply(upload(2), 12)])
    out = strat.outcome
    assert out.skipped == {0: "already in the saved filter"}
    assert sorted(out.registered) == [2]
    assert "already in the saved filter" in out.failed[1]
    assert 0 not in out.failed
    replacing = RegisterOnce(ASSIGNMENT, RULES, existing_users={1}, replace_existing=True)
    run_round(replacing, [reply(upload(1), 11)])
    assert sorted(replacing.outcome.registered) == [1]


def test_streaming_grid_hands_over_each_reply_as_it_arrives():
    seen: list[int] = []
    calls: list[list[int]] = []

    def make(node: int) -> Mock:
        m = Mock(spec=Message)
        m.metadata.reply_to_message_id = f"m{node}"
        m.metadata.src_node_id = node
        return m

    inner = Mock()
    inner.push_messages.return_value = ["m1", "m2"]
    batches = [[make(1)], [], [make(2)]]
    inner.pull_messages.side_effect = lambda ids: batches.pop(0)

    def on_reply(msg: Mock, dst_node: int | None) -> None:
        seen.append(msg.metadata.src_node_id)
        calls.append(list(seen))
        assert dst_node == 10 * msg.metadata.src_node_id

    sent = [Mock(), Mock()]
    sent[0].metadata.dst_node_id, sent[1].metadata.dst_node_id = 10, 20
    grid = StreamingGrid(inner, on_reply, poll_s=0.0)
    replies = list(grid.send_and_receive(sent, timeout=5.0))
    assert [r.metadata.src_node_id for r in replies] == [1, 2]
    assert calls == [[1], [1, 2]]  # node 1 was handled before node 2 had answered


def _sent(node: int) -> Mock:
    m = Mock(spec=Message)
    m.content = RecordDict({keys.METRICS_RECORD: MetricRecord({"x": 1})})
    m.metadata.dst_node_id = node
    m.metadata.message_type = "train"
    m.metadata.group_id = "1"
    m.metadata.ttl = 60.0
    return m


def _create(content, message_type, dst_node_id, group_id, ttl):  # type: ignore[no-untyped-def]
    """What ``Grid.create_message`` would make (a real one needs a run)."""
    m = _sent(dst_node_id)
    m.content = content
    m.metadata.message_type, m.metadata.group_id, m.metadata.ttl = message_type, group_id, ttl
    return m


def _answer(reply_to: str, node: int, error_code: int | None = None) -> Mock:
    m = Mock(spec=Message)
    m.metadata.reply_to_message_id = reply_to
    m.metadata.src_node_id = node
    m.has_error.return_value = error_code is not None
    m.error.code = error_code
    m.error.reason = "Reply message objects are unavailable. (the object could not be found)"
    return m


def test_streaming_grid_sends_again_a_message_whose_reply_was_lost_in_transport():
    from flwr.common.constant import ErrorCode

    inner = Mock()
    pushed: list[list[Message]] = []

    def push(batch):  # type: ignore[no-untyped-def]
        pushed.append(list(batch))
        return [f"id{len(pushed)}-{i}" for i in range(len(batch))]

    inner.push_messages.side_effect = push
    inner.create_message.side_effect = _create
    lost = ErrorCode.MESSAGE_UNAVAILABLE
    batches = [
        [_answer("id1-0", 1, lost), _answer("id1-1", 2, ErrorCode.NODE_UNAVAILABLE)],
        [],
        [_answer("id2-0", 1, lost)],  # lost again: no second resend, handed on
    ]
    inner.pull_messages.side_effect = lambda ids: batches.pop(0) if batches else []
    seen: list[tuple[int | None, int | None]] = []
    grid = StreamingGrid(inner, lambda m, n: seen.append((n, m.error.code)), poll_s=0.0)
    replies = list(grid.send_and_receive([_sent(1), _sent(2)], timeout=5.0))
    # node 1's message was sent once more, as a copy with the same content and header fields
    assert len(pushed) == 2 and len(pushed[1]) == 1
    again, first = pushed[1][0], pushed[0][0]
    assert again is not first and again.content is first.content
    assert again.metadata.dst_node_id == 1 and again.metadata.message_type == "train"
    assert again.metadata.group_id == "1" and again.metadata.ttl == 60.0
    assert grid.resent == {1: 1}
    # a node that is down is not asked again; the second loss is handed on as the answer
    assert seen == [(2, ErrorCode.NODE_UNAVAILABLE), (1, lost)]
    assert len(replies) == 2


def test_streaming_grid_resends_a_lost_reply_and_hands_on_the_good_one():
    from flwr.common.constant import ErrorCode

    inner = Mock()
    inner.push_messages.side_effect = lambda batch: [f"id-{len(inner.push_messages.mock_calls)}"]
    inner.create_message.side_effect = _create
    batches = [[_answer("id-1", 7, ErrorCode.MESSAGE_UNAVAILABLE)], [_answer("id-2", 7)]]
    inner.pull_messages.side_effect = lambda ids: batches.pop(0) if batches else []
    seen: list[int | None] = []
    grid = StreamingGrid(inner, lambda m, n: seen.append(n), poll_s=0.0)
    replies = list(grid.send_and_receive([_sent(7)], timeout=5.0))
    assert seen == [7] and len(replies) == 1 and not replies[0].has_error()
    # with resends turned off, the lost reply is the answer
    batches[:] = [[_answer("id-3", 7, ErrorCode.MESSAGE_UNAVAILABLE)]]
    off = StreamingGrid(inner, lambda m, n: seen.append(n), poll_s=0.0, max_resends=0)
    (only,) = off.send_and_receive([_sent(7)], timeout=5.0)
    assert only.has_error() and off.resent == {}


def test_streaming_grid_asks_again_when_the_superlink_fails_a_pull():
    import httpx

    def status(code: int) -> httpx.HTTPStatusError:
        request = httpx.Request("POST", "https://127.0.0.1:1/v1/runtime/pull-messages")
        response = httpx.Response(code, request=request)
        return httpx.HTTPStatusError(f"{code}", request=request, response=response)

    inner = Mock()
    inner.push_messages.return_value = ["id-1"]
    outcomes: list[object] = [status(500), status(503), [_answer("id-1", 7)]]

    def pull(ids):  # type: ignore[no-untyped-def]
        out = outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return out

    inner.pull_messages.side_effect = pull
    seen: list[int | None] = []
    grid = StreamingGrid(inner, lambda m, n: seen.append(n), poll_s=0.0)
    replies = list(grid.send_and_receive([_sent(7)], timeout=10.0))
    assert seen == [7] and len(replies) == 1 and grid.failed_pulls == 2
    # a client error (4xx) is not the SuperLink's passing trouble: it is raised
    outcomes[:] = [status(403)]
    strict = StreamingGrid(inner, lambda m, n: None, poll_s=0.0)
    with pytest.raises(httpx.HTTPStatusError):
        list(strict.send_and_receive([_sent(7)], timeout=5.0))
