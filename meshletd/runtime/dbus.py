"""One connection to a systemd manager over D-Bus (pystemd), and the value conversions it
needs. Every call is blocking: `Bus.call` runs in one worker thread at a time (the caller
uses `trio.to_thread`), and reconnects once when systemd re-executed or the bus dropped."""

from __future__ import annotations

import threading
import time
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
                    if self.address is None:
                        self._bus = DBus()
                    else:
                        self._bus = DBusAddress(self.address, peer_to_peer=True)
                    self._bus.open()
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


def wait_start_job(address: bytes | None, unit: str, timeout_s: float) -> str | None:
    """Block until `unit` has no start job pending: systemd's JobRemoved signal for it
    (what `systemctl start` and `systemd-run --wait` wait for), not a poll. Returns the
    job's result ("done", "failed", ...), "" when no job was pending (it had ended, or the
    unit is gone), None after `timeout_s`.

    On its own connection, so that the shared one stays free while a unit starts. The
    match is in place before the unit's job is read, so a job that ends in between is
    seen either way. systemd sends JobRemoved without a `Subscribe()` to whoever queued
    the job: on the system bus it is broadcast to matching connections such as this one,
    and on a manager's private socket it goes to every connection.
    """
    bus: Any = DBus() if address is None else DBusAddress(address, peer_to_peer=True)
    bus.open()
    try:
        name, results = unit.encode(), []

        def removed(msg: Any, error: Any = None, userdata: Any = None) -> None:
            msg.process_reply(False)
            _id, _job, who, result = msg.body
            if who == name:
                results.append(result.decode())

        sender = SYSTEMD if address is None else None
        bus.match_signal(sender, MANAGER_PATH, MANAGER, b"JobRemoved", removed)
        try:
            path = bus.call_method(
                SYSTEMD, MANAGER_PATH, MANAGER, b"GetUnit", apply_signature(b"s", [name])
            ).body
        except DBusBaseError:
            return ""  # no such unit (any more)
        job_id, _ = bus.get_property(
            SYSTEMD, path, b"org.freedesktop.systemd1.Unit", b"Job", b"(uo)"
        )
        if job_id == 0:
            return ""
        deadline = time.monotonic() + timeout_s
        while not results:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            bus.process()  # runs `removed` for a signal that is in
            if not results:
                bus.wait(int(min(left, 1.0) * 1_000_000))
        return results[0]
    finally:
        bus.close()
