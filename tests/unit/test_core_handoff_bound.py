"""The hand-off bound of docs/protocol.md section 22, on three cores that exchange their
records at once: a replica that cannot start anywhere moves at most once per eligible
meshlet, then stays with its last owner, which writes nothing more."""

from __future__ import annotations

import heapq
from dataclasses import replace

from meshletd.core import (
    Bid,
    DeleteRecord,
    ProbePeer,
    ProbeResult,
    PutRecord,
    RecordDeleted,
    RecordSeen,
    ReplicaStateChanged,
    StartReplica,
    StopReplica,
    Tick,
    WorkloadStatus,
)
from meshletd.core.records import HostPolicy

from .core_helpers import T0, cluster_records, mesh, observer, workload

MESHLETS = 3


def test_a_replica_that_fails_everywhere_moves_at_most_once_per_meshlet() -> None:
    cores = [observer(i) for i in range(MESHLETS)]
    wl = replace(workload(owner_i=0), restart_policy="always")
    records: list[object] = [*cluster_records(MESHLETS), wl]
    records += [replace(HostPolicy.default(mesh(i)), created_at=T0 - 10) for i in range(MESHLETS)]
    events: list[tuple[int, int, int, object]] = []  # (at, seq, core, event)
    seq = 0

    def later(at: int, i: int, ev: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, i, ev))

    writes: list[tuple[int, object]] = []
    owners: list[tuple[int, str]] = []  # (round, meshlet) as slot 0's owner changes

    def act(i: int, now: int, actions: list[object]) -> None:
        for a in actions:
            if isinstance(a, PutRecord):
                writes.append((now, a.record))
                for j in range(MESHLETS):
                    later(now + 50, j, RecordSeen(a.record))
            elif isinstance(a, DeleteRecord):
                for j in range(MESHLETS):
                    later(now + 50, j, RecordDeleted(a.uri))
            elif isinstance(a, StartReplica):  # this image cannot start anywhere
                later(now + 300, i, ReplicaStateChanged(wl.uri, a.slot, "failed", message="x"))
            elif isinstance(a, StopReplica):
                later(now + 100, i, ReplicaStateChanged(a.workload_uri, a.slot, "stopped"))
            elif isinstance(a, ProbePeer):
                later(now + 10, i, ProbeResult(a.meshlet, True))

    for i, core in enumerate(cores):
        for r in records:
            act(i, T0, core.handle(RecordSeen(r)))  # type: ignore[arg-type]
    now = T0
    end = T0 + 40 * 60_000
    while now < end:
        now += 250
        while events and events[0][0] <= now:
            _, _, i, ev = heapq.heappop(events)
            act(i, now, cores[i].handle(ev))  # type: ignore[arg-type]
        for i, core in enumerate(cores):
            act(i, now, core.handle(Tick(now)))
        placed = cores[0].placement().get(wl.uri)
        if placed and placed[0] is not None and (not owners or owners[-1] != placed[0]):
            owners.append(placed[0])

    hosts = [m for _, m in owners]
    assert len(set(hosts)) == MESHLETS  # it was tried everywhere...
    assert len(hosts) <= MESHLETS  # ...once each: never back to a meshlet that gave it up
    # the same answer on every meshlet
    assert all(c.placement()[wl.uri] == cores[0].placement()[wl.uri] for c in cores)
    last = [r for _, r in writes if isinstance(r, WorkloadStatus) and r.meshlet == hosts[-1]]
    assert last[-1].state == "failing"
    # and then quiet: nothing written in the last half hour but nothing at all
    late = [r for t, r in writes if t > T0 + 10 * 60_000]
    assert late == [], late
    assert not [r for _, r in writes if isinstance(r, Bid) and r.slots > 0 and r.round > 2]
