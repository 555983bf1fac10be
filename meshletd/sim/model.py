"""What the simulator simulates: its configuration, one simulated meshlet, and the constants
of the virtual world (time origin, write prices, event kinds).

Hosts without inbound reachability (`Config.nat`, a fraction of the meshlets; 1.0 = every
one): no probe reaches them, so they publish no endpoint and live by their lease record
(docs/protocol.md, section 8), which travels like every other record (delays, losses,
anti-entropy) and costs its write points. Their failovers are reported apart
(`failover_nat_*`): their bound is the lease's, not the probes'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshletd.core import Membership, MeshletLink, MeshletOwner, Scheduler, Timing, Workload

CREATE, UPDATE, DELETE = 3, 2, 1
EPOCH = 1_800_000_000_000  # virtual time 0, in epoch ms
CLUSTER = "commune"
BUCKET_MS = 20

# event kinds
K_TICK, K_DELIVER, K_PROBE, K_RUNTIME, K_FAULT, K_ARRIVE, K_REMOVE, K_AE = range(8)


@dataclass
class Config:
    """What to simulate."""

    meshlets: int = 50
    workloads: int = 200
    seed: int = 1
    faults: str = "none"  # none | chaos
    hours: float = 1.0
    arrivals_per_day: float = 0.0  # extra arrivals after the initial workloads
    lifetime_hours: float = 12.0  # mean lifetime of those extra arrivals
    delete_fraction: float = 0.05  # of the initial workloads, deleted during the run
    cpu_milli: int = 16_000
    memory_mib: int = 32_768
    max_replicas: int | None = None  # per meshlet ([contribution] max_replicas)
    ae_interval_ms: int = 30_000
    timing: Timing = field(default_factory=Timing)
    nat: float = 0.0  # fraction of meshlets nobody can connect to (behind NAT)
    free_riders: float = 0.0  # fraction of owners whose meshlets lend nothing (sim/commons.py)
    min_contribution: str = ""  # MODE:PERMILLE[:DAYS] set by every contributor's host


@dataclass
class Node:
    idx: int
    did: str
    owner: str
    core: Scheduler | None
    skew: int = 0
    latency: int = 30
    alive: bool = True
    cut: bool = False  # partitioned: no traffic in or out
    nat: bool = False  # no inbound reachability: never answers a probe, writes a lease
    last_delivery: int = 0
    missed: list[tuple[str, Any]] = field(default_factory=list)
    wake_at: int | None = None
    running: dict[tuple[str, int], int] = field(default_factory=dict)  # -> job end time or 0
    points: int = 0
    draining_since: int | None = None
    pending_writes: list[Any] = field(default_factory=list)
    disturbed_at: int = -1  # last crash, restart, cut, heal, drain or undrain
    starts: dict[tuple[str, int], int] = field(default_factory=dict)  # StartReplica count
    stopped_start: dict[tuple[str, int], int] = field(default_factory=dict)  # count at stop


def _fields(wl: Workload) -> dict[str, Any]:
    return {f: getattr(wl, f) for f in wl.__slots__}


def _sync_rank(rec: Any) -> int:
    if isinstance(rec, (MeshletLink, MeshletOwner, Membership)):
        return 0
    if isinstance(rec, Workload):
        return 1
    return 2


__all__ = ["BUCKET_MS", "CLUSTER", "CREATE", "DELETE", "EPOCH", "UPDATE", "Config", "Node"]
