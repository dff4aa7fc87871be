from __future__ import annotations

import logging
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from docl_flower.core.training.autoencoder import AutoencoderSpec
from docl_flower.federation import keys, nodes, strategy
from docl_flower.federation.strategy import RegisterOnce
from docl_flower.federation.uploads import UploadError, UploadRules, parse_upload

DIM, HIDDEN = 12, 3
RULES = UploadRules.for_autoencoder(AutoencoderSpec(hidden=HIDDEN), DIM)
ASSIGNMENT = {0: (0,), 1: (1,), 2: (2,), 3: (3,), 4: (4, 5)}


def upload(user: int, classes=None, **changes) -> RecordDict:
    """A valid upload of ``user``; ``changes`` corrupt one part of it."""
    classes = list(ASSIGNMENT[user]) if classes is None else classes
    rng = np.random.default_rng(user)
    arrays = {}
    for c in classes:
        for name, shape in RULES.shapes.items():
            value = rng.normal(size=shape).astype(np.float32)
            value = changes.get("transform", lambda n, v: v)(name, value)
            arrays[f"{c}/{name}"] = Array(value)
    metrics = {
        keys.USER_ID: changes.get("user_id", user),
        keys.CLASSES: classes,
        keys.ERR_MEAN: [changes.get("mu", 2.0)] * len(classes),
        keys.ERR_STD: [changes.get("sigma", 0.5)] * len(classes),
        keys.NUM_EXAMPLES: [100] * len(classes),
        keys.TRAIN_SECONDS: 1.0,
        keys.RECEIVED_ARRAYS: 0,
    }
    for k in changes.get("drop", ()):
        metrics.pop(k)
    return RecordDict(
        {keys.ARRAYS_RECORD: ArrayRecord(arrays), keys.METRICS_RECORD: MetricRecord(metrics)}
    )


def reply(content: RecordDict | None, node: int, error: str | None = None) -> Mock:
    msg = Mock(spec=Message)
    msg.metadata.src_node_id = node
    msg.has_error.return_value = error is not None
    if error is not None:
        msg.error.code, msg.error.reason = 5, error
    msg.content = content
    return msg


def run_round(strat: RegisterOnce, replies: list[Mock]):
    """Deliver each reply as the answer of its node (as StreamingGrid does), then aggregate."""
    for msg in replies:
        strat.handle_reply(msg, msg.metadata.src_node_id)
    return strat.aggregate_train(1, replies)


def test_valid_upload_parses_into_registrations():
    user, regs = parse_upload(upload(4), ASSIGNMENT, RULES)
    assert user == 4 and [r.label for r in regs] == [4, 5]
    assert regs[0].params["encoder.weight"].shape == (HIDDEN, DIM)
    assert (regs[0].err_mean, regs[0].err_std, regs[0].num_examples) == (2.0, 0.5, 100)


