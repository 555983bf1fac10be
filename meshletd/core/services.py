"""What a workload serves, as the core judges it (docs/protocol.md, section 22): ports a host
publishes only with its policy's consent, the endpoint each replica gets, when a replica is
ready, and when a replica that keeps failing is handed to another meshlet.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from .records import Endpoint, HostPolicy, Workload, WorkloadStatus

PORTS = "ports"
"""The reason word of a host that cannot publish a workload's ports (eligibility)."""

MAX_TRIES = 3
"""Failed tries (a start that fails, a crash, an unhealthy kill) after which a replica's
host hands its slot to another meshlet (make-before-break)."""

STABLE_MS = 300_000
"""A replica that has run this long since its last start has succeeded: its failed tries
are forgotten."""


@dataclass(frozen=True, slots=True)
class Inbound:
    """A host policy's `inbound`: whether the meshlet publishes workload ports, from which
    range of host ports, on which address (commune.scheduler.hostPolicy)."""

    allowed: bool = False
    port_min: int | None = None
    port_max: int | None = None
    address: str | None = None

    @property
    def size(self) -> int:
        """How many ports this host may publish in all (0: none)."""
        if not self.allowed or not self.address:
            return 0
        if self.port_min is None or self.port_max is None:
            return 0
        return max(self.port_max - self.port_min + 1, 0)


NO_INBOUND = Inbound()
"""A host without a policy, or whose policy does not allow inbound publishing."""


def inbound_of(policy: HostPolicy) -> Inbound:
    """The `inbound` of a host policy record."""
    if not policy.inbound_allowed:
        return NO_INBOUND
    return Inbound(True, policy.port_min, policy.port_max, policy.inbound_address)


def inbound_refusal(inbound: Inbound, wl: Workload) -> str | None:
    """Why a host with this `inbound` policy is not eligible for `wl` (PORTS), or None: a
    workload that declares ports needs a host that allows publishing with at least as many
    ports in its range. Judged on the record alone, so every observer agrees; whether the
    range still has that many free is the host's own judgement when it bids (section 22)."""
    if wl.ports and inbound.size < len(wl.ports):
        return PORTS
    return None


def choose_endpoints(
    wl: Workload, inbound: Inbound, used: Collection[int]
) -> tuple[Endpoint, ...] | None:
    """The endpoints of a new replica of `wl` on a host with this `inbound` policy: each
    declared port gets the lowest host port of the range not in `used` (the ports the host's
    other replicas hold), in declaration order. None when the range has too few left."""
    if not wl.ports:
        return ()
    if inbound.size < len(wl.ports) or inbound.port_min is None or inbound.port_max is None:
        return None
    taken = set(used)
    out: list[Endpoint] = []
    port = inbound.port_min
    for spec in wl.ports:
        while port <= inbound.port_max and port in taken:
            port += 1
        if port > inbound.port_max:
            return None
        out.append(Endpoint(spec.name, inbound.address or "", port, spec.protocol))
        taken.add(port)
    return tuple(out)


def replica_ready(st: WorkloadStatus, wl: Workload) -> bool:
    """Whether the replica a status describes serves: healthy when its workload declares a
    health check, running otherwise."""
    if wl.health_command:
        return st.state == "running" and st.health == "healthy"
    return st.state == "running"


__all__ = [
    "MAX_TRIES",
    "NO_INBOUND",
    "PORTS",
    "STABLE_MS",
    "Inbound",
    "choose_endpoints",
    "inbound_of",
    "inbound_refusal",
    "replica_ready",
]
