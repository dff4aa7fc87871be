"""A simulation binds its nodes to users on the server, as a deployment's operator does.

In a simulation the ServerApp cannot see which partition the engine gave a node, and a node's
claimed user id is not proof of anything: the server binds the connected nodes to the users
itself, tells each node its user in the train message, and rejects an upload that claims any
other user, as with a deployment's bindings.
"""

from __future__ import annotations

from unittest.mock import Mock

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.superlink.grid import InMemoryGrid

from docl_flower.federation import keys, nodes, strategy
from docl_flower.federation.client_tasks import resolve_user
from docl_flower.federation.grids import SimulationGrid
from docl_flower.federation.strategy import RegisterOnce, format_users, group_failures

from .test_strategy import ASSIGNMENT, RULES, FakeGrid, reply, run_round, upload


def _sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[RecordDict, int]]:
    sent: list[tuple[RecordDict, int]] = []

    def fake_message(content, dst_node_id, message_type):
        sent.append((content, dst_node_id))
        return Mock(spec=Message)

    monkeypatch.setattr(strategy, "Message", fake_message)
    return sent


def test_the_server_binds_simulated_nodes_and_tells_each_its_user(monkeypatch):
    # Prepare: five users, six connected nodes (one too many), node ids in random order.
    sent = _sent(monkeypatch)
    strat = RegisterOnce(ASSIGNMENT, RULES, node_wait_s=0.0, assign_nodes=True)
    # Execute
    strat.configure_train(
        1, ArrayRecord(), ConfigRecord({keys.SPEC: "{}"}), FakeGrid([50, 7, 31, 9, 12, 3])
    )
    # Assert: the i-th smallest node plays the i-th user; the extra node gets nothing.
    assert strat.bindings == {3: 0, 7: 1, 9: 2, 12: 3, 31: 4}
    assert strat.outcome.unbound_nodes == [50]
    told = {
        node: content.config_records[keys.CONFIG_RECORD][keys.ASSIGNED_USER]
        for content, node in sent
    }
    assert told == strat.bindings


def test_in_simulation_an_upload_claiming_another_users_id_is_rejected(monkeypatch):
    # Prepare: bind nodes 100..104 to users 0..4; node 103 (user 3) claims user 0 first.
    _sent(monkeypatch)
    strat = RegisterOnce(ASSIGNMENT, RULES, node_wait_s=0.0, assign_nodes=True)
    strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([100, 101, 102, 103, 104]))
    claim = upload(3, classes=[0], user_id=0)
    # Execute
    run_round(strat, [reply(claim, 103)] + [reply(upload(u), 100 + u) for u in (0, 1, 2, 4)])
    # Assert: user 0 is its own node's upload; the claim fails user 3, with the reason.
    out = strat.outcome
    assert sorted(out.registered) == [0, 1, 2, 4] and out.nodes[0] == 100
    assert "node 103 is bound to user 3, its upload claims user 0" in out.failed[3]


def test_without_binding_a_claimed_id_used_to_be_trusted():
    # The behaviour before: a deployment without bindings (debugging only) still trusts it.
    strat = RegisterOnce(ASSIGNMENT, RULES, node_wait_s=0.0)
    run_round(strat, [reply(upload(3, classes=[0], user_id=0), 103)])
    assert list(strat.outcome.registered) == [0]


def test_a_simulation_grid_is_recognised_through_its_wrappers():
    inner = InMemoryGrid.__new__(InMemoryGrid)  # no state needed to tell its kind
    assert nodes.is_simulation(inner)
    assert nodes.is_simulation(SimulationGrid(inner, 4))
    assert not nodes.is_simulation(FakeGrid([1]))


@pytest.mark.parametrize(
    ("node_config", "assigned", "expected"),
    [
        ({"partition-id": 4}, None, 4),
        ({"partition-id": 4}, 2, 2),  # a simulated node plays the user the server assigned
        ({"user-id": 6}, None, 6),
        ({"user-id": 6, "partition-id": 1}, 6, 6),
    ],
)
def test_a_client_trains_the_user_it_is_bound_to(node_config, assigned, expected):
    assert resolve_user(node_config, assigned) == expected


def test_a_device_refuses_a_binding_to_another_user():
    with pytest.raises(
        ValueError, match="bound this node to user 2, but its node config names user 6"
    ):
        resolve_user({"user-id": 6}, 2)


def test_failures_are_grouped_by_reason_with_the_users_they_hit():
    failed = {
        u: f"no valid reply: node {9000 + u}: code 2: DataError: x is missing" for u in range(10)
    }
    failed[11] = "rejected: catch-all"
    groups = group_failures(failed)
    assert groups == {
        "no valid reply: node N: code 2: DataError: x is missing": list(range(10)),
        "rejected: catch-all": [11],
    }
    assert format_users(list(range(10))) == "users 0-9"
    assert format_users([1, 2, 3, 7, 9]) == "users 1-3, 7, 9"
    assert format_users([4]) == "user 4"