BAD = {
    "nan weights": upload(
        0, transform=lambda n, v: np.full_like(v, np.nan) if n == "decoder.bias" else v
    ),
    "inf weights": upload(0, transform=lambda n, v: v * np.inf),
    "wrong shape": upload(0, transform=lambda n, v: v[:-1] if n == "encoder.bias" else v),
    "wrong dtype": upload(0, transform=lambda n, v: v.astype(np.float64)),
    "sigma zero": upload(0, sigma=0.0),
    "sigma huge": upload(0, sigma=1e30),
    "sigma nan": upload(0, sigma=float("nan")),
    "mu negative": upload(0, mu=-1.0),
    "unknown user": upload(0, user_id=99),
    "not an int user": upload(0, user_id=1.5),
    "someone else's classes": upload(0, classes=[1]),
    "missing metric": upload(0, drop=[keys.ERR_STD]),
    "no arrays": RecordDict({keys.METRICS_RECORD: upload(0)[keys.METRICS_RECORD]}),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_kind_of_bad_upload_is_rejected_with_a_reason(case):
    with pytest.raises(UploadError) as err:
        parse_upload(BAD[case], ASSIGNMENT, RULES)
    assert str(err.value)


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_upload_is_rejected_while_all_others_register(case):
    # Prepare: user 0's upload is bad, users 1-4 are fine.
    strat = RegisterOnce(ASSIGNMENT, RULES)
    replies = [reply(BAD[case], 100)] + [reply(upload(u), 101 + u) for u in (1, 2, 3, 4)]
    # Execute
    arrays, metrics = run_round(strat, replies)
    # Assert
    out = strat.outcome
    assert arrays is None
    assert sorted(out.registered) == [1, 2, 3, 4]
    assert sorted(r.label for r in out.registrations) == [1, 2, 3, 4, 5]
    assert list(out.failed) == [0] and out.failed[0]
    assert metrics is not None and metrics["registered"] == 4


def test_duplicate_registration_and_claims_on_other_ids_are_rejected():
    strat = RegisterOnce(ASSIGNMENT, RULES)
    run_round(strat, [reply(upload(u), 10 + u) for u in ASSIGNMENT] + [reply(upload(1), 99)])
    assert sorted(strat.outcome.registered) == [0, 1, 2, 3, 4]
    assert "already registered" in strat.outcome.node_errors[99]
    first = strat.outcome.registrations[1]
    assert first.user_id == 1 and np.array_equal(
        first.params["encoder.weight"],
        parse_upload(upload(1), ASSIGNMENT, RULES)[1][0].params["encoder.weight"],
    )


def test_failed_and_silent_clients_are_reported_not_fatal():
    strat = RegisterOnce(ASSIGNMENT, RULES)
    replies = [reply(upload(0), 10), reply(None, 11, error="node unavailable")]
    run_round(strat, replies)  # users 2, 3, 4 never answer
    out = strat.outcome
    assert list(out.registered) == [0]
    assert sorted(out.failed) == [1, 2, 3, 4]
    assert "node unavailable" in out.failed[1]


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def test_configure_train_sends_config_only_messages(monkeypatch):
    sent = []

    def fake_message(content, dst_node_id, message_type):
        sent.append((content, dst_node_id, message_type))
        return Mock(spec=Message)

    monkeypatch.setattr(strategy, "Message", fake_message)
    strat = RegisterOnce({0: (0,), 1: (1,)}, RULES, node_wait_s=0.0)
    arrays = ArrayRecord({"w": Array(np.ones(4, np.float32))})  # must never be sent
    msgs = list(strat.configure_train(1, arrays, ConfigRecord({keys.SPEC: "{}"}), FakeGrid([7, 8])))
    assert len(msgs) == 2 and [d for _, d, _ in sent] == [7, 8]
    for content, _, mtype in sent:
        assert mtype == "train"
        assert len(content.array_records) == 0
        assert list(content.config_records) == [keys.CONFIG_RECORD]
    assert strat._sent == {7: 0, 8: 0}


def test_wait_for_nodes_returns_after_the_deadline():
    assert nodes.wait_for_nodes(FakeGrid([1]), expected=3, deadline_s=0.0) == [1]


# ------------------------------------------------------------------ node -> user bindings
BINDINGS = {100 + u: u for u in ASSIGNMENT}  # node 100 + u may register user u only


def test_a_bound_node_cannot_register_or_overwrite_another_user():
    # Prepare: node 103 (bound to user 3) claims user 0, before and after user 0 registers;
    # user 4 is already in the saved filter and replacements are allowed.
    strat = RegisterOnce(
        ASSIGNMENT, RULES, bindings=BINDINGS, existing_users={4}, replace_existing=True
    )
    claim_0 = upload(3, classes=[0], user_id=0)
    claim_4 = upload(3, classes=[4, 5], user_id=4)
    # Execute
    run_round(
        strat,
        [reply(claim_0, 103), reply(upload(0), 100), reply(claim_4, 103), reply(upload(1), 101)],
    )
    # Assert: the victims' registrations stand; the claims count against node 103's user.
    out = strat.outcome
    assert sorted(out.registered) == [0, 1]
    assert out.registrations[0].user_id == 0 and out.nodes[0] == 100
    assert "node 103 is bound to user 3, its upload claims user 0" in out.failed[3]
    assert 4 not in out.registered
    assert out.failed[2].startswith("no valid reply: node 102")


def test_an_error_reply_from_the_superlink_is_reported_against_the_dead_node():
    # Flower answers for a node that stopped sending heartbeats; the reply's source is not it.
    strat = RegisterOnce(ASSIGNMENT, RULES, bindings=BINDINGS)
    strat.handle_reply(reply(None, 1, error="Node Unavailable"), dst_node=103)
    run_round(strat, [reply(upload(u), 100 + u) for u in (0, 1, 2, 4)])
    assert sorted(strat.outcome.registered) == [0, 1, 2, 4]
    assert strat.outcome.failed == {3: "no valid reply: node 103: code 5: Node Unavailable"}


def test_an_unbound_node_gets_no_message_and_cannot_register(monkeypatch):
    monkeypatch.setattr(strategy, "Message", lambda content, dst_node_id, message_type: dst_node_id)
    strat = RegisterOnce({0: (0,), 1: (1,)}, RULES, node_wait_s=0.0, bindings={7: 0, 8: 1})
    sent = strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([7, 8, 9]))
    assert list(sent) == [7, 8]
    assert strat.outcome.unbound_nodes == [9]
    run_round(strat, [reply(upload(0), 9)])
    assert strat.outcome.registered == {}
    assert "node 9 is not bound to any user" in strat.outcome.node_errors[9]


