"""Podman as the replica user, one transient unit per call.

A podman call is never meshletd's child: a child would inherit meshletd.service's sandbox,
where rootless podman cannot work. `PodmanCalls._podman` starts `podman ARGS` in a
transient unit of the service manager, with stdin/stdout/stderr over pipes handed to
systemd with the unit (so a secret goes through a pipe, never a command line, a unit
property or the journal), waits for its end and lets systemd forget the unit.
`SystemdPodmanMachine` (systemd.py) mixes it in over its unit operations.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from pystemd.dbusexc import DBusBaseError  # type: ignore[import-untyped]

from meshletd.runtime.dbus import SYSTEMD, Bus
from meshletd.runtime.machine import MachineError
from meshletd.runtime.naming import PODMAN_CALL_PATTERN, podman_call_unit
from meshletd.runtime.outcome import CLD_EXITED, UnitSnapshot
from meshletd.runtime.units import RuntimeConfig, podman_call_properties

_T = TypeVar("_T")
# How long one podman call may take (a pull has its own, longer, limit).
CALL_TIMEOUT_S = 120


@dataclass(frozen=True)
class PodmanResult:
    """How one podman call ended: its exit status and what it wrote."""

    returncode: int
    stdout: bytes
    stderr: bytes


def call_ended(snap: UnitSnapshot) -> bool:
    """Whether a podman call's unit has run and ended (exited, failed, or gone)."""
    if snap.job_pending:
        return False
    if snap.load_state in ("not-found", ""):
        return True
    if snap.active_state in ("inactive", "failed"):
        return True
    return snap.active_state == "active" and snap.sub_state == "exited"


