"""The state store keeps the old or the new value across a crash, never a torn one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshletd.daemon.stored import StoreJournal
from meshletd.store import MemoryStore, StateStore


def test_values_survive_reopening(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "state")
    s.put("cursor.pds0", {"seq": 42})
    s.put("pending-writes", [{"op": "create"}])
    again = StateStore(tmp_path / "state")
    assert again.get("cursor.pds0") == {"seq": 42}
    assert list(again.keys()) == ["cursor.pds0", "pending-writes"]
    again.delete("cursor.pds0")
    again.delete("cursor.pds0")
    assert again.get("cursor.pds0", "gone") == "gone"


def test_a_crash_before_rename_leaves_the_old_value_and_no_debris(tmp_path: Path) -> None:
    s = StateStore(tmp_path)
    s.put("cursor", 1)
    # What a crash between write and rename leaves behind: a half-written temporary file.
    (tmp_path / ".cursor.json.999.tmp").write_bytes(b'{"tor')
    reopened = StateStore(tmp_path)
    assert reopened.get("cursor") == 1
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_a_failed_write_keeps_the_previous_value(tmp_path: Path, monkeypatch) -> None:
    s = StateStore(tmp_path)
    s.put("k", "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        s.put("k", "new")
    monkeypatch.undo()
    assert s.get("k") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["k.json"]


def test_a_corrupt_file_is_set_aside_not_trusted(tmp_path: Path) -> None:
    s = StateStore(tmp_path)
    (tmp_path / "k.json").write_bytes(b"{not json")
    assert s.get("k", "default") == "default"
    assert (tmp_path / "k.json.corrupt").exists()


def test_keys_cannot_escape_the_directory(tmp_path: Path) -> None:
    s = StateStore(tmp_path)
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            s.put(bad, 1)


def test_files_are_private(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "d")
    s.put("k", 1)
    assert (tmp_path / "d" / "k.json").stat().st_mode & 0o077 == 0


def test_the_memory_store_behaves_the_same() -> None:
    m = MemoryStore()
    m.put("a", {"x": [1]})
    assert m.get("a") == {"x": [1]}
    m.delete("a")
    assert m.get("a", 0) == 0


def test_pending_pds_writes_are_journaled_in_the_store(tmp_path: Path) -> None:
    j = StoreJournal(StateStore(tmp_path))
    assert j.load() == []
    pending = [{"action": "put", "collection": "c", "rkey": "r", "value": {"a": 1}}]
    j.save(pending)
    assert StoreJournal(StateStore(tmp_path)).load() == pending
