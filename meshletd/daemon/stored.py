"""What the daemon keeps in the crash-safe state store (`meshletd.store`) besides secrets:
the firehose cursors and the writes still queued for the PDS."""

from __future__ import annotations

from typing import Any, Protocol


class Store(Protocol):
    """`meshletd.store.StateStore` (files) or `MemoryStore` (tests)."""

    def get(self, key: str, default: object = None) -> object:
        """The JSON value stored under `key` (a reader checks its shape), or `default`."""
        ...

    def put(self, key: str, value: object) -> None:
        """Store a JSON-serialisable value under `key`."""
        ...


class StoreCursors:
    """The firehose's `CursorStore` in the state store (one key for all PDSes)."""

    KEY = "firehose-cursors"

    def __init__(self, store: Store) -> None:
        self._store = store
        raw = store.get(self.KEY, {})
        self._cursors: dict[str, int] = (
            {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, int)}
            if isinstance(raw, dict)
            else {}
        )

    def load(self, pds_url: str) -> int | None:
        return self._cursors.get(pds_url)

    def save(self, pds_url: str, seq: int) -> None:
        if self._cursors.get(pds_url) == seq:
            return
        self._cursors[pds_url] = seq
        self._store.put(self.KEY, self._cursors)


class StoreJournal:
    """The write queue's `WriteJournal` in the state store: writes queued for the PDS
    survive a restart (e.g. while the PDS is down)."""

    KEY = "pending-writes"

    def __init__(self, store: Store) -> None:
        self._store = store

    def load(self) -> list[dict[str, Any]]:
        value = self._store.get(self.KEY, [])
        return [w for w in value if isinstance(w, dict)] if isinstance(value, list) else []

    def save(self, pending: list[dict[str, Any]]) -> None:
        self._store.put(self.KEY, pending)
