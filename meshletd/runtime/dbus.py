"""One connection to a systemd manager over D-Bus (pystemd), and the value conversions it
needs. Every call is blocking: `Bus.call` runs in one worker thread at a time (the caller
uses `trio.to_thread`), and reconnects once when systemd re-executed or the bus dropped."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pystemd.dbusexc import DBusBaseError  # type: ignore[import-untyped]
from pystemd.dbuslib import DBus, DBusAddress, apply_signature  # type: ignore[import-untyped]
from pystemd.systemd1 import Manager  # type: ignore[import-untyped]
from pystemd.systemd1.unit_signatures import (  # type: ignore[import-untyped]
    KNOWN_UNIT_SIGNATURES,
)

_T = TypeVar("_T")
SYSTEMD = b"org.freedesktop.systemd1"
PROPS = b"org.freedesktop.DBus.Properties"
MANAGER_PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
# StartTransientUnit properties pystemd's signature table lacks (systemd >= 236, >= 243).
KNOWN_UNIT_SIGNATURES.setdefault(b"AddRef", b"b")
KNOWN_UNIT_SIGNATURES.setdefault(b"LogLevelMax", b"i")
KNOWN_UNIT_SIGNATURES.setdefault(b"ExecStartPostEx", b"a(sasas)")
KNOWN_UNIT_SIGNATURES.setdefault(b"CPUWeight", b"t")


def to_dbus(value: object) -> Any:
    """Our property values with str turned into the bytes pystemd wants."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list):
        return [to_dbus(v) for v in value]
    if isinstance(value, tuple):
        return tuple(to_dbus(v) for v in value)
    return value


def from_dbus(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def connect(address: bytes | None) -> Any:
    """An open connection: the system bus when `address` is None, otherwise a peer-to-peer
    socket (a user manager's `/run/user/UID/systemd/private`)."""
    bus = DBus() if address is None else DBusAddress(address, peer_to_peer=True)
    bus.open()
    return bus


class Bus:
    """One connection to a service manager, used from one worker thread at a time.

    `address` None is the system bus; otherwise a peer-to-peer socket (a user manager's
    `/run/user/UID/systemd/private`, which root may use).
    """

    def __init__(self, address: bytes | None = None) -> None:
        self.address = address
        self.p2p = address is not None
        self._bus: Any = None
        self._manager: Any = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[[Any, Any], _T]) -> _T:

        with self._lock:
            for attempt in (1, 2):
                if self._bus is None:
                    self._bus = connect(self.address)
                    self._manager = Manager(bus=self._bus, _autoload=True)
                try:
                    return fn(self._bus, self._manager)
                except DBusBaseError as err:
                    if attempt == 1 and _is_connection_error(err):
                        self._bus = None  # systemd re-executed or the bus dropped: reconnect
                        continue
                    raise
            raise AssertionError("unreachable")


def _is_connection_error(err: Exception) -> bool:
    return getattr(err, "errno", 0) in (-104, -107, -32, -110)  # RESET, NOTCONN, PIPE, TIMEDOUT


class StartJobWatch:
    """Tells when `unit`'s start job is over: systemd's JobRemoved signal for it (what
    `systemctl start` and `systemd-run --wait` wait for), not a poll of the unit.

    On a connection of its own, so that the shared one stays free while a unit starts.
    `open` (blocking: a worker thread) connects, adds the match, then reads the unit's
    job, so a job that ends in between is seen either way. The caller then waits for
    `fileno()` to be readable and calls `poll()`, which never blocks: pystemd's own
    `wait()` blocks in C holding the GIL, which would stop the whole daemon meanwhile.
    systemd sends JobRemoved without a `Subscribe()` to whoever queued the job: on the
    system bus it is broadcast to matching connections such as this one, and on a
    manager's private socket it goes to every connection.
    """

    # Messages dispatched per `poll()`: some may already sit in the connection's queue
    # (read while a call waited for its reply) with nothing left to read on the socket.
    DISPATCH = 16

    def __init__(self, address: bytes | None, unit: str) -> None:
        self._address = address
        self._name = unit.encode()
        self._bus: Any = None
        self._on_removed: Callable[..., None] | None = None
        self.result: str | None = None

    def open(self) -> bool:
        """Connect and watch; False when no start job is pending (it is over already, or
        the unit is gone): nothing to wait for."""
        bus = self._bus = connect(self._address)

        def removed(msg: Any, error: Any = None, userdata: Any = None) -> None:
            msg.process_reply(False)
            _id, _job, who, result = msg.body
            if who == self._name:
                self.result = result.decode()

        # pystemd keeps only a bare pointer to the callback: hold it for as long as the bus.
        self._on_removed = removed
        sender = SYSTEMD if self._address is None else None
        bus.match_signal(sender, MANAGER_PATH, MANAGER, b"JobRemoved", removed)
        try:
            path = bus.call_method(
                SYSTEMD, MANAGER_PATH, MANAGER, b"GetUnit", apply_signature(b"s", [self._name])
            ).body
        except DBusBaseError:
            return False  # no such unit (any more)
        job_id, _ = bus.get_property(
            SYSTEMD, path, b"org.freedesktop.systemd1.Unit", b"Job", b"(uo)"
        )
        return bool(job_id) and self.result is None

    def fileno(self) -> int:
        return int(self._bus.get_fd())

    def poll(self) -> str | None:
        """Dispatch what has arrived (never blocks); the job's result ("done", "failed",
        ...) once its JobRemoved was seen."""
        for _ in range(self.DISPATCH):
            if self.result is not None:
                break
            self._bus.process()
        return self.result

    def close(self) -> None:
        if self._bus is not None:
            self._bus.close()
            self._bus = self._on_removed = None
