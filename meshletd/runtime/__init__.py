"""The runtime: workload replicas as rootless podman containers in transient systemd units.

Public face (see docs/runtime.md):

- `ReplicaSpec`, `ReplicaId`, `Resources`, `Secret`: what to run;
- `Runtime` (Protocol) and `ReplicaRuntime`, its one implementation, over a `Machine`;
- `systemd_runtime(config)` for the real machine, `fake_runtime()` for tests/simulation;
- events: `ReplicaStarting`, `ReplicaRunning`, `ReplicaExited`, `ReplicaOomKilled`,
  `ReplicaFailed`, `ReplicaStopped`, with `ReplicaUsage` (CPU ms, peak memory bytes).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from meshletd.runtime.events import (
    EndEvent,
    ReplicaExited,
    ReplicaFailed,
    ReplicaHealth,
    ReplicaOomKilled,
    ReplicaPulling,
    ReplicaRunning,
    ReplicaStarting,
    ReplicaStatus,
    ReplicaStopped,
    ReplicaUsage,
    RuntimeEvent,
)
from meshletd.runtime.fake import FakeMachine, fake_runtime
from meshletd.runtime.machine import Machine, MachineError
from meshletd.runtime.naming import unit_name
from meshletd.runtime.protocol import Runtime
from meshletd.runtime.runtime import ReplicaRuntime
from meshletd.runtime.spec import (
    HealthCheck,
    ImageNotFound,
    InvalidReplicaSpec,
    PortBinding,
    ReplicaId,
    ReplicaSpec,
    Resources,
    Secret,
    UnitStartFailed,
)
from meshletd.runtime.units import RuntimeConfig

if TYPE_CHECKING:
    from meshletd.config import Contribution, Images, Isolation
    from meshletd.runtime.network import NetworkGrant


def contribution_runtime_config(
    contribution: Contribution,
    images: Images | None = None,
    *,
    isolation: Isolation | None = None,
    network_grant: NetworkGrant = "internet",
) -> RuntimeConfig:
    """The runtime config whose slice carries `[contribution]`'s caps, whose pulls
    `[images]`' bounds and whose replicas are kept apart as `[isolation]` says
    (meshlet.toml), under the host policy's network grant."""
    config = RuntimeConfig(
        slice_milli_cpu=contribution.milli_cpu,
        slice_memory_mib=contribution.memory_mib,
        slice_tasks_max=contribution.tasks_max,
        image_store_max_mib=contribution.storage_mib or None,
        network_grant=network_grant,
    )
    if images is not None:
        config = replace(
            config,
            pull_timeout_s=images.pull_timeout_s,
            pull_max_bytes=images.pull_max_mib << 20,
        )
    if isolation is not None:
        config = replace(
            config,
            userns_size=isolation.userns_size,
            userns_warm=isolation.userns_warm,
            network_rules=isolation.network_rules,
        )
    return config


def systemd_runtime(config: RuntimeConfig | None = None) -> ReplicaRuntime:
    """A runtime on this machine's systemd and podman (needs a booted systemd and root)."""
    from meshletd.runtime.systemd import SystemdPodmanMachine

    machine = SystemdPodmanMachine.for_user(config or RuntimeConfig())
    return ReplicaRuntime(machine, machine.config)


__all__ = [
    "EndEvent",
    "FakeMachine",
    "HealthCheck",
    "ImageNotFound",
    "InvalidReplicaSpec",
    "Machine",
    "MachineError",
    "PortBinding",
    "ReplicaExited",
    "ReplicaFailed",
    "ReplicaHealth",
    "ReplicaId",
    "ReplicaOomKilled",
    "ReplicaPulling",
    "ReplicaRunning",
    "ReplicaRuntime",
    "ReplicaSpec",
    "ReplicaStarting",
    "ReplicaStatus",
    "ReplicaStopped",
    "ReplicaUsage",
    "Resources",
    "Runtime",
    "RuntimeConfig",
    "RuntimeEvent",
    "Secret",
    "UnitStartFailed",
    "contribution_runtime_config",
    "fake_runtime",
    "systemd_runtime",
    "unit_name",
]
