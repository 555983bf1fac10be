"""Builders shared by the core's unit tests: a commune of meshlets as public records."""

from __future__ import annotations

from meshletd.core import (
    Bid,
    Membership,
    MeshletIdentity,
    MeshletLink,
    MeshletOwner,
    RecordSeen,
    Scheduler,
    Tick,
    Workload,
)
from meshletd.core.records import NSID_MEMBERSHIP, NSID_MESHLET, NSID_MESHLET_OWNER, at_uri

T0 = 1_800_000_000_000
CPU = 4000
MEM = 8192


def mesh(i: int) -> str:
    return f"did:plc:mesh{i:03d}"


def owner(i: int) -> str:
    return f"did:plc:owner{i:03d}"


def cluster_records(n: int, draining: dict[int, int] | None = None) -> list[object]:
    """Linkage both ways and a membership record listing every owner, for n meshlets."""
    members = frozenset(owner(i) for i in range(n))
    draining = draining or {}
    out: list[object] = []
    for i in range(n):
        out.append(MeshletLink(at_uri(owner(i), NSID_MESHLET, "m"), owner(i), mesh(i)))
        state = "draining" if i in draining else "active"
        out.append(
            MeshletOwner(
                at_uri(mesh(i), NSID_MESHLET_OWNER, "self"),
                mesh(i),
                owner(i),
                CPU,
                MEM,
                state=state,
                state_since=draining.get(i, T0 - 1),
            )
        )
        out.append(Membership(at_uri(mesh(i), NSID_MEMBERSHIP, "c"), mesh(i), "c", members))
    return out


def workload(
    name: str = "w1",
    replicas: int = 1,
    *,
    owner_i: int = 0,
    packing: bool = False,
    kind: str = "service",
    created: int = T0,
    window: int = 2000,
    cpu: int = 500,
) -> Workload:
    return Workload(
        uri=at_uri(owner(owner_i), "commune.scheduler.workload", name),
        cid="c1",
        owner=owner(owner_i),
        cluster="c",
        milli_cpu=cpu,
        memory_mib=256,
        replicas=replicas,
        created_at=created,
        kind=kind,
        bid_window_ms=window,
        allow_packing=packing,
    )


def bid(
    wl: Workload,
    i: int,
    *,
    round_: int = 0,
    slot: int = -1,
    priority: int = 0,
    slots: int = 1,
    at: int | None = None,
) -> Bid:
    return Bid(
        uri=at_uri(mesh(i), "commune.scheduler.bid", f"b{round_}_{slot}_{wl.uri[-6:]}"),
        meshlet=mesh(i),
        workload_uri=wl.uri,
        workload_cid=wl.cid,
        round=round_,
        slot=slot,
        priority=priority,
        slots=slots,
        free_milli_cpu=CPU,
        free_memory_mib=MEM,
        created_at=wl.created_at + 100 if at is None else at,
    )


def observer(i: int = 99, n: int = 0) -> Scheduler:
    """A meshlet core (mesh(i)) with its clock at T0."""
    core = Scheduler(MeshletIdentity(mesh(i), owner(i), CPU, MEM))
    core.handle(Tick(T0))
    return core


def feed(core: Scheduler, records: list[object]) -> list[object]:
    out: list[object] = []
    for r in records:
        out.extend(core.handle(RecordSeen(r)))  # type: ignore[arg-type]
    return out
