"""The real machine: systemd over D-Bus (pystemd) and rootless podman (CLI, argv lists).

Every D-Bus call is blocking, so it runs in a worker thread (`trio.to_thread`), one at a
time over one bus connection. Podman runs as the replica user via `trio.run_process` with
an argv list (no shell), secrets on stdin. Nothing here decides anything: it reads and
does; `ReplicaRuntime` decides.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import trio
from pystemd.dbusexc import DBusBaseError, DBusNoSuchUnitError  # type: ignore[import-untyped]
from pystemd.dbuslib import DBus, DBusAddress, apply_signature  # type: ignore[import-untyped]
from pystemd.systemd1 import Manager  # type: ignore[import-untyped]

from meshletd.runtime.events import Usage
from meshletd.runtime.machine import MachineError
from meshletd.runtime.outcome import ContainerSnapshot, UnitSnapshot
from meshletd.runtime.units import RuntimeConfig, memory_cgroup_dir, replica_state_dir

_T = TypeVar("_T")
_SYSTEMD = b"org.freedesktop.systemd1"
_PROPS = b"org.freedesktop.DBus.Properties"
_UNSET = (1 << 64) - 1
_CLK_TCK = os.sysconf("SC_CLK_TCK")


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
        self, *args: str, stdin: bytes = b"", check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        cfg = self.config
        kwargs: dict[str, Any] = {}
        if os.geteuid() != cfg.uid:
            kwargs.update(user=cfg.uid, group=cfg.gid, extra_groups=[])
        proc = await trio.run_process(
            [cfg.podman, *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=cfg.user_env(),
            cwd=cfg.home,
            **kwargs,
        )
        if check and proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise MachineError(
                f"podman {args[0]} {args[1] if len(args) > 1 else ''} exited "
                f"{proc.returncode}: {err[-1] if err else 'no message'}"
            )
        return proc

    # ---- images -------------------------------------------------------------------------

    async def image_present(self, image: str) -> bool:
        proc = await self._podman("image", "exists", image, check=False)
        return proc.returncode == 0

    async def pull_image(self, image: str) -> None:
        await self._podman("pull", "--quiet", image)

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
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            if path.exists():
                if keep:
                    return
                shutil.rmtree(path)
            path.mkdir(mode=0o700)
            if os.geteuid() == 0:
                os.chown(path, self.config.uid, self.config.gid)

        await trio.to_thread.run_sync(make)

    async def read_saved_counters(self, unit: str) -> dict[str, str]:
        path = Path(replica_state_dir(self.config, unit))

        def read() -> dict[str, str]:
            if not path.is_dir():
                return {}
            return {p.name: p.read_text(errors="replace") for p in path.iterdir() if p.is_file()}

        return await trio.to_thread.run_sync(read)

    async def remove_state_dir(self, unit: str) -> None:
        path = replica_state_dir(self.config, unit)
        await trio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))

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
            if not (active == "active" and sub == "running") and active != "activating":
                names += [("Result", b"s"), ("ExecMainCode", b"i"), ("ExecMainStatus", b"i")]
                names += [("MainPID", b"u")]
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

    async def sample_usage(self, unit: str) -> Usage:
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
            return Usage()
        return await trio.to_thread.run_sync(self._usage_from, unit, s)

    def _usage_from(self, unit: str, props: dict[bytes, Any]) -> Usage:
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
        return Usage(cpu_ms=cpu_ns // 1_000_000, peak_memory_bytes=peak)


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