def test_a_node_bound_to_a_user_outside_the_run_is_named_with_what_to_change(monkeypatch, caplog):
    # A device of user 12 joined (its key bound) while the run still has users 0 and 1.
    monkeypatch.setattr(strategy, "Message", lambda content, dst_node_id, message_type: dst_node_id)
    strat = RegisterOnce(
        {0: (0,), 1: (1,)}, RULES, node_wait_s=0.0, bindings={7: 0, 8: 1, 20: 12, 21: 5}
    )
    with caplog.at_level(logging.WARNING):
        sent = strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([7, 8, 20]))
    assert list(sent) == [7, 8]
    assert strat.outcome.outside_run == {5: 21, 12: 20}
    assert strat.outcome.result_fields()["bound_outside_run"] == {"5": 21, "12": 20}
    assert "users 5, 12 bound to a node but outside this run (its users: 0-1)" in caplog.text
    assert "set num_users=13 to include them" in caplog.text


def test_wait_for_nodes_waits_for_the_bound_nodes_not_a_count():
    grid = FakeGrid([1, 2, 3])
    assert nodes.wait_for_nodes(grid, 2, deadline_s=0.0, required={1, 4}) == [1, 2, 3]
    calls = []

    class Joining(FakeGrid):
        def get_node_ids(self):
            calls.append(1)
            return [1, 2, 3] if len(calls) < 3 else [1, 2, 3, 4]

    found = nodes.wait_for_nodes(Joining([]), 2, deadline_s=30, poll_s=0.0, required={1, 4})
    assert found == [1, 2, 3, 4] and len(calls) == 3


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"5": 0, "6": 1}', None),
        ("[1, 2]", "JSON object"),
        ('{"x": 1}', "integers"),
        ("{", "cannot read"),
    ],
)
def test_load_bindings(tmp_path, text, error):
    path = tmp_path / "bindings.json"
    path.write_text(text)
    if error is None:
        assert nodes.load_bindings(path) == {5: 0, 6: 1}
    else:
        with pytest.raises(ValueError, match=error):
            nodes.load_bindings(path)
