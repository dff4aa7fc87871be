"""The suite's own settings: conftest's SERIAL, FIRST and ALONE name tests that exist, and the
collection hooks mark and order them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import ALONE, FIRST, SERIAL, _alone, _serial_rank, order_key

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("entries", [SERIAL, FIRST, ALONE], ids=["serial", "first", "alone"])
def test_every_entry_names_a_test_file_or_a_test_in_it(entries):
    # A renamed file or test would otherwise leave its group silently (a Flower run beside the
    # other session's, or the fault test under load).
    for entry in entries:
        file, _, name = entry.partition("::")
        path = HERE / file
        assert path.is_file(), entry
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", path.read_text(), re.M), entry


def test_the_groups_are_marked_and_ordered(request):
    # The collection hooks ran on this session's items.
    items = request.session.items
    keys = [order_key(item) for item in items]
    assert keys == sorted(keys), "a test out of its group's order"
    for item in items:
        names = {m.name for m in item.iter_markers()}
        assert ("serial" in names) is (_serial_rank(item) is not None), item.nodeid
        assert ("alone" in names) is _alone(item), item.nodeid
        assert not {"serial", "alone"} <= names, item.nodeid
