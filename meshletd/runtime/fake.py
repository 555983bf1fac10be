"""An in-memory machine that behaves like systemd + rootless podman do for our units.

`FakeMachine` keeps units, containers, images, secrets and saved counters in dicts and
follows the same rules the real machine showed (docs/runtime.md): `--pull=never` with a
missing image fails the unit with podman's status 125; a container ending with 0 or 143
leaves the unit active/exited, any other status leaves it failed; on cgroup v1 an OOM kill
is exit 137 with `oom_kill 1` in the saved counters and *not* in `podman inspect`; stopping
a unit runs its `ExecStop` (podman rm) and the unit disappears; a failed unit stays until
reset. The runtime tests run the same contract against it and against the real machine.

What a fake container does is decided by its args, like a real one's:
`sh -c "exit N"` ends with N at the next look; anything else runs until stopped, unless
`behave(args, ...)` says otherwise (e.g. the OOM script of a test).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from meshletd.runtime.events import ReplicaUsage
from meshletd.runtime.machine import MachineError
from meshletd.runtime.outcome import CLD_EXITED, ContainerSnapshot, UnitSnapshot
from meshletd.runtime.registry import RegistryError, RemoteImage
from meshletd.runtime.runtime import ReplicaRuntime
from meshletd.runtime.units import INFINITY, LABEL, RuntimeConfig, slice_properties

_EXIT_RE = re.compile(r"^\s*exit\s+(\d+)\s*$")


@dataclass
class FakeContainer:
    name: str
    image: str
    args: tuple[str, ...]
    labels: dict[str, str]
    secrets: dict[str, bytes]
    status: str = "running"
    exit_code: int = 0
    looks: int = 0
    health: str = ""  # a test sets the health check's verdict (podman's State.Health)


@dataclass
class FakeUnit:
    name: str
    properties: dict[str, object]
    active_state: str = "active"
    sub_state: str = "running"
    result: str = "success"
    main_code: int = 0
    main_status: int = 0
    start_post_failed: bool = False

    @property
    def environment(self) -> tuple[str, ...]:
        env = self.properties.get("Environment", [])
        return tuple(env) if isinstance(env, list) else ()


@dataclass
class FakeMachine:
    """See the module docstring. Tests may look at (and poke) every field."""

    images: set[str] = field(default_factory=lambda: {"localhost/busybox:latest"})
    pullable: set[str] = field(default_factory=set)
    # The registry behind `pullable`: auth a pull must present per image, the size every
    # image has, how long a pull takes; and every pull made (image, auth).
    pull_credentials: dict[str, bytes] = field(default_factory=dict)
    pull_size_bytes: int = 1 << 20
    pull_delay_s: float = 0.0
    pulls: list[tuple[str, bytes | None]] = field(default_factory=list)
    secrets: dict[str, bytes] = field(default_factory=dict)
    containers: dict[str, FakeContainer] = field(default_factory=dict)
    units: dict[str, FakeUnit] = field(default_factory=dict)
    saved: dict[str, dict[str, str]] = field(default_factory=dict)
    state_dirs: set[str] = field(default_factory=set)
    slice_properties: dict[str, object] | None = None
    # Unit-file keys an administrator's drop-in for the slice sets (e.g. {"MemoryMax"}).
    admin_slice_keys: set[str] = field(default_factory=set)
    behaviours: dict[tuple[str, ...], str] = field(default_factory=dict)
    cpu_ms_per_look: int = 10
    started: int = 0
    # Test controls: the unit's ExecStartPost (systemctl set-property) fails; a
    # SetUnitProperties from the runtime fails.
    start_post_fails: bool = False
    set_quota_fails: bool = False
    # The network rules (`apply_network_rules`): the grant last applied, and whether
    # loading them fails (e.g. no nft on the host).
    network_grant: str | None = None
    image_sizes: dict[str, int] = field(default_factory=dict)  # image -> bytes
    prunes: int = 0
    warmed: list[tuple[str, int, int]] = field(default_factory=list)  # image, size, count
    network_applies: int = 0
    network_rules_fail: bool = False

    # ---- test controls ---------------------------------------------------------------

    def behave(self, args: tuple[str, ...], behaviour: str) -> None:
        """Make containers with these args `oom`, `exit:N` or `run` (the default)."""
        self.behaviours[args] = behaviour

    def end(self, container: str, exit_code: int, *, oom: bool = False) -> None:
        """The container's process ends now (as the kernel or the workload would do it)."""
        c = self.containers[container]
        c.status, c.exit_code = "exited", exit_code
        unit = self._unit_of(container)
        if unit is None:
            return
        memory_max = unit.properties.get("MemoryMax", 0)
        self.saved[unit.name] = {
            "memory.oom_control": f"oom_kill_disable 0\nunder_oom 0\noom_kill {int(oom)}\n",
            "memory.max_usage_in_bytes": str(memory_max if oom else 8 << 20),
        }
        unit.main_code, unit.main_status = CLD_EXITED, exit_code
        if exit_code in (0, 143):
            unit.active_state, unit.sub_state = "active", "exited"
        else:
            unit.active_state, unit.sub_state, unit.result = "failed", "failed", "exit-code"

    def leftovers(self) -> dict[str, list[str]]:
        """Everything a replica can leave behind; all lists empty means a clean machine."""
        return {
            "units": sorted(self.units),
            "containers": sorted(self.containers),
            "secrets": sorted(self.secrets),
            "state_dirs": sorted(self.state_dirs),
        }

    # ---- Machine ------------------------------------------------------------------------

    async def image_present(self, image: str) -> bool:
        await trio.lowlevel.checkpoint()
        return image in self.images

    def _remote(self, image: str, auth: bytes | None) -> RemoteImage:
        if image not in self.pullable:
            raise RegistryError("not-found", f"{image}: not found in its registry")
        want = self.pull_credentials.get(image)
        if want is not None and want != auth:
            raise RegistryError("unauthorized", f"{image}: the registry refused access")
        return RemoteImage("sha256:" + "0" * 64, self.pull_size_bytes, 2)

    async def remote_image(self, image: str, auth: bytes | None = None) -> RemoteImage:
        await trio.lowlevel.checkpoint()
        return self._remote(image, auth)

    async def pull_image(
        self,
        image: str,
        *,
        auth: bytes | None = None,
        scratch: str = "",
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.pulls.append((image, auth))
        try:
            remote = self._remote(image, auth)
        except RegistryError as err:
            raise MachineError(f"podman pull {image}: initializing source: {err}") from err
        for i in range(remote.layers):
            if on_line is not None:
                on_line(f"Copying blob sha256:{i:064x}")
            await trio.sleep(self.pull_delay_s / remote.layers)
        self.images.add(image)

    async def create_secret(self, name: str, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        if name in self.secrets:
            raise MachineError(f"secret name in use: {name}")
        self.secrets[name] = data

    async def remove_secret(self, name: str) -> None:
        self.secrets.pop(name, None)

    async def list_secrets(self, prefix: str) -> list[str]:
        return sorted(n for n in self.secrets if n.startswith(prefix))

    async def inspect_container(self, name: str) -> ContainerSnapshot | None:
        await trio.lowlevel.checkpoint()
        c = self.containers.get(name)
        return None if c is None else ContainerSnapshot(c.status, c.exit_code, False, c.health)

    async def remove_container(self, name: str) -> None:
        self.containers.pop(name, None)

    async def prepare_user_namespaces(self, image: str, size: int, count: int) -> None:
        await trio.lowlevel.checkpoint()
        if image not in self.images:
            raise MachineError(f"podman create: {image}: image not known")
        self.warmed.append((image, size, count))

    async def list_containers(self, label: str) -> list[str]:
        return sorted(n for n, c in self.containers.items() if label in c.labels)

    async def prepare_state_dir(self, unit: str, *, keep: bool = False) -> None:
        self.state_dirs.add(unit)
        if not keep:
            self.saved.pop(unit, None)

    async def read_saved_counters(self, unit: str) -> dict[str, str]:
        return dict(self.saved.get(unit, {}))

    async def remove_state_dir(self, unit: str) -> None:
        self.state_dirs.discard(unit)
        self.saved.pop(unit, None)

    async def list_state_dirs(self) -> list[str]:
        return sorted(self.state_dirs)

    async def ensure_slice(self, config: RuntimeConfig) -> frozenset[str]:
        await trio.lowlevel.checkpoint()
        admin = frozenset(self.admin_slice_keys)
        self.slice_properties = slice_properties(config, admin)
        return admin

    async def image_store_bytes(self) -> int:
        await trio.lowlevel.checkpoint()
        return sum(self.image_sizes.get(i, 0) for i in self.images)

    async def prune_images(self) -> None:
        await trio.lowlevel.checkpoint()
        used = {c.image for c in self.containers.values()}
        self.images = {i for i in self.images if i in used}
        self.prunes += 1

    async def apply_network_rules(self, config: RuntimeConfig) -> None:
        await trio.lowlevel.checkpoint()
        self.network_grant = config.network_grant
        self.network_applies += 1
        if self.network_rules_fail:
            raise MachineError("nft -f exited 1: Operation not permitted")

    async def start_unit(self, unit: str, properties: dict[str, object]) -> None:
        await trio.lowlevel.checkpoint()
        if unit in self.units:
            raise MachineError(f"Unit {unit} was already loaded or has a fragment file.")
        fake = FakeUnit(unit, dict(properties))
        self.units[unit] = fake
        self.started += 1
        argv = _exec_argv(properties)
        name, image, args, labels, secrets = _parse_podman_run(argv)
        if image not in self.images:
            fake.active_state, fake.sub_state, fake.result = "failed", "failed", "exit-code"
            fake.main_code, fake.main_status = CLD_EXITED, 125
            return
        missing = [s for s in secrets if s not in self.secrets]
        if missing:
            fake.active_state, fake.sub_state, fake.result = "failed", "failed", "exit-code"
            fake.main_code, fake.main_status = CLD_EXITED, 125
            return
        self.containers[name] = FakeContainer(
            name, image, args, labels, {s: self.secrets[s] for s in secrets}
        )
        # ExecStartPost: the workload's own CPU quota, before the unit is "active".
        for _path, post, _flags in properties.get("ExecStartPostEx", []):  # type: ignore[attr-defined]
            if self.start_post_fails:
                # systemd SIGTERMs the unit (no ExecStop: it never was active), the
                # container is left exited (143), the unit stays failed (as seen on a host).
                c = self.containers[name]
                c.status, c.exit_code = "exited", 143
                fake.active_state, fake.sub_state, fake.result = "failed", "failed", "exit-code"
                fake.main_code, fake.main_status = CLD_EXITED, 143
                fake.start_post_failed = True
                return
            quota = post[-1].removeprefix("CPUQuota=").removesuffix("%")
            whole, _, tenth = quota.partition(".")
            fake.properties["CPUQuotaPerSecUSec"] = (int(whole) * 10 + int(tenth or 0)) * 1000

    async def wait_started(self, unit: str, timeout_s: float) -> None:
        await trio.lowlevel.checkpoint()  # a fake unit settles as its snapshot is taken

    async def unit_snapshot(self, unit: str) -> UnitSnapshot:
        await trio.lowlevel.checkpoint()
        u = self.units.get(unit)
        if u is None:
            return UnitSnapshot(unit)
        self._advance(u)
        return UnitSnapshot(
            unit,
            "loaded",
            u.active_state,
            u.sub_state,
            u.result,
            u.main_code,
            u.main_status,
            1 if u.sub_state == "running" else 0,
            u.environment,
            start_post_failed=u.start_post_failed,
        )

    async def list_units(self, pattern: str) -> list[str]:
        return sorted(n for n in self.units if fnmatch.fnmatchcase(n, pattern))

    async def stop_unit(self, unit: str) -> None:
        await trio.lowlevel.checkpoint()
        u = self.units.get(unit)
        if u is None:
            return
        container = _container_of(u)
        if u.active_state in ("active", "activating") and container in self.containers:
            c = self.containers.pop(container)  # ExecStop: podman rm -f -i
            if c.status == "running":
                self.saved[unit] = {"memory.oom_control": "oom_kill 0\n"}
        if u.active_state == "failed":
            return  # a failed unit stays failed until reset
        del self.units[unit]

    async def reset_failed(self, unit: str) -> None:
        u = self.units.get(unit)
        if u is not None and u.active_state == "failed":
            del self.units[unit]

    async def sample_usage(self, unit: str) -> ReplicaUsage:
        u = self.units.get(unit)
        if u is None:
            return ReplicaUsage()
        c = self.containers.get(_container_of(u))
        looks = c.looks if c else 0
        return ReplicaUsage(cpu_ms=looks * self.cpu_ms_per_look, peak_memory_bytes=8 << 20)

    async def cpu_quota_usec(self, unit: str) -> int | None:
        await trio.lowlevel.checkpoint()
        u = self.units.get(unit)
        return None if u is None else int(u.properties.get("CPUQuotaPerSecUSec", INFINITY))  # type: ignore[call-overload]

    async def set_cpu_quota_usec(self, unit: str, usec: int) -> None:
        await trio.lowlevel.checkpoint()
        if self.set_quota_fails:
            raise MachineError(f"systemd: Access denied (SetUnitProperties {unit})")
        u = self.units.get(unit)
        if u is None:
            raise MachineError(f"Unit {unit} not loaded.")
        u.properties["CPUQuotaPerSecUSec"] = usec

    # ---- internals ----------------------------------------------------------------------

    def _unit_of(self, container: str) -> FakeUnit | None:
        for u in self.units.values():
            if _container_of(u) == container:
                return u
        return None

    def _advance(self, unit: FakeUnit) -> None:
        c = self.containers.get(_container_of(unit))
        if c is None or c.status != "running" or unit.sub_state != "running":
            return
        c.looks += 1
        behaviour = self.behaviours.get(c.args, "run")
        if len(c.args) == 3 and c.args[:2] == ("sh", "-c") and (m := _EXIT_RE.match(c.args[2])):
            behaviour = f"exit:{m.group(1)}"
        if c.looks < 2:
            return  # it was seen running once before it ends
        if behaviour == "oom":
            self.end(c.name, 137, oom=True)
        elif behaviour.startswith("exit:"):
            self.end(c.name, int(behaviour.split(":", 1)[1]))


def _exec_argv(properties: dict[str, object]) -> list[str]:
    exec_start = properties["ExecStart"]
    assert isinstance(exec_start, list)
    return list(exec_start[0][1])


def _container_of(unit: FakeUnit) -> str:
    for entry in unit.environment:
        if entry.startswith("MESHLET_CONTAINER="):
            return entry.partition("=")[2]
    return ""


# podman run options that take a value (as our builder emits them).
_VALUE_OPTS = {"--name", "--label", "--env", "--secret", "--stop-timeout"}


def _parse_podman_run(
    argv: list[str],
) -> tuple[str, str, tuple[str, ...], dict[str, str], list[str]]:
    """Read back what `podman run` would: name, image, args, labels and secrets."""
    i = 2  # podman run
    name, labels, secrets = "", {}, []
    while i < len(argv) and argv[i].startswith("-"):
        opt = argv[i]
        if opt in _VALUE_OPTS:
            value = argv[i + 1]
            if opt == "--name":
                name = value
            elif opt == "--label":
                k, _, v = value.partition("=")
                labels[k] = v
            elif opt == "--secret":
                secrets.append(value.split(",", 1)[0])
            i += 2
        else:
            i += 1
    return name, argv[i], tuple(argv[i + 1 :]), labels, secrets


def fake_runtime(
    machine: FakeMachine | None = None, config: RuntimeConfig | None = None
) -> ReplicaRuntime:
    """A `ReplicaRuntime` on a `FakeMachine` (a fresh one unless given)."""
    return ReplicaRuntime(machine or FakeMachine(), config or RuntimeConfig(poll_interval_s=0.05))


__all__ = ["LABEL", "FakeContainer", "FakeMachine", "FakeUnit", "fake_runtime"]
