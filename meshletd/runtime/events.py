"""What the runtime reports: one event per state change of a replica, plus its usage.

Every event names the replica and its unit. Times and sizes are integers (ms, bytes) so the
daemon can put them in records unchanged.

Life of a replica, as events::

    ReplicaStarting → ReplicaRunning → (ReplicaExited | ReplicaOomKilled | ReplicaStopped)
                    ↘ ReplicaFailed (never ran: invalid spec, missing image, unit failed)

An adopted replica (found after a restart of meshletd) starts at `ReplicaRunning` with
`adopted=True`, or directly at its end event if it ended while meshletd was away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meshletd.runtime.spec import PortBinding, ReplicaId


@dataclass(frozen=True)
class ReplicaUsage:
    """Resources a replica consumed, for the fair-share ledger (0 when not measurable)."""

    cpu_ms: int = 0
    peak_memory_bytes: int = 0

    def merge(self, other: ReplicaUsage) -> ReplicaUsage:
        """The larger of each figure (both only grow over a replica's life)."""
        return ReplicaUsage(
            max(self.cpu_ms, other.cpu_ms), max(self.peak_memory_bytes, other.peak_memory_bytes)
        )


@dataclass(frozen=True)
class ReplicaStarting:
    replica: ReplicaId
    unit: str


@dataclass(frozen=True)
class ReplicaPulling:
    """The image is being pulled: `layers_done` of `layers` begun, `size_bytes` in all."""

    replica: ReplicaId
    unit: str
    image: str
    layers_done: int
    layers: int
    size_bytes: int

    @property
    def message(self) -> str:
        """What the replica's status says meanwhile."""
        mb = self.size_bytes / 1e6
        return f"pulling {self.image}: layer {self.layers_done} of {self.layers} ({mb:.1f} MB)"


@dataclass(frozen=True)
class ReplicaRunning:
    """The container is running. `pull_ms` is image presence/pull, `start_ms` unit start."""

    replica: ReplicaId
    unit: str
    pull_ms: int = 0
    start_ms: int = 0
    adopted: bool = False
    revision: str = ""


@dataclass(frozen=True)
class ReplicaHealth:
    """The container's health check changed its verdict: starting, healthy, unhealthy."""

    replica: ReplicaId
    unit: str
    health: str


@dataclass(frozen=True)
class ReplicaExited:
    """The container's process ended by itself with `exit_code`."""

    replica: ReplicaId
    unit: str
    exit_code: int
    usage: ReplicaUsage = ReplicaUsage()
    health: str = ""  # "unhealthy": its health check's failure ended it (podman killed it)


@dataclass(frozen=True)
class ReplicaOomKilled:
    """The kernel killed the container for exceeding its memory limit."""

    replica: ReplicaId
    unit: str
    usage: ReplicaUsage = ReplicaUsage()


@dataclass(frozen=True)
class ReplicaFailed:
    """The replica could not run. `error` is a stable error name (see meshletd.errors)."""

    replica: ReplicaId
    unit: str
    error: str
    message: str
    usage: ReplicaUsage = ReplicaUsage()


@dataclass(frozen=True)
class ReplicaStopped:
    """The replica was stopped on request and its container removed."""

    replica: ReplicaId
    unit: str
    usage: ReplicaUsage = ReplicaUsage()


RuntimeEvent = (
    ReplicaStarting
    | ReplicaPulling
    | ReplicaRunning
    | ReplicaHealth
    | ReplicaExited
    | ReplicaOomKilled
    | ReplicaFailed
    | ReplicaStopped
)
EndEvent = ReplicaExited | ReplicaOomKilled | ReplicaFailed | ReplicaStopped

ReplicaState = Literal["starting", "running", "ended"]


@dataclass(frozen=True)
class ReplicaStatus:
    """What the runtime knows about a live replica right now."""

    replica: ReplicaId
    unit: str
    state: ReplicaState
    revision: str = ""
    usage: ReplicaUsage = ReplicaUsage()
    endpoints: tuple[PortBinding, ...] = ()
    health: str = ""  # its health check's last verdict ("" none, or not read yet)
