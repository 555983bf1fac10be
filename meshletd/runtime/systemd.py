"""The real machine: systemd over D-Bus (pystemd) and rootless podman (CLI, argv lists).

Every D-Bus call is blocking, so it runs in a worker thread (`trio.to_thread`), one at a
time over one bus connection. Podman runs as the replica user in a transient unit per call
(never as meshletd's child, so meshletd's own unit can be strict), with an argv list (no
shell) and stdio over pipes, secrets on stdin. Nothing here decides anything: it reads and
does; `ReplicaRuntime` decides.

By concern: the bus connection and value conversions are `dbus.py`; podman as one transient
unit per call is `podman_call.py` (mixed in); here are the unit operations (start, snapshot,
stop, CPU quota, usage), the state directories, and the Machine's image, secret and
container calls over podman.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import trio
from pystemd.dbusexc import DBusBaseError, DBusNoSuchUnitError  # type: ignore[import-untyped]
from pystemd.dbuslib import apply_signature  # type: ignore[import-untyped]

from meshletd.runtime.dbus import PROPS, SYSTEMD, Bus, StartJobWatch, from_dbus, to_dbus
from meshletd.runtime.events import ReplicaUsage
from meshletd.runtime.machine import MachineError
from meshletd.runtime.network import resolvers_from, ruleset
from meshletd.runtime.outcome import CLD_EXITED, ContainerSnapshot, UnitSnapshot
from meshletd.runtime.podman_call import PodmanCalls, PodmanResult, call_ended
from meshletd.runtime.reference import parse_image
from meshletd.runtime.registry import RegistryClient, RemoteImage
from meshletd.runtime.units import (
    WARM_LABEL,
    RuntimeConfig,
    dropin_limit_keys,
    is_admin_dropin,
    load_network_rules_argv,
    memory_cgroup_dir,
    replica_state_dir,
    slice_properties,
)

__all__ = ["PodmanResult", "SystemdPodmanMachine", "call_ended", "detect_cgroup_v2", "to_dbus"]

log = logging.getLogger("meshletd.runtime")
_T = TypeVar("_T")
_UNSET = (1 << 64) - 1
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# At most this many replica starts are waited for at once (each a D-Bus connection for
# as long as its unit starts); more are polled.
START_WAITERS = 32
# While waiting, the connection's queue is also looked at this often: a message may sit
# there, read along with a call's reply, with nothing left on the socket to wake us.
START_WAIT_TICK_S = 0.05


def detect_cgroup_v2(root: str = "/sys/fs/cgroup") -> bool:
    """True on a unified (v2-only) hierarchy; hybrid/v1 hosts are v1 for our limits."""
    return os.path.exists(os.path.join(root, "cgroup.controllers"))


class SystemdPodmanMachine(PodmanCalls):
    """`Machine` on this host's system manager, with podman run as `config.user`."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        private = f"unix:path={config.runtime_dir}/systemd/private".encode()
        self._bus = Bus(None if config.manager == "system" else private)
        self._limiter = trio.CapacityLimiter(1)
        # The starts waited for at once (each a D-Bus connection of its own).
        self._waiters = trio.CapacityLimiter(START_WAITERS)
        self._swept = False
        self._registry: RegistryClient | None = None

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
            SYSTEMD, path, PROPS, b"GetAll", apply_signature(b"s", [interface])
        ).body
        return dict(body)

    @staticmethod
    def _unit_path(manager: Any, unit: str) -> bytes | None:

        try:
            return manager.Manager.GetUnit(unit.encode())  # type: ignore[no-any-return]
        except DBusNoSuchUnitError:
            return None

    # ---- images -------------------------------------------------------------------------

    async def image_present(self, image: str) -> bool:
        proc = await self._podman("image", "exists", image, check=False)
        return proc.returncode == 0

    async def remote_image(self, image: str, auth: bytes | None = None) -> RemoteImage:
        # One client for the process: making one costs ~90 ms (its TLS context), and its
        # connections to a registry are kept for the next replica's pull.
        if self._registry is None:
            self._registry = RegistryClient(timeout_s=min(30, self.config.pull_timeout_s))
        return await self._registry.inspect(parse_image(image), auth=auth)

    async def pull_image(
        self,
        image: str,
        *,
        auth: bytes | None = None,
        scratch: str = "",
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        """`podman pull IMAGE`; with `auth`, through an auth file in the replica's state
        dir (`scratch` names its unit) that exists only while this pull runs: credentials
        never reach podman's argv, a unit property or the journal."""
        args = ["pull", image]
        path: Path | None = None
        if auth is not None:
            path = Path(replica_state_dir(self.config, scratch)) / "pull-auth.json"
            await trio.to_thread.run_sync(self._write_auth, path, auth)
            args = ["pull", "--authfile", str(path), image]
        try:
            # A little longer than the runtime waits: its own timeout says "timed out".
            await self._podman(*args, timeout_s=self.config.pull_timeout_s + 5, on_line=on_line)
        finally:
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _write_auth(self, path: Path, auth: bytes) -> None:
        """root:meshlet 0640 (podman reads it as user meshlet), written before it is named."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # Under the packaged unit (Group=meshlet) the file has the group already, and
            # chown is a syscall its filter refuses (@privileged): only fix it elsewhere.
            if os.geteuid() == 0 and os.fstat(fd).st_gid != self.config.gid:
                os.fchown(fd, 0, self.config.gid)
            os.fchmod(fd, 0o640)
            os.write(fd, auth)
        finally:
            os.close(fd)

    async def image_store_bytes(self) -> int:
        proc = await self._podman("image", "ls", "--format", "json")
        images = json.loads(proc.stdout or b"[]") or []
        return sum(int(i.get("Size", 0)) for i in images if isinstance(i, dict))

    async def prune_images(self) -> None:
        await self._podman("image", "prune", "--all", "--force", timeout_s=300)

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
        health = state.get("Health") or state.get("Healthcheck") or {}
        return ContainerSnapshot(
            str(state.get("Status", "")),
            int(state.get("ExitCode", 0)),
            bool(state.get("OOMKilled", False)),
            str(health.get("Status", "")) if isinstance(health, dict) else "",
        )

    async def remove_container(self, name: str) -> None:
        await self._podman("rm", "-f", "-i", "-t", "0", name)

    async def prepare_user_namespaces(self, image: str, size: int, count: int) -> None:
        names = [f"meshlet-warm-{secrets.token_hex(6)}" for _ in range(count)]
        made = []
        try:
            for name in names:
                await self._podman(
                    "create",
                    "--name",
                    name,
                    "--label",
                    f"{WARM_LABEL}=1",
                    f"--userns=auto:size={size}",
                    "--pull=never",
                    "--network=none",
                    image,
                    "true",
                )
                made.append(name)
        finally:
            if made:
                with trio.CancelScope(shield=True):
                    await self._podman("rm", "-f", "-i", "-t", "0", *made, check=False)

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
            # Directories only: the network rules file lives beside them.
            return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

        return await trio.to_thread.run_sync(ls)

    # ---- systemd ------------------------------------------------------------------------

    async def ensure_slice(self, config: RuntimeConfig) -> frozenset[str]:
        name = config.slice

        def ensure(bus: Any, manager: Any) -> frozenset[str]:
            # LoadUnit (not GetUnit): the package's slice file and its drop-ins are read even
            # before the slice first starts.
            path = manager.Manager.LoadUnit(name.encode())
            unit = self._get_all(bus, path, b"org.freedesktop.systemd1.Unit")
            dropins = [from_dbus(p) for p in unit.get(b"DropInPaths", [])]
            admin: set[str] = set()
            for dropin in filter(is_admin_dropin, dropins):
                try:
                    admin |= dropin_limit_keys(Path(dropin).read_text(errors="replace"))
                except OSError:
                    continue
            # A run-time setting meshletd made earlier in this boot outranks the admin's
            # drop-in (systemd reads system.control last): remove it so the admin's holds.
            stale = [
                d
                for d in dropins
                if not is_admin_dropin(d) and Path(d).name in {f"50-{k}.conf" for k in admin}
            ]
            for d in stale:
                Path(d).unlink(missing_ok=True)
            if stale:
                manager.Manager.Reload()
            props = {k.encode(): to_dbus(v) for k, v in slice_properties(config, admin).items()}
            if unit.get(b"ActiveState") == b"active":
                manager.Manager.SetUnitProperties(name.encode(), True, props)
                return frozenset(admin)
            try:
                manager.Manager.StartTransientUnit(name.encode(), b"fail", props)
            except DBusBaseError:
                # It exists (a unit file shipped by the package): set the caps at runtime.
                manager.Manager.SetUnitProperties(name.encode(), True, props)
            return frozenset(admin)

        try:
            return await self._dbus(ensure)
        except Exception as err:
            raise MachineError(f"could not set up slice {name}: {err}") from err

    async def apply_network_rules(self, config: RuntimeConfig) -> None:
        def write() -> None:
            try:
                resolv = Path("/etc/resolv.conf").read_text(errors="replace")
            except OSError:
                resolv = ""
            dns4, dns6 = resolvers_from(resolv)
            text = ruleset(
                config.network_grant,
                uid=config.uid,
                cgroup_v2=config.cgroup_v2,
                resolvers_v4=dns4,
                resolvers_v6=dns6,
            )
            path = Path(config.network_rules_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            tmp.replace(path)

        await trio.to_thread.run_sync(write)
        argv = load_network_rules_argv(config)
        if config.manager == "system":
            # As root (nft needs CAP_NET_ADMIN, which meshletd's own unit does not have).
            await self._call(argv, as_root=True, timeout_s=30)
            return
        # A user manager's units run as its user: meshletd, root without the packaged
        # sandbox in this mode (see "Two homes for the units"), loads them itself.
        try:
            with trio.fail_after(30):
                await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
        except (OSError, subprocess.CalledProcessError, trio.TooSlowError) as err:
            why = getattr(err, "stderr", b"") or b""
            raise MachineError(f"{' '.join(argv)}: {why.decode(errors='replace') or err}") from err

    async def start_unit(self, unit: str, properties: dict[str, object]) -> None:
        props = {k.encode(): to_dbus(v) for k, v in properties.items()}

        def start(bus: Any, manager: Any) -> None:
            manager.Manager.StartTransientUnit(unit.encode(), b"fail", props)

        try:
            await self._dbus(start)
        except Exception as err:
            raise MachineError(str(err)) from err

    async def wait_started(self, unit: str, timeout_s: float) -> None:
        # Waiting for systemd's signal, not polling: a poll every 10 ms kept PID 1
        # answering while it started the unit (~12 ms slower starts, docs/runtime.md).
        if self._waiters.available_tokens == 0:
            return  # as many starts at once as waiters: this one is polled
        watch = StartJobWatch(self._bus.address, unit)  # None: the system bus
        try:
            async with self._waiters:
                if not await trio.to_thread.run_sync(watch.open):
                    return
                with trio.move_on_after(timeout_s):
                    while watch.poll() is None:
                        with trio.move_on_after(START_WAIT_TICK_S):
                            await trio.lowlevel.wait_readable(watch.fileno())
        except Exception as err:  # a wait that fails: the caller polls instead
            log.debug("waiting for %s's start job: %s", unit, err)
        finally:
            watch.close()

    async def unit_snapshot(self, unit: str) -> UnitSnapshot:
        def snap(bus: Any, manager: Any) -> UnitSnapshot:

            path = self._unit_path(manager, unit)
            if path is None:
                return UnitSnapshot(unit)
            # Only cheap reads: the Service interface's GetAll reads cgroup files in PID 1,
            # and this is polled while a unit starts.
            u = self._get_all(bus, path, b"org.freedesktop.systemd1.Unit")
            active, sub = from_dbus(u.get(b"ActiveState", b"")), from_dbus(u.get(b"SubState", b""))
            service: dict[str, Any] = {}
            names = [("Environment", b"as")]
            ended = not (active == "active" and sub == "running") and active != "activating"
            if ended:
                names += [("Result", b"s"), ("ExecMainCode", b"i"), ("ExecMainStatus", b"i")]
                names += [("MainPID", b"u"), ("ExecStartPost", b"a(sasbttttuii)")]
            for name, rtype in names:
                try:
                    service[name] = bus.get_property(
                        SYSTEMD, path, b"org.freedesktop.systemd1.Service", name.encode(), rtype
                    )
                except DBusBaseError:
                    pass
            return UnitSnapshot(
                name=unit,
                load_state=from_dbus(u.get(b"LoadState", b"")),
                active_state=active,
                sub_state=sub,
                result=from_dbus(service.get("Result", b"")),
                main_code=int(service.get("ExecMainCode", 0)),
                main_status=int(service.get("ExecMainStatus", 0)),
                main_pid=int(service.get("MainPID", 0)),
                environment=tuple(from_dbus(e) for e in service.get("Environment", [])),
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
            return sorted(from_dbus(u[0]) for u in units)

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
                    SYSTEMD, path, b"org.freedesktop.systemd1.Service", b"CPUQuotaPerSecUSec", b"t"
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
                    SYSTEMD, path, b"org.freedesktop.systemd1.Service", name, b"t"
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
