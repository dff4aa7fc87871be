"""The suite's own settings: conftest.SERIAL names tests that exist, and marks them."""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import SERIAL, _serial_rank

HERE = Path(__file__).resolve().parent


def test_every_serial_entry_names_a_test_file_or_a_test_in_it():
    # A renamed file or test would otherwise leave the serial session silently, and run beside
    # the Flower runs in the other session.
    for entry in SERIAL:
        file, _, name = entry.partition("::")
        path = HERE / file
        assert path.is_file(), entry
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", path.read_text(), re.M), entry


def test_the_serial_tests_are_marked_and_come_first_in_their_order(request):
    # The collection hooks ran on this session's items.
    items = request.session.items
    ranks = [_serial_rank(item) for item in items]
    serial = [r for r in ranks if r is not None]
    assert ranks[: len(serial)] == serial, "a serial test after a non-serial one"
    assert serial == sorted(serial), "serial tests out of SERIAL's order"
    for item, rank in zip(items, ranks, strict=True):
        marked = any(m.name == "serial" for m in item.iter_markers())
        assert marked is (rank is not None), item.nodeid