def read_some(fd: int) -> bytes | None:
    """One non-blocking read: data, b"" at EOF, None when nothing is there yet."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


class PodmanCalls:
    """Podman calls over a service manager's transient units (a mixin: the unit
    operations below are `SystemdPodmanMachine`'s)."""

    config: RuntimeConfig
    _bus: Bus
    _swept: bool

    async def _dbus(self, fn: Callable[[Any, Any], _T]) -> _T:
        raise NotImplementedError

    @staticmethod
    def _unit_path(manager: Any, unit: str) -> bytes | None:
        raise NotImplementedError

    async def start_unit(self, unit: str, properties: dict[str, object]) -> None:
        raise NotImplementedError

    async def unit_snapshot(self, unit: str) -> UnitSnapshot:
        raise NotImplementedError

    async def list_units(self, pattern: str) -> list[str]:
        raise NotImplementedError

    async def _podman(
        self,
        *args: str,
        stdin: bytes = b"",
        check: bool = True,
        timeout_s: int = CALL_TIMEOUT_S,
        on_line: Callable[[str], None] | None = None,
    ) -> PodmanResult:
        """Run `podman ARGS` as the replica user in a transient unit; wait for its end.

        Not a child of meshletd: a child would inherit meshletd.service's sandbox, where
        rootless podman cannot work. stdin/stdout/stderr are pipes handed to systemd with
        the unit (`Standard*FileDescriptor`), so data such as a secret goes through a pipe,
        never a command line, a unit property or the journal.
        """
        await self._sweep_podman_calls()
        unit = podman_call_unit(secrets.token_hex(8))
        props = podman_call_properties(self.config, args, timeout_s)
        try:
            in_r, in_w = os.pipe2(os.O_CLOEXEC) if stdin else (-1, -1)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:
            raise MachineError(f"podman {args[0]}: no pipe: {exc}") from exc
        stdio = {fd for fd in (in_r, in_w, out_r, out_w, err_r, err_w) if fd >= 0}

        def close(fd: int) -> None:
            # Each fd is closed exactly once: a second close could hit a reused number.
            if fd in stdio:
                stdio.discard(fd)
                os.close(fd)

        if stdin:
            props["StandardInputFileDescriptor"] = in_r
        props["StandardOutputFileDescriptor"] = out_w
        props["StandardErrorFileDescriptor"] = err_w
        if self._bus.p2p:
            # A user manager's private socket has no bus names, so it cannot pin a unit
            # for its caller (AddRef): the unit stays (active/exited or failed) until we
            # have read how it ended and clean it up.
            props["RemainAfterExit"] = True
        else:
            # Pinned while our bus connection lives (systemd-run --wait does the same): it
            # can be read after it ended, and systemd collects it when we let go or die.
            props["AddRef"] = True
            props["CollectMode"] = "inactive-or-failed"
        out, err = bytearray(), bytearray()
        started = False
        try:
            await self.start_unit(unit, props)
            started = True
            # systemd holds its own copies now; ours of the far ends would hide EOF.
            for fd in (in_r, out_w, err_w):
                close(fd)
            snap = await self._wait_call(unit, out_r, out, err_r, err, in_w, stdin, close, on_line)
        finally:
            if started:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await self._release_call(unit)
            for fd in list(stdio):
                with contextlib.suppress(OSError):
                    close(fd)
        if snap.main_code == CLD_EXITED:
            code = snap.main_status
        elif snap.main_code:
            code = 128 + snap.main_status
        else:
            code = 255  # it never ran (e.g. systemd could not set the user up)
        if check and code != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            why = lines[-1] if lines else f"no message (unit result {snap.result!r})"
            raise MachineError(
                f"podman {args[0]} {args[1] if len(args) > 1 else ''} exited {code}: {why}"
            )
        return PodmanResult(code, bytes(out), bytes(err))

    async def _wait_call(
        self,
        unit: str,
        out_r: int,
        out: bytearray,
        err_r: int,
        err: bytearray,
        in_w: int,
        stdin: bytes,
        close: Callable[[int], None],
        on_line: Callable[[str], None] | None = None,
    ) -> UnitSnapshot:
        """Feed stdin, collect stdout/stderr, and return the unit's snapshot once it ended."""
        eof = trio.Event()
        closed = 0

        async def pump(fd: int, buf: bytearray) -> None:
            nonlocal closed
            while True:
                await trio.lowlevel.wait_readable(fd)
                chunk = read_some(fd)
                if chunk is None:
                    continue
                if not chunk:
                    break
                seen = len(buf)
                buf += chunk
                if on_line is not None and fd == err_r:
                    start = buf.rfind(b"\n", 0, seen) + 1
                    for line in bytes(buf[start:]).split(b"\n")[:-1]:
                        on_line(line.decode(errors="replace"))
            closed += 1
            if closed == 2:
                eof.set()

        async def feed() -> None:
            view = memoryview(stdin)
            try:
                while view:
                    await trio.lowlevel.wait_writable(in_w)
                    try:
                        view = view[os.write(in_w, view) :]
                    except BlockingIOError:
                        continue
            except OSError:
                pass  # podman ended without reading it all: its exit status says why
            finally:
                with contextlib.suppress(OSError):
                    close(in_w)  # EOF: `podman secret create NAME -` reads until it

        for fd in (out_r, err_r, in_w):
            if fd >= 0:
                os.set_blocking(fd, False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, out_r, out)
            nursery.start_soon(pump, err_r, err)
            if stdin:
                nursery.start_soon(feed)
            # Poll the unit; systemd closes its copies of the pipes when podman ends, so
            # EOF on both is the usual wake-up and the interval only bounds the odd case.
            interval = 0.01
            while True:
                snap = await self.unit_snapshot(unit)
                if call_ended(snap):
                    break
                with trio.move_on_after(interval):
                    await eof.wait()
                interval = min(interval * 2, 0.25)
            nursery.cancel_scope.cancel()
        # Whatever podman wrote before it ended is in the pipes by now.
        for fd, buf in ((out_r, out), (err_r, err)):
            while chunk := read_some(fd):
                buf += chunk
        return snap

    async def _release_call(self, unit: str) -> None:
        """Let systemd forget a podman call's unit (stopping it if it still runs)."""
        p2p = self._bus.p2p

        def release(bus: Any, manager: Any) -> None:
            path = self._unit_path(manager, unit)
            if path is None:
                return
            state = bus.get_property(
                SYSTEMD, path, b"org.freedesktop.systemd1.Unit", b"ActiveState", b"s"
            )
            with contextlib.suppress(DBusBaseError):
                if state == b"failed":
                    manager.Manager.ResetFailedUnit(unit.encode())
                elif state != b"inactive":
                    manager.Manager.StopUnit(unit.encode(), b"replace")
            if not p2p:
                with contextlib.suppress(DBusBaseError):
                    manager.Manager.UnrefUnit(unit.encode())

        with contextlib.suppress(MachineError):
            await self._dbus(release)

    async def _sweep_podman_calls(self) -> None:
        """Once per process: remove podman-call units an earlier meshletd left behind.

        Only a user manager keeps them (see `_podman`); on the system bus systemd collects
        a pinned unit when its caller's connection goes away.
        """
        if self._swept:
            return
        self._swept = True
        if not self._bus.p2p:
            return
        for unit in await self.list_units(PODMAN_CALL_PATTERN):
            await self._release_call(unit)
