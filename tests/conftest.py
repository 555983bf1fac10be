"""Test-suite wiring: markers by folder, and the session-scoped environments."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent
_MARK_BY_FOLDER = {"unit": "unit", "devnet": "devnet", "system": "system"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests under tests/<folder>/ get that folder's marker (unit, devnet or system)."""
    for item in items:
        rel = Path(str(item.fspath)).relative_to(_HERE)
        mark = _MARK_BY_FOLDER.get(rel.parts[0]) if len(rel.parts) > 1 else None
        if mark and not item.get_closest_marker(mark):
            item.add_marker(mark)
