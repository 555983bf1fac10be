"""Pure reading of what systemd and podman say about a replica: its phase and how it ended.

The adapter gathers snapshots (unit properties, the container's state, the memory counters
the unit saved when it stopped); these functions decide which event that is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meshletd.runtime.events import (
    EndEvent,
    ReplicaExited,
    ReplicaFailed,
    ReplicaOomKilled,
    ReplicaStopped,
    ReplicaUsage,
)
from meshletd.runtime.spec import ReplicaId, UnitStartFailed

# waitid() si_code values systemd reports as ExecMainCode.
CLD_EXITED = 1
CLD_KILLED = 2
CLD_DUMPED = 3

Phase = Literal["gone", "starting", "running", "stopping", "ended"]


@dataclass(frozen=True)
class UnitSnapshot:
    """The unit properties the runtime reads (strings as systemd spells them)."""

    name: str
    load_state: str = "not-found"
    active_state: str = "inactive"
    sub_state: str = "dead"
    result: str = "success"
    main_code: int = 0
    main_status: int = 0
    main_pid: int = 0
    environment: tuple[str, ...] = ()
    job_pending: bool = False
    # The unit's ExecStartPost (setting the workload's CPU quota) ran and failed.
    start_post_failed: bool = False


@dataclass(frozen=True)
class ContainerSnapshot:
    """`podman inspect` of the replica's container (None when there is no container)."""

    status: str
    exit_code: int
    oom_killed: bool = False
    health: str = ""  # its health check's verdict: starting|healthy|unhealthy ("" none)


def unit_phase(unit: UnitSnapshot) -> Phase:
    """Where a unit is in its life, from the runtime's point of view."""
    if unit.job_pending and unit.active_state in ("inactive", "failed"):
        return "starting"  # StartTransientUnit returned; its start job has not run yet
    if unit.load_state in ("not-found", "") or (
        unit.active_state == "inactive" and unit.sub_state == "dead" and unit.main_code == 0
    ):
        return "gone"
    if unit.active_state == "activating":
        return "starting"
    if unit.active_state in ("active", "reloading") and unit.sub_state != "exited":
        return "running"
    if unit.active_state == "deactivating":
        return "stopping"
    return "ended"


def oom_killed_from_counters(files: dict[str, str]) -> bool:
    """Whether saved memory cgroup files record an OOM kill (v1 oom_control, v2 events)."""
    for name in ("memory.oom_control", "memory.events"):
        for line in files.get(name, "").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit() and int(value) > 0:
                return True
    return False


def peak_memory_from_counters(files: dict[str, str]) -> int:
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        text = files.get(name, "").strip()
        if text.isdigit():
            return int(text)
    return 0


def end_event(
    replica: ReplicaId,
    unit: UnitSnapshot,
    container: ContainerSnapshot | None,
    *,
    ran: bool,
    stop_requested: bool,
    oom_counted: bool,
    usage: ReplicaUsage,
) -> EndEvent:
    """How a replica that is no longer running ended.

    `ran`: it reached "running" (a unit that fails before that never ran its workload).
    `oom_counted`: the saved cgroup counters show an OOM kill.
    """
    name = unit.name
    if stop_requested:
        return ReplicaStopped(replica, name, usage)
    if unit.result == "oom-kill" or oom_counted or (container and container.oom_killed):
        return ReplicaOomKilled(replica, name, usage)
    if not ran and unit.start_post_failed:
        return ReplicaFailed(
            replica,
            name,
            UnitStartFailed.name,
            "the workload's CPU quota could not be set (the unit's ExecStartPost, systemctl "
            f"set-property, failed), so systemd stopped it; see journalctl -u {name}",
            usage,
        )
    if not ran:
        why = f"unit result {unit.result!r}"
        if unit.main_code == CLD_EXITED:
            why += f", podman exited with status {unit.main_status}"
        return ReplicaFailed(
            replica,
            name,
            UnitStartFailed.name,
            f"the container did not start ({why}); see journalctl -u {name}",
            usage,
        )
    if container is not None and container.status in ("exited", "stopped"):
        return ReplicaExited(replica, name, container.exit_code, usage)
    if unit.main_code == CLD_EXITED:
        return ReplicaExited(replica, name, unit.main_status, usage)
    if unit.main_code in (CLD_KILLED, CLD_DUMPED):
        return ReplicaExited(replica, name, 128 + unit.main_status, usage)
    return ReplicaFailed(
        replica,
        name,
        UnitStartFailed.name,
        f"the unit ended with result {unit.result!r} and no exit status; see journalctl -u {name}",
        usage,
    )
