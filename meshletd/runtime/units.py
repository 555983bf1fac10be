"""Pure builders: the podman argv and the transient unit's properties for a replica.

Nothing here touches the machine; the adapter sends what these return. The conventions
follow quadlet's generated units, with the facts measured on our hosts (docs/runtime.md):

- `Type=notify` + `podman run -d --sdnotify=conmon`: the unit is "active" exactly when the
  container runs, and conmon (re-parented to systemd) becomes the main process, so its exit
  status is the container's;
- `Delegate=yes`: without it rootless podman moves itself out of the unit (limits and
  `journalctl -u` lost); `--cgroups=split` on cgroup v2 only;
- `KillMode=mixed`, `--init` (catatonit as PID 1 so SIGTERM is handled), `ExecStop=podman
  rm -f -i`, `SuccessExitStatus=143` (SIGTERM is how a stop ends);
- `--log-driver=passthrough`: the container's stdout/stderr *are* the unit's, so each line
  is in `journalctl -u <unit>` once, tagged with the container name;
- `RemainAfterExit=yes`: an ended replica keeps its unit (active/exited or failed) until the
  runtime has reported it, so an exit that happens while meshletd is down is not lost;
- `ExecStopPost` copies the memory cgroup's counters into the replica's state dir before
  the cgroup goes away: on cgroup v1 an OOM kill is only visible there (`oom_kill N`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from meshletd.runtime.naming import secret_name
from meshletd.runtime.network import NetworkGrant
from meshletd.runtime.spec import PortBinding, ReplicaId, ReplicaSpec

# Environment entries that carry a replica's identity in its unit (read back on adoption).
ENV_OWNER = "MESHLET_OWNER_DID"
ENV_WORKLOAD = "MESHLET_WORKLOAD"
ENV_INDEX = "MESHLET_REPLICA"
ENV_REVISION = "MESHLET_REVISION"
ENV_CONTAINER = "MESHLET_CONTAINER"
ENV_LANE = "MESHLET_LANE"  # 1 for a slot's second replica during an update; absent: 0
ENV_MILLI_CPU = "MESHLET_MILLI_CPU"  # the workload's CPU limit, checked again on adoption
# Where its ports are published ("name=address:port/proto" joined by ","), and whether it
# has a health check ("1"): read back on adoption.
ENV_ENDPOINTS = "MESHLET_ENDPOINTS"
ENV_HEALTH = "MESHLET_HEALTH_CHECK"

INFINITY = (1 << 64) - 1  # systemd's "no limit" for usec and byte properties
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LABEL = "io.meshlet.replica"
# Containers meshletd creates (never starts) and removes at once, only so that storage
# makes its copy of an image for the next user-namespace ranges (runtime.py, warm).
WARM_LABEL = "io.meshlet.warm"

# Files saved from the unit's memory cgroup when it stops (v1 names, then v2 names).
MEMORY_FILES_V1 = ("memory.oom_control", "memory.max_usage_in_bytes")
MEMORY_FILES_V2 = ("memory.events", "memory.peak")


@dataclass(frozen=True)
class RuntimeConfig:
    """How the runtime runs replicas on this machine.

    `manager`: "system" runs each replica as a system unit with `User=` (works on our v1
    hosts; podman calls it unsupported), "user" as a unit of the user's own manager
    (`user@UID.service`, podman's supported home; `journalctl --user-unit`). On cgroup v1 a
    user manager has no memory/cpu/pids controllers, so its limits only hold on v2.

    `slice_milli_cpu`/`slice_memory_mib`/`slice_tasks_max` cap what all replicas together may
    take (None: no cap), unless an administrator's drop-in for the slice sets that limit
    (`slice_properties`). Each replica's unit gets its workload's memory and tasks *plus* an
    overhead for conmon, slirp4netns and podman itself while it starts (measured: podman run
    peaks near 40 MiB and 30 threads), so a workload asking 16 MiB can still be started.
    """

    manager: Literal["system", "user"] = "system"
    user: str = "meshlet"
    uid: int = 1000
    gid: int = 1000
    home: str = "/home/meshlet"
    podman: str = "/usr/bin/podman"
    copy: str = "/bin/cp"
    systemctl: str = "/bin/systemctl"
    slice: str = "meshlet.slice"
    slice_milli_cpu: int | None = None
    slice_memory_mib: int | None = None
    slice_tasks_max: int | None = None
    # The slice's CPU weight against the host's own slices (systemd's default is 100; on
    # cgroup v1 systemd turns it into cpu.shares): replicas get what the host leaves.
    slice_cpu_weight: int = 20
    memory_overhead_mib: int = 64
    tasks_overhead: int = 64
    # The CPU quota a replica's unit starts with, before its own limit is set: podman run,
    # conmon and slirp4netns start inside the unit, and at a workload's 10 % they took
    # ~0.9 s instead of ~0.2 s (docs/runtime.md, "CPU quota: full speed to start").
    launch_milli_cpu: int = 2000
    # A workload of at least this much CPU starts under its own quota, with no launch step
    # (no `systemctl` in ExecStartPost): podman's start needs about one CPU, so a quota of
    # one CPU or more does not slow it (docs/runtime.md, "CPU quota").
    launch_full_milli_cpu: int = 1000
    # Each replica in a user namespace of its own (`--userns=auto:size=N`): container ids
    # 0..N-1 on subordinate ids no other replica holds (0: all replicas share the meshlet
    # user's one mapping, the old way). The meshlet user needs N x (replicas at once) + 1
    # subordinate ids (the package gives 64 x 65536).
    userns_size: int = 65536
    # After each start, storage's chowned copy of the replica's image is made ready for
    # this many user-namespace ranges beyond those in use, in the background (0: never):
    # with native overlay and no idmapped mounts for rootless, a replica whose range has no
    # copy yet waits for one (0.1 s for busybox, 0.7-1.1 s for 214 MB; docs/runtime.md).
    userns_warm: int = 2
    # What the host lends the network (the host policy's `network` grant) and whether
    # meshlet's nftables rules enforce it (`network_rules`, docs/runtime.md "The network").
    network_grant: NetworkGrant = "internet"
    network_rules: bool = True
    nft: str = "/usr/sbin/nft"
    # The rules are loaded again this often (an administrator's `nft flush ruleset` or a
    # restart of nftables.service removes them; replicas keep running meanwhile).
    network_rules_refresh_s: float = 30.0
    # The image store's cap ([contribution] storage_mib): past it, every image no container
    # uses is removed (looked at every `storage_check_s`). None: never pruned.
    image_store_max_mib: int | None = None
    storage_check_s: float = 300.0
    # Not under /run/meshlet: that is meshletd.service's RuntimeDirectory, removed when the
    # daemon stops, while replicas (and their ExecStopPost) outlive the daemon.
    state_dir: str = "/run/meshlet-replicas"
    cgroup_root: str = "/sys/fs/cgroup"
    cgroup_v2: bool = False
    poll_interval_s: float = 1.0
    start_timeout_s: int = 120
    # Pull bounds (docs/runtime.md, "Images"): how long a pull may take, and how big an
    # image (config + layers as its manifest declares them, compressed) may be.
    pull_timeout_s: int = 900
    pull_max_bytes: int = 10 << 30

    @property
    def network_rules_file(self) -> str:
        """Where meshletd leaves the network rules it loads (and an administrator can read)."""
        return f"{self.state_dir}/network.nft"

    @property
    def runtime_dir(self) -> str:
        return f"/run/user/{self.uid}"

    def user_env(self) -> dict[str, str]:
        """The environment rootless podman needs when run as the replica user."""
        return {
            "HOME": self.home,
            "XDG_RUNTIME_DIR": self.runtime_dir,
            "DBUS_SESSION_BUS_ADDRESS": f"unix:path={self.runtime_dir}/bus",
            "PATH": PATH,
            "LANG": "C.UTF-8",
        }


def memory_max_bytes(spec: ReplicaSpec, config: RuntimeConfig) -> int:
    return (spec.resources.memory_mib + config.memory_overhead_mib) * 1024 * 1024


def tasks_max(spec: ReplicaSpec, config: RuntimeConfig) -> int:
    return spec.resources.tasks + config.tasks_overhead


def cpu_quota_per_sec_usec(milli_cpu: int) -> int:
    """systemd's CPUQuotaPerSecUSec for a milli-CPU figure (1000 = one full CPU)."""
    return milli_cpu * 1000


def cpu_quota_percent(milli_cpu: int) -> str:
    """`CPUQuota=` as a unit file spells it, exactly: 105 milli-CPU is "10.5%"."""
    return f"{milli_cpu // 10}.{milli_cpu % 10}%"


def needs_launch_step(spec: ReplicaSpec, config: RuntimeConfig) -> bool:
    """Whether the unit starts at the launch quota and sets the workload's once running."""
    return spec.resources.milli_cpu < min(config.launch_full_milli_cpu, config.launch_milli_cpu)


def launch_cpu_quota_usec(spec: ReplicaSpec, config: RuntimeConfig) -> int:
    """The quota the unit starts with: the launch quota for a small workload, else its own.

    The launch quota is at most the slice's (the contribution): on cgroup v1 the kernel
    refuses a child's quota above its parent's (EINVAL, logged by systemd at every start),
    and above it the launch quota could not be used anyway.
    """
    if not needs_launch_step(spec, config):
        return cpu_quota_per_sec_usec(spec.resources.milli_cpu)
    launch = config.launch_milli_cpu
    if config.slice_milli_cpu is not None:
        launch = max(spec.resources.milli_cpu, min(launch, config.slice_milli_cpu))
    return cpu_quota_per_sec_usec(launch)


def set_cpu_quota_argv(config: RuntimeConfig, unit: str, milli_cpu: int) -> list[str]:
    """The unit's `ExecStartPost=+`: set the workload's own CPU quota once it is ready.

    `--runtime`: a transient unit's drop-in lives beside it in /run/systemd/transient and
    goes with it.
    """
    scope = ["--user"] if config.manager == "user" else []
    return [
        config.systemctl,
        *scope,
        "set-property",
        "--runtime",
        "--",
        unit,
        f"CPUQuota={cpu_quota_percent(milli_cpu)}",
    ]


def podman_run_argv(spec: ReplicaSpec, config: RuntimeConfig, container: str) -> list[str]:
    """The `podman run` command line for a replica: a list, never a shell string."""
    argv = [
        config.podman,
        "run",
        "-d",
        "--name",
        container,
        "--replace",
        "--init",
        "--sdnotify=conmon",
        "--log-driver=passthrough",
        "--pull=never",
        "--cap-drop=all",
        "--security-opt=no-new-privileges",
        f"--network={replica_network(spec, config)}",
        "--label",
        f"{LABEL}={spec.replica}",
        "--stop-timeout",
        str(spec.stop_timeout_s),
    ]
    if config.cgroup_v2:
        argv.append("--cgroups=split")
    if config.userns_size:
        argv.append(f"--userns=auto:size={config.userns_size}")
    if not spec.writable_root:
        argv.append("--read-only")
    argv += publish_argv(spec)
    argv += health_argv(spec)
    for name, value in spec.env:
        argv += ["--env", f"{name}={value}"]
    for secret in spec.secrets:
        stored = secret_name(container, secret.name)
        if secret.env is not None:
            argv += ["--secret", f"{stored},type=env,target={secret.env}"]
        else:
            argv += ["--secret", f"{stored},type=mount,target={secret.name}"]
    argv.append(spec.image)
    # "--" is not needed: podman stops reading options at the image, so args are the
    # container's own, whatever they look like.
    argv += list(spec.args)
    return argv


def publish_argv(spec: ReplicaSpec) -> list[str]:
    """`--publish` for each declared port, on the address and host port the core chose."""
    out = []
    for p in spec.ports:
        host = f"[{p.address}]" if ":" in p.address else p.address
        out.append(f"--publish={host}:{p.host_port}:{p.container_port}/{p.protocol}")
    return out


def health_argv(spec: ReplicaSpec) -> list[str]:
    """podman's health check options: the command in exec form (a JSON array, never a
    shell), run by the transient systemd timer podman creates in the replica user's
    manager; `--health-on-failure=kill` ends the container once it turns unhealthy, so the
    unit exits and the core restarts (or hands off) the replica (docs/runtime.md)."""
    h = spec.health
    if h is None:
        return []
    return [
        # podman 4.3 reads a JSON array as exec form and prefixes "CMD" itself (given
        # "CMD" first it takes the array as one string); a first word it would read as a
        # keyword (CMD, CMD-SHELL, NONE) is refused by the validity rule (section 22).
        f"--health-cmd={json.dumps(list(h.command))}",
        f"--health-interval={h.interval_s}s",
        f"--health-timeout={h.timeout_s}s",
        f"--health-retries={h.retries}",
        f"--health-start-period={h.start_period_s}s",
        "--health-on-failure=kill",
    ]


def endpoints_env(ports: Sequence[PortBinding]) -> str:
    """The unit's record of where its ports are published (ENV_ENDPOINTS)."""
    return ",".join(f"{p.name}={p.address}:{p.host_port}/{p.protocol}" for p in ports)


def endpoints_from_env(text: str) -> tuple[tuple[str, str, int, str], ...]:
    """(name, address, host port, protocol) of each port a unit says it publishes."""
    out = []
    for item in text.split(","):
        name, sep, rest = item.partition("=")
        where, _, proto = rest.rpartition("/")
        address, _, port = where.rpartition(":")
        if sep and port.isdigit() and address and proto:
            out.append((name, address.strip("[]"), int(port), proto))
    return tuple(out)


def replica_network(spec: ReplicaSpec, config: RuntimeConfig) -> str:
    """podman's network for a replica: none when the workload or the host says so, else
    slirp4netns (no host loopback: podman's default `allow_host_loopback=false`), whose
    traffic meshlet's nftables rules confine to the host's grant."""
    return "none" if spec.network == "none" or config.network_grant == "none" else "slirp4netns"


def load_network_rules_argv(config: RuntimeConfig) -> list[str]:
    """`nft -f` of meshlet's rules file (as root, in a transient unit of meshletd's)."""
    return [config.nft, "-f", config.network_rules_file]


def podman_rm_argv(config: RuntimeConfig, container: str, timeout_s: int) -> list[str]:
    """Stop and remove the container; no error when it is already gone."""
    return [config.podman, "rm", "-f", "-i", "-t", str(timeout_s), container]


def cgroup_path(slice_name: str, unit: str) -> str:
    """The unit's cgroup path below a hierarchy root, as systemd lays slices out.

    `a-b.slice` lives in `a.slice/a-b.slice`; `-.slice` is the root.
    """
    parts: list[str] = []
    if slice_name != "-.slice":
        stem = slice_name.removesuffix(".slice")
        pieces = stem.split("-")
        for i in range(1, len(pieces) + 1):
            parts.append("-".join(pieces[:i]) + ".slice")
    parts.append(unit)
    return "/" + "/".join(parts)


def memory_cgroup_dir(config: RuntimeConfig, unit: str) -> str:
    sub = "" if config.cgroup_v2 else "/memory"
    manager = ""
    if config.manager == "user":
        manager = f"/user.slice/user-{config.uid}.slice/user@{config.uid}.service"
    return f"{config.cgroup_root}{sub}{manager}{cgroup_path(config.slice, unit)}"


def replica_state_dir(config: RuntimeConfig, unit: str) -> str:
    """Where the unit leaves its memory counters when it stops (root:meshlet 0770)."""
    return f"{config.state_dir}/{unit}"


ExecCommand = tuple[str, list[str], bool]


def unit_properties(
    spec: ReplicaSpec, config: RuntimeConfig, unit: str, container: str
) -> dict[str, object]:
    """The transient unit's properties (names as in systemd's D-Bus API)."""
    env = config.user_env()
    env.update(
        {
            ENV_OWNER: spec.replica.owner_did,
            ENV_WORKLOAD: spec.replica.workload,
            ENV_INDEX: str(spec.replica.index),
            **({ENV_LANE: str(spec.replica.lane)} if spec.replica.lane else {}),
            ENV_REVISION: spec.revision or "",
            ENV_CONTAINER: container,
            ENV_MILLI_CPU: str(spec.resources.milli_cpu),
        }
    )
    if spec.ports:
        env[ENV_ENDPOINTS] = endpoints_env(spec.ports)
    if spec.health is not None:
        env[ENV_HEALTH] = "1"
    run = podman_run_argv(spec, config, container)
    limit = set_cpu_quota_argv(config, unit, spec.resources.milli_cpu)
    rm = podman_rm_argv(config, container, spec.stop_timeout_s)
    cg = memory_cgroup_dir(config, unit)
    files = MEMORY_FILES_V2 if config.cgroup_v2 else MEMORY_FILES_V1
    save = [config.copy, "-f", *(f"{cg}/{f}" for f in files), replica_state_dir(config, unit)]
    stop_grace_s = spec.stop_timeout_s + 15
    return {
        "Description": f"meshlet replica {spec.owner_handle}/{spec.replica.workload} "
        f"#{spec.replica.index} ({spec.image})",
        "Slice": config.slice,
        "Type": "notify",
        "NotifyAccess": "all",
        "WorkingDirectory": config.home,
        "Environment": [f"{k}={v}" for k, v in env.items()],
        "ExecStart": [(run[0], run, False)],
        # Runs once conmon said READY and before the unit is "active"; "privileged" (the
        # `+` prefix): as root (or the user manager's own user), not `User=`. If it fails
        # the start fails and systemd stops the container: never active without its limit.
        **(
            {"ExecStartPostEx": [(limit[0], limit, ["privileged"])]}
            if needs_launch_step(spec, config)
            else {}
        ),
        "ExecStop": [(rm[0], rm, True)],
        "ExecStopPost": [(save[0], save, True)],
        "RemainAfterExit": True,
        "SuccessExitStatus": ([143], []),
        "KillMode": "mixed",
        "Delegate": True,
        "CPUAccounting": True,
        "MemoryAccounting": True,
        "TasksAccounting": True,
        "MemoryMax": memory_max_bytes(spec, config),
        # Not the workload's quota yet: podman starts in this cgroup (ExecStartPostEx sets
        # it). Finite, so the cpu controller is there from the start and setting the
        # quota is a write to cpu.cfs_quota_us, not a migration into a new cgroup.
        "CPUQuotaPerSecUSec": launch_cpu_quota_usec(spec, config),
        "TasksMax": tasks_max(spec, config),
        "TimeoutStartUSec": config.start_timeout_s * 1_000_000,
        "TimeoutStopUSec": stop_grace_s * 1_000_000,
        "SyslogIdentifier": container,
        **({"User": config.user, "Group": str(config.gid)} if config.manager == "system" else {}),
        "StandardOutput": "journal",
        "StandardError": "journal",
    }


def podman_call_properties(
    config: RuntimeConfig, args: Sequence[str], timeout_s: int
) -> dict[str, object]:
    """A transient unit that runs one podman command as the replica user, then ends.

    meshletd's own podman calls (image check and pull, secrets, inspect, rm, ps) run here
    rather than as meshletd's children: a child would inherit meshletd.service's sandbox,
    which rootless podman cannot live in (setuid newuidmap, user namespaces, the user's
    home). The adapter adds the stdio pipes (`Standard*FileDescriptor`: data such as a
    secret goes through a pipe, never argv, a property or the journal) and how the unit is
    kept until its exit status has been read.
    """
    argv = [config.podman, *args]
    return {
        "Description": f"meshletd: podman {' '.join(args[:2])}",
        "Type": "exec",
        "ExecStart": [(argv[0], argv, False)],
        "WorkingDirectory": config.home,
        "Environment": [f"{k}={v}" for k, v in config.user_env().items()],
        **({"User": config.user, "Group": str(config.gid)} if config.manager == "system" else {}),
        # A hung podman must not outlive the call that waits for it.
        "RuntimeMaxUSec": timeout_s * 1_000_000,
        # systemd's started/failed lines for every call would drown the journal (a missing
        # image or secret is an expected non-zero exit); meshletd reports real failures
        # with podman's own message. Errors of systemd itself (level err) still show.
        "LogLevelMax": 3,
    }


# The slice limits meshletd sets, by the unit-file key an administrator's drop-in uses.
SLICE_LIMIT_KEYS: dict[str, str] = {
    "CPUQuota": "CPUQuotaPerSecUSec",
    "MemoryMax": "MemoryMax",
    "TasksMax": "TasksMax",
    "CPUWeight": "CPUWeight",
}


def slice_properties(config: RuntimeConfig, admin_keys: Collection[str] = ()) -> dict[str, object]:
    """The slice every replica runs in: the machine's contribution cap.

    Set at run time (not persistent). A limit an administrator's drop-in sets (`admin_keys`:
    unit-file keys such as "MemoryMax", see `dropin_limit_keys`) is left out: the admin's
    value holds, meshletd never overrides it (docs/runtime.md, "The slice").
    """
    props: dict[str, object] = {
        "Description": "meshlet: what this machine contributes to its communes",
        "CPUAccounting": True,
        "MemoryAccounting": True,
        "TasksAccounting": True,
    }
    # No cap is "infinity", set explicitly so that removing a cap from the config lifts it.
    if "CPUQuota" not in admin_keys:
        props["CPUQuotaPerSecUSec"] = (
            INFINITY
            if config.slice_milli_cpu is None
            else cpu_quota_per_sec_usec(config.slice_milli_cpu)
        )
    if "MemoryMax" not in admin_keys:
        props["MemoryMax"] = (
            INFINITY if config.slice_memory_mib is None else config.slice_memory_mib * 1024 * 1024
        )
    if "CPUWeight" not in admin_keys:
        # Lent, not given: under contention the host's own services come first.
        props["CPUWeight"] = config.slice_cpu_weight
    if "TasksMax" not in admin_keys:
        props["TasksMax"] = INFINITY if config.slice_tasks_max is None else config.slice_tasks_max
    return props


def dropin_limit_keys(text: str) -> set[str]:
    """The slice limits (`SLICE_LIMIT_KEYS`) a drop-in file's `[Slice]` section sets.

    An empty assignment (`MemoryMax=`) resets the key to its default: not an admin limit.
    """
    keys: set[str] = set()
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if section == "Slice" and sep and key in SLICE_LIMIT_KEYS:
            if value.strip():
                keys.add(key)
            else:
                keys.discard(key)
    return keys


def is_admin_dropin(path: str) -> bool:
    """A drop-in an administrator wrote, not one systemd keeps for run-time settings."""
    return not any(
        f"/systemd/{d}/" in path for d in ("system.control", "user.control", "transient")
    )


@dataclass(frozen=True)
class UnitIdentity:
    """What a unit says about the replica it runs (from its environment)."""

    replica: ReplicaId
    revision: str
    container: str
    milli_cpu: int | None = None  # None: started by a meshletd that did not record it
    endpoints: tuple[tuple[str, str, int, str], ...] = ()
    health_check: bool = False


def identity_from_environment(entries: Sequence[str] | Mapping[str, str]) -> UnitIdentity | None:
    """Read a replica's identity back from its unit's `Environment=`; None if not ours."""
    if isinstance(entries, Mapping):
        env = dict(entries)
    else:
        env = {}
        for entry in entries:
            key, sep, value = entry.partition("=")
            if sep:
                env[key] = value
    try:
        lane = int(env.get(ENV_LANE, "0"))
        if lane not in (0, 1):
            return None
        replica = ReplicaId(env[ENV_OWNER], env[ENV_WORKLOAD], int(env[ENV_INDEX]), lane)
        ident = UnitIdentity(replica, env.get(ENV_REVISION, ""), env[ENV_CONTAINER])
    except (KeyError, ValueError):
        return None
    milli = env.get(ENV_MILLI_CPU, "")
    if milli.isdigit() and int(milli) > 0:
        ident = replace(ident, milli_cpu=int(milli))
    if env.get(ENV_ENDPOINTS):
        ident = replace(ident, endpoints=endpoints_from_env(env[ENV_ENDPOINTS]))
    if env.get(ENV_HEALTH) == "1":
        ident = replace(ident, health_check=True)
    return ident
