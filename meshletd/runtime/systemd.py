"""The real machine: systemd over D-Bus (pystemd) and rootless podman (CLI, argv lists).

Every D-Bus call is blocking, so it runs in a worker thread (`trio.to_thread`), one at a
time over one bus connection. Podman runs as the replica user in a transient unit per call
(never as meshletd's child, so meshletd's own unit can be strict), with an argv list (no
shell) and stdio over pipes, secrets on stdin. Nothing here decides anything: it reads and
does; `ReplicaRuntime` decides.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import trio
from pystemd.dbusexc import DBusBaseError, DBusNoSuchUnitError  # type: ignore[import-untyped]
from pystemd.dbuslib import DBus, DBusAddress, apply_signature  # type: ignore[import-untyped]
from pystemd.systemd1 import Manager  # type: ignore[import-untyped]
from pystemd.systemd1.unit_signatures import (  # type: ignore[import-untyped]
    KNOWN_UNIT_SIGNATURES,
)

from meshletd.runtime.events import ReplicaUsage
from meshletd.runtime.machine import MachineError
from meshletd.runtime.naming import PODMAN_CALL_PATTERN, podman_call_unit
from meshletd.runtime.outcome import CLD_EXITED, ContainerSnapshot, UnitSnapshot
from meshletd.runtime.units import (
    RuntimeConfig,
    memory_cgroup_dir,
    podman_call_properties,
    replica_state_dir,
)

_T = TypeVar("_T")
_SYSTEMD = b"org.freedesktop.systemd1"
_PROPS = b"org.freedesktop.DBus.Properties"
_UNSET = (1 << 64) - 1
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# StartTransientUnit properties pystemd's signature table lacks (systemd >= 236, >= 243).
KNOWN_UNIT_SIGNATURES.setdefault(b"AddRef", b"b")
KNOWN_UNIT_SIGNATURES.setdefault(b"LogLevelMax", b"i")
KNOWN_UNIT_SIGNATURES.setdefault(b"ExecStartPostEx", b"a(sasas)")
# How long one podman call may take (a pull has its own, longer, limit).
_CALL_TIMEOUT_S = 120


def _b(value: object) -> Any:
    """Our property values with str turned into the bytes pystemd wants."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list):
        return [_b(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_b(v) for v in value)
    return value


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def detect_cgroup_v2(root: str = "/sys/fs/cgroup") -> bool:
    """True on a unified (v2-only) hierarchy; hybrid/v1 hosts are v1 for our limits."""
    return os.path.exists(os.path.join(root, "cgroup.controllers"))


class _Bus:
    """One connection to a service manager, used from one worker thread at a time.

    `address` None is the system bus; otherwise a peer-to-peer socket (a user manager's
    `/run/user/UID/systemd/private`, which root may use).
    """

    def __init__(self, address: bytes | None = None) -> None:
        self._address = address
        self.p2p = address is not None
        self._bus: Any = None
        self._manager: Any = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[[Any, Any], _T]) -> _T:

        with self._lock:
            for attempt in (1, 2):
                if self._bus is None:
                    if self._address is None:
                        self._bus = DBus()
                    else:
                        self._bus = DBusAddress(self._address, peer_to_peer=True)
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


