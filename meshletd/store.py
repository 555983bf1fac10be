"""A small crash-safe key → JSON store under `/var/lib/meshlet` (StateDirectory=).

What must survive a restart is small: firehose cursors per PDS, writes queued for the PDS,
adoption info about replica units. Each key is one file, replaced atomically: write a
temporary file in the same directory, fsync it, rename it over the old one, fsync the
directory. A crash at any point leaves either the old or the new value, never a torn one;
leftover temporary files are removed on open. Values are JSON (no pickles: the files are
meant to be readable by an operator).

Synchronous on purpose: each write is a few hundred bytes; the daemon calls it through
`trio.to_thread.run_sync` where latency matters.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TMP_SUFFIX = ".tmp"


class StateStore:
    """Atomic small-value store; one JSON file per key in `directory`."""

    def __init__(self, directory: Path | str, *, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self._fsync = fsync
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self.directory.glob(f"*{_TMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()

    def _path(self, key: str) -> Path:
        if not _KEY.match(key) or key.endswith(_TMP_SUFFIX):
            raise ValueError(f"invalid state key {key!r}")
        return self.directory / f"{key}.json"

    def get(self, key: str, default: Any = None) -> Any:
        """The stored value, or `default` when absent or unreadable (a corrupt file is kept
        aside as `<key>.json.corrupt` for an operator to inspect)."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return default
        try:
            return json.loads(data)
        except ValueError:
            with contextlib.suppress(OSError):
                path.replace(path.with_name(path.name + ".corrupt"))
            return default

    def put(self, key: str, value: Any) -> None:
        """Replace the value of `key` atomically and durably."""
        path = self._path(key)
        data = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
        tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._sync_dir()

    def delete(self, key: str) -> None:
        """Remove `key` (no error when absent)."""
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()
            self._sync_dir()

    def keys(self) -> Iterator[str]:
        for p in sorted(self.directory.glob("*.json")):
            yield p.name[: -len(".json")]

    def _sync_dir(self) -> None:
        if not self._fsync:
            return
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class MemoryStore:
    """In-memory stand-in with the same interface, for unit tests and the simulator."""

    def __init__(self) -> None:
        self._data: dict[str, str] = {}

    def get(self, key: str, default: Any = None) -> Any:
        raw = self._data.get(key)
        return default if raw is None else json.loads(raw)

    def put(self, key: str, value: Any) -> None:
        self._data[key] = json.dumps(value)

    def delete(self, key: str) -> None:
        self._data.pop(key, None)

    def keys(self) -> Iterator[str]:
        yield from sorted(self._data)
