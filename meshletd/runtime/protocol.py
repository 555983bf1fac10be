"""The runtime as the daemon sees it: a small Protocol, met by `ReplicaRuntime` on either
the real machine (`systemd_runtime()`) or the fake one (`fake_runtime()`)."""

from __future__ import annotations

from typing import Protocol

import trio

from meshletd.runtime.events import (
    EndEvent,
    ReplicaRunning,
    ReplicaStatus,
    ReplicaStopped,
    ReplicaUsage,
    RuntimeEvent,
)
from meshletd.runtime.network import NetworkGrant
from meshletd.runtime.spec import ReplicaId, ReplicaSpec


class Runtime(Protocol):
    # The slice limits an administrator's drop-in sets (meshletd leaves them), after serve().
    admin_slice_keys: frozenset[str]

    @property
    def events(self) -> trio.MemoryReceiveChannel[RuntimeEvent]:
        """Every state change of every replica, in order (unbounded; read it)."""
        ...

    async def serve(
        self, *, task_status: trio.TaskStatus[list[ReplicaStatus]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Set up the slice, adopt existing units (returned via `nursery.start`), then watch
        replicas and emit their events until cancelled. Cancelling leaves replicas running."""
        ...

    async def start(self, spec: ReplicaSpec) -> ReplicaRunning | EndEvent:
        """Start a replica (idempotent); returns `ReplicaRunning` or how it failed."""
        ...

    async def stop(self, replica: ReplicaId) -> ReplicaStopped | None:
        """Stop a replica and remove all it made; None if it was not running."""
        ...

    def replicas(self) -> list[ReplicaStatus]:
        """The replicas currently looked after."""
        ...

    async def usage(self, replica: ReplicaId) -> ReplicaUsage:
        """CPU time and peak memory of a running replica so far."""
        ...

    async def set_network_grant(self, grant: NetworkGrant) -> bool:
        """What replicas may reach (the host policy's `network`); False if the rules could
        not be loaded (said in the log)."""
        ...