class SystemdPodmanMachine:
    """`Machine` on this host's system manager, with podman run as `config.user`."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        private = f"unix:path={config.runtime_dir}/systemd/private".encode()
        self._bus = _Bus(None if config.manager == "system" else private)
        self._limiter = trio.CapacityLimiter(1)
        self._swept = False

    @classmethod
    def for_user(cls, config: RuntimeConfig) -> SystemdPodmanMachine:
        """Fill uid/gid/home from the user database and the cgroup layout from /sys."""
        try:
            pw = pwd.getpwnam(config.user)
        except KeyError as err:
            raise MachineError(f"user {config.user!r} does not exist") from err
        return cls(
            replace(
                config,
                uid=pw.pw_uid,
                gid=pw.pw_gid,
                home=pw.pw_dir,
                cgroup_v2=detect_cgroup_v2(config.cgroup_root),
            )
        )

    # ---- D-Bus plumbing -----------------------------------------------------------------

    async def _dbus(self, fn: Callable[[Any, Any], _T]) -> _T:

        try:
            return await trio.to_thread.run_sync(self._bus.call, fn, limiter=self._limiter)
        except DBusBaseError as err:
            raise MachineError(f"systemd: {err}") from err

    @staticmethod
    def _get_all(bus: Any, path: bytes, interface: bytes) -> dict[bytes, Any]:

        body = bus.call_method(
            _SYSTEMD, path, _PROPS, b"GetAll", apply_signature(b"s", [interface])
        ).body
        return dict(body)

    @staticmethod
    def _unit_path(manager: Any, unit: str) -> bytes | None:

        try:
            return manager.Manager.GetUnit(unit.encode())  # type: ignore[no-any-return]
        except DBusNoSuchUnitError:
            return None

    # ---- podman plumbing ----------------------------------------------------------------

    async def _podman(
        self, *args: str, stdin: bytes = b"", check: bool = True, timeout_s: int = _CALL_TIMEOUT_S
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
            snap = await self._wait_call(unit, out_r, out, err_r, err, in_w, stdin, close)
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
    ) -> UnitSnapshot:
        """Feed stdin, collect stdout/stderr, and return the unit's snapshot once it ended."""
        eof = trio.Event()
        closed = 0

        async def pump(fd: int, buf: bytearray) -> None:
            nonlocal closed
            while True:
                await trio.lowlevel.wait_readable(fd)
                chunk = _read_some(fd)
                if chunk is None:
                    continue
                if not chunk:
                    break
                buf += chunk
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
                if _call_ended(snap):
                    break
                with trio.move_on_after(interval):
                    await eof.wait()
                interval = min(interval * 2, 0.25)
            nursery.cancel_scope.cancel()
        # Whatever podman wrote before it ended is in the pipes by now.
        for fd, buf in ((out_r, out), (err_r, err)):
            while chunk := _read_some(fd):
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
                _SYSTEMD, path, b"org.freedesktop.systemd1.Unit", b"ActiveState", b"s"
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

    # ---- images -------------------------------------------------------------------------

    async def image_present(self, image: str) -> bool:
        proc = await self._podman("image", "exists", image, check=False)
        return proc.returncode == 0

    async def pull_image(self, image: str) -> None:
        await self._podman("pull", "--quiet", image, timeout_s=self.config.pull_timeout_s)

    # ---- secrets ------------------------------------------------------------------------

    async def create_secret(self, name: str, data: bytes) -> None:
        await self._podman("secret", "create", name, "-", stdin=data)

    async def remove_secret(self, name: str) -> None:
        await self._podman("secret", "rm", name, check=False)

    async def list_secrets(self, prefix: str) -> list[str]:
        proc = await self._podman("secret", "ls", "--format", "{{.Name}}")
        return sorted(n for n in proc.stdout.decode().split() if n.startswith(prefix))

    # ---- containers ---------------------------------------------------------------------

    async def inspect_container(self, name: str) -> ContainerSnapshot | None:
        proc = await self._podman("container", "inspect", name, check=False)
        if proc.returncode != 0:
            return None
        state = json.loads(proc.stdout)[0]["State"]
        return ContainerSnapshot(
            str(state.get("Status", "")),
            int(state.get("ExitCode", 0)),
            bool(state.get("OOMKilled", False)),
        )

    async def remove_container(self, name: str) -> None:
        await self._podman("rm", "-f", "-i", "-t", "0", name)

    async def list_containers(self, label: str) -> list[str]:
        proc = await self._podman(
            "ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}"
        )
        return sorted(proc.stdout.decode().split())

    # ---- state dirs ---------------------------------------------------------------------

    async def prepare_state_dir(self, unit: str, *, keep: bool = False) -> None:
        path = Path(replica_state_dir(self.config, unit))

        def make() -> None:
            if not path.parent.is_dir():
                # Normally made by tmpfiles.d (meshletd's unit may not write /run).
                path.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(path.parent, 0o755)  # whatever the umask: replicas traverse it
            if path.exists():
                with contextlib.suppress(OSError):
                    self._own_state_dir(path)
                if keep:
                    return  # an adopted replica's: its counters may be in there
                shutil.rmtree(path)
            path.mkdir(mode=0o770)
            self._own_state_dir(path)

        await trio.to_thread.run_sync(make)

    async def read_saved_counters(self, unit: str) -> dict[str, str]:
        path = Path(replica_state_dir(self.config, unit))

        def read() -> dict[str, str]:
            try:
                return {
                    p.name: p.read_text(errors="replace") for p in path.iterdir() if p.is_file()
                }
            except OSError:
                return {}  # none saved (or unreadable): the unit's own result decides

        return await trio.to_thread.run_sync(read)

    async def remove_state_dir(self, unit: str) -> None:
        path = Path(replica_state_dir(self.config, unit))

        def remove() -> None:
            with contextlib.suppress(OSError):
                self._own_state_dir(path)
            shutil.rmtree(path, ignore_errors=True)

        await trio.to_thread.run_sync(remove)

    def _own_state_dir(self, path: Path) -> None:
        """root:meshlet 0770: the replica (user meshlet) writes its counters there, and
        meshletd reads and removes them as their owner: its unit leaves it no capability to
        bypass file permissions. Also takes over a dir an older meshletd made
        (meshlet:meshlet 0700) where it may still chown."""
        st = os.stat(path)
        if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, self.config.gid):
            # Not needed under the packaged unit: Group=meshlet gives new dirs the group.
            os.chown(path, 0, self.config.gid)
        if st.st_mode & 0o7777 != 0o770:
            os.chmod(path, 0o770)

    async def list_state_dirs(self) -> list[str]:
        root = Path(self.config.state_dir)

        def ls() -> list[str]:
            return sorted(p.name for p in root.iterdir()) if root.is_dir() else []

        return await trio.to_thread.run_sync(ls)

    # ---- systemd ------------------------------------------------------------------------

    async def ensure_slice(self, properties: dict[str, object]) -> None:
        name = self.config.slice
        props = {k.encode(): _b(v) for k, v in properties.items()}

        def ensure(bus: Any, manager: Any) -> None:

            path = self._unit_path(manager, name)
            if path is not None:
                active = self._get_all(bus, path, b"org.freedesktop.systemd1.Unit")
                if active.get(b"ActiveState") == b"active":
                    manager.Manager.SetUnitProperties(name.encode(), True, props)
                    return
            try:
                manager.Manager.StartTransientUnit(name.encode(), b"fail", props)
            except DBusBaseError:
                # It exists (a unit file shipped by the package): set the caps at runtime.
                manager.Manager.SetUnitProperties(name.encode(), True, props)

        try:
            await self._dbus(ensure)
        except Exception as err:
            raise MachineError(f"could not set up slice {name}: {err}") from err

    async def start_unit(self, unit: str, properties: dict[str, object]) -> None:
        props = {k.encode(): _b(v) for k, v in properties.items()}

        def start(bus: Any, manager: Any) -> None:
            manager.Manager.StartTransientUnit(unit.encode(), b"fail", props)

        try:
            await self._dbus(start)
        except Exception as err:
            raise MachineError(str(err)) from err

    async def unit_snapshot(self, unit: str) -> UnitSnapshot:
        def snap(bus: Any, manager: Any) -> UnitSnapshot:

            path = self._unit_path(manager, unit)
            if path is None:
                return UnitSnapshot(unit)
            # Only cheap reads: the Service interface's GetAll reads cgroup files in PID 1,
            # and this is polled while a unit starts.
            u = self._get_all(bus, path, b"org.freedesktop.systemd1.Unit")
            active, sub = _s(u.get(b"ActiveState", b"")), _s(u.get(b"SubState", b""))
            service: dict[str, Any] = {}
            names = [("Environment", b"as")]
            ended = not (active == "active" and sub == "running") and active != "activating"
            if ended:
                names += [("Result", b"s"), ("ExecMainCode", b"i"), ("ExecMainStatus", b"i")]
                names += [("MainPID", b"u"), ("ExecStartPost", b"a(sasbttttuii)")]
            for name, rtype in names:
                try:
                    service[name] = bus.get_property(
                        _SYSTEMD, path, b"org.freedesktop.systemd1.Service", name.encode(), rtype
                    )
                except DBusBaseError:
                    pass
            return UnitSnapshot(
                name=unit,
                load_state=_s(u.get(b"LoadState", b"")),
                active_state=active,
                sub_state=sub,
                result=_s(service.get("Result", b"")),
                main_code=int(service.get("ExecMainCode", 0)),
                main_status=int(service.get("ExecMainStatus", 0)),
                main_pid=int(service.get("MainPID", 0)),
                environment=tuple(_s(e) for e in service.get("Environment", [])),
                job_pending=bool(u.get(b"Job", (0, b"/"))[0]),
                start_post_failed=any(
                    # (path, argv, ignore, 4 timestamps, pid, code, status); pid 0: not run
                    e[7] != 0 and (e[8] != CLD_EXITED or e[9] != 0)
                    for e in service.get("ExecStartPost", [])
                ),
            )

        return await self._dbus(snap)

    async def list_units(self, pattern: str) -> list[str]:
        def ls(bus: Any, manager: Any) -> list[str]:
            units = manager.Manager.ListUnitsByPatterns([], [pattern.encode()])
            return sorted(_s(u[0]) for u in units)

        return await self._dbus(ls)

    async def stop_unit(self, unit: str) -> None:
        def stop(bus: Any, manager: Any) -> bool:

            if self._unit_path(manager, unit) is None:
                return False
            try:
                manager.Manager.StopUnit(unit.encode(), b"replace")
            except DBusBaseError:
                return False
            return True

        if not await self._dbus(stop):
            return
        # The stop job runs ExecStop (podman rm); wait until the unit is down.
        with trio.move_on_after(self.config.start_timeout_s):
            while True:
                snap = await self.unit_snapshot(unit)
                if snap.active_state in ("inactive", "failed", "") or snap.load_state in (
                    "not-found",
                    "",
                ):
                    return
                await trio.sleep(0.02)
        raise MachineError(f"unit {unit} did not stop in {self.config.start_timeout_s}s")

    async def reset_failed(self, unit: str) -> None:
        def reset(bus: Any, manager: Any) -> None:

            try:
                manager.Manager.ResetFailedUnit(unit.encode())
            except DBusBaseError:
                pass  # not loaded or not failed: nothing to reset

        await self._dbus(reset)

    async def cpu_quota_usec(self, unit: str) -> int | None:
        def read(bus: Any, manager: Any) -> int | None:
            path = self._unit_path(manager, unit)
            if path is None:
                return None
            # The configured value (no cgroup file is read for it).
            return int(
                bus.get_property(
                    _SYSTEMD, path, b"org.freedesktop.systemd1.Service", b"CPUQuotaPerSecUSec", b"t"
                )
            )

        return await self._dbus(read)

    async def set_cpu_quota_usec(self, unit: str, usec: int) -> None:
        def set_quota(bus: Any, manager: Any) -> None:
            # runtime=True: for a transient unit the drop-in goes with the unit.
            manager.Manager.SetUnitProperties(unit.encode(), True, {b"CPUQuotaPerSecUSec": usec})

        try:
            await self._dbus(set_quota)
        except MachineError:
            raise
        except Exception as err:
            raise MachineError(f"could not set the CPU quota of {unit}: {err}") from err

    async def sample_usage(self, unit: str) -> ReplicaUsage:
        def props(bus: Any, manager: Any) -> dict[bytes, Any]:
            path = self._unit_path(manager, unit)
            if path is None:
                return {}
            # Two single reads, not GetAll: that would make PID 1 read every cgroup file.
            return {
                name: bus.get_property(
                    _SYSTEMD, path, b"org.freedesktop.systemd1.Service", name, b"t"
                )
                for name in (b"CPUUsageNSec", b"MemoryCurrent")
            }

        s = await self._dbus(props)
        if not s:
            return ReplicaUsage()
        return await trio.to_thread.run_sync(self._usage_from, unit, s)

    def _usage_from(self, unit: str, props: dict[bytes, Any]) -> ReplicaUsage:
        cpu_ns = int(props.get(b"CPUUsageNSec", _UNSET))
        memory = memory_cgroup_dir(self.config, unit)
        if cpu_ns == _UNSET:
            # cgroup v1 with cpuacct not joined to cpu (our hosts): add up the processes.
            cpu_ns = _proc_cpu_ns(Path(memory) / "cgroup.procs")
        peak = 0
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            try:
                peak = int(Path(memory, name).read_text())
                break
            except (OSError, ValueError):
                continue
        if not peak:
            current = int(props.get(b"MemoryCurrent", _UNSET))
            peak = 0 if current == _UNSET else current
        return ReplicaUsage(cpu_ms=cpu_ns // 1_000_000, peak_memory_bytes=peak)


@dataclass(frozen=True)
class PodmanResult:
    """How one podman call ended: its exit status and what it wrote."""

    returncode: int
    stdout: bytes
    stderr: bytes


def _call_ended(snap: UnitSnapshot) -> bool:
    """Whether a podman call's unit has run and ended (exited, failed, or gone)."""
    if snap.job_pending:
        return False
    if snap.load_state in ("not-found", ""):
        return True
    if snap.active_state in ("inactive", "failed"):
        return True
    return snap.active_state == "active" and snap.sub_state == "exited"


def _read_some(fd: int) -> bytes | None:
    """One non-blocking read: data, b"" at EOF, None when nothing is there yet."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


def _proc_cpu_ns(procs_file: Path) -> int:
    """CPU time of the processes in a cgroup, with their reaped children (utime..cstime)."""
    try:
        pids = procs_file.read_text().split()
    except OSError:
        return 0
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        # after the comm: state=0 ... utime=11 stime=12 cutime=13 cstime=14
        ticks += sum(int(f) for f in fields[11:15])
    return ticks * 1_000_000_000 // _CLK_TCK
