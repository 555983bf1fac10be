"""sd_notify through the `sdnotify` package, plus the watchdog task.

systemd names a datagram socket in `NOTIFY_SOCKET` (a leading `@`: the abstract namespace);
`sdnotify.SystemdNotifier` connects to it and sends `KEY=VALUE` lines. Outside systemd the
variable is absent and every call is a no-op, so the daemon runs the same way under a test
or a shell. Tests bind their own datagram socket and point `NOTIFY_SOCKET` at it.

What this module adds to `sdnotify`: the socket is made non-blocking (an overloaded systemd
must not stall the event loop: a notification is dropped instead, and counted), values are
kept to one ASCII line (a newline in a status would inject a field), and the fields our
daemon sends have names (`ready`, `status`, `watchdog`, `stopping`, `reloading`).
"""

from __future__ import annotations

import array
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import sdnotify  # type: ignore[import-untyped]  # no stubs; a 60-line module
import trio


class Notifier(Protocol):
    def notify(self, **fields: str) -> None: ...


class _Messages:
    """The messages meshletd sends, over whatever `notify` delivers them."""

    def notify(self, **fields: str) -> None:
        raise NotImplementedError

    def ready(self, status: str | None = None) -> None:
        self.notify(READY="1", **({"STATUS": status} if status else {}))

    def status(self, text: str) -> None:
        self.notify(STATUS=text)

    def stopping(self, status: str | None = None) -> None:
        self.notify(STOPPING="1", **({"STATUS": status} if status else {}))


class SdNotifier(_Messages):
    """Sends sd_notify messages to `$NOTIFY_SOCKET`; silent when not started by systemd."""

    def __init__(self) -> None:
        self.address: str | None = os.environ.get("NOTIFY_SOCKET") or None
        self.dropped = 0  # messages systemd did not take (socket gone or full)
        self._systemd: sdnotify.SystemdNotifier | None = None
        if self.address:
            try:
                # debug=True: sdnotify raises instead of swallowing, so drops are counted.
                self._systemd = sdnotify.SystemdNotifier(debug=True)
            except OSError:
                self.dropped += 1
            else:
                self._systemd.socket.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._systemd is not None

    def notify(self, **fields: str) -> None:
        """Send `KEY=VALUE` lines; keyword names are the keys (`READY="1"`, `STATUS=…`)."""
        if self._systemd is None:
            return
        lines = [f"{key}={_one_line(value)}" for key, value in fields.items()]
        try:
            self._systemd.notify("\n".join(lines))
        except OSError:
            # systemd gone or overloaded: notifications are best effort by design.
            self.dropped += 1

    def reloading(self) -> None:
        # systemd >= 253 wants MONOTONIC_USEC with RELOADING=1 (Type=notify-reload).
        self.notify(
            RELOADING="1", MONOTONIC_USEC=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        )

    def watchdog(self) -> None:
        self.notify(WATCHDOG="1")

    def store_fds(self, name: str, fds: list[int]) -> bool:
        """Keep `fds` in systemd's file descriptor store under `name` (FDSTORE=1): they come
        back in LISTEN_FDS at the next start of the service, restart or crash alike (the
        unit needs FileDescriptorStoreMax=). False when not under systemd."""
        if self._systemd is None or not fds:
            return False
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            # sdnotify's socket is connected to systemd's: one datagram with the fds.
            self._systemd.socket.sendmsg([f"FDSTORE=1\nFDNAME={name}".encode()], rights)
        except OSError:
            self.dropped += 1
            return False
        return True

    def remove_fds(self, name: str) -> None:
        """Drop what the file descriptor store holds under `name`."""
        self.notify(FDSTOREREMOVE="1", FDNAME=name)

    def close(self) -> None:
        if self._systemd is not None:
            self._systemd.socket.close()
            self._systemd = None


def _one_line(value: object) -> str:
    # One line (a newline would start a field of the caller's choosing), ASCII (sdnotify
    # encodes latin-1, systemd reads UTF-8: anything else would arrive garbled).
    text = str(value).replace("\r", " ").replace("\n", " ")
    return text.encode("ascii", "replace").decode("ascii")


def inherited_fds(environ: Mapping[str, str] | None = None) -> dict[str, list[int]]:
    """Descriptors systemd passed us (sd_listen_fds): name -> fds, from LISTEN_PID,
    LISTEN_FDS and LISTEN_FDNAMES. Empty unless they are meant for this process."""
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if not (pid.isdigit() and int(pid) == os.getpid() and count.isdigit()):
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":")
    out: dict[str, list[int]] = {}
    for i in range(int(count)):
        name = names[i] if i < len(names) and names[i] else "unknown"
        out.setdefault(name, []).append(3 + i)  # SD_LISTEN_FDS_START
    return out


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of `WATCHDOG_USEC`), or None when disabled.

    Honours `WATCHDOG_PID`: when set to another process, the watchdog is not ours.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1_000_000 / 2


async def run_watchdog(
    notifier: Notifier,
    interval: float,
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """Ping the watchdog every `interval` seconds while `alive()` holds.

    The task runs in the daemon's own trio loop: a stalled loop stops the pings, and
    systemd then kills and restarts the daemon. `alive` lets the daemon add a check of its
    own (e.g. the main loop made progress recently).
    """
    while True:
        if alive():
            notifier.notify(WATCHDOG="1")
        await trio.sleep(interval)


class RecordingNotifier(_Messages):
    """Fake notifier for unit tests: remembers every message."""

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []

    def notify(self, **fields: str) -> None:
        self.messages.append(dict(fields))

    def reloading(self) -> None:
        self.notify(RELOADING="1")

    def watchdog(self) -> None:
        self.notify(WATCHDOG="1")

    def close(self) -> None:
        pass
