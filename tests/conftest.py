"""Test-suite wiring: markers by folder, and the session-scoped environments."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from devnet import Devnet

_HERE = Path(__file__).parent
_MARK_BY_FOLDER = {"unit": "unit", "devnet": "devnet", "system": "system"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests under tests/<folder>/ get that folder's marker (unit, devnet or system)."""
    for item in items:
        rel = Path(str(item.fspath)).relative_to(_HERE)
        mark = _MARK_BY_FOLDER.get(rel.parts[0]) if len(rel.parts) > 1 else None
        if mark and not item.get_closest_marker(mark):
            item.add_marker(mark)


# --- the local atproto network (dev/devnet), one per test session ---------------------

sys.path.insert(0, str(_HERE.parent / "dev" / "lib"))


@pytest.fixture(scope="session")
def devnet() -> Iterator[Devnet]:
    """PLC + two reference PDSes on loopback with alice, bob, carol and their meshlets.

    Tests that need accounts of their own (to stay independent) call
    `devnet.create_account(name, pds)` or `await devnet.create_account_async(...)`.
    """
    from devnet import Devnet, DevnetError

    try:
        net = Devnet.up()
    except DevnetError as e:
        pytest.fail(f"the local atproto network did not start: {e}", pytrace=False)
    try:
        yield net
    finally:
        net.down()
