"""Pausing a workload (docs/protocol.md, section 10): its replicas stop and keep their slots,
rounds and capacity; resuming starts them again where they were."""

from __future__ import annotations

from dataclasses import replace

from meshletd.core import (
    Bid,
    DeleteRecord,
    PutRecord,
    RecordDeleted,
    ReplicaStateChanged,
    StartReplica,
    StopReplica,
    Tick,
    WorkloadStatus,
)

from .core_helpers import T0, bid, cluster_records, feed, mesh, observer, workload

CLOSE = T0 + 2000 + 2000


def of(actions: list[object], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def statuses(actions: list[object]) -> list[tuple[int, int, str]]:
    return [
        (a.record.slot, a.record.round, a.record.state)
        for a in of(actions, PutRecord)
        if isinstance(a.record, WorkloadStatus)
    ]


def running_core(paused: bool = False):
    wl = workload(replicas=2, owner_i=2)
    if paused:
        wl = replace(wl, paused=True)
    core = observer(0)
    feed(core, [*cluster_records(3), wl])
    feed(core, [bid(wl, 0, priority=2), bid(wl, 1, priority=1)])
    out = core.handle(Tick(CLOSE))
    return core, wl, out


def test_pausing_stops_the_replica_keeps_the_slot_and_reports_paused() -> None:
    core, wl, _ = running_core()
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    placed = core.placement()[wl.uri]
    free = core.free_capacity()
    out = feed(core, [replace(wl, cid="c2", paused=True)])
    assert [(s.slot, s.reason) for s in of(out, StopReplica)] == [(0, "paused")]
    assert statuses(out) == []  # said once the runtime has stopped it
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "stopped"))
    assert statuses(out) == [(0, 0, "paused")]
    assert of(out, StartReplica) == [] and of(out, DeleteRecord) == []
    assert core.replicas() == {(wl.uri, 0): "paused"}
    assert core.placement()[wl.uri] == placed
    assert not [a for a in of(out, PutRecord) if isinstance(a.record, Bid)]
    assert core.free_capacity() == free
    # time passes: nothing restarts, no round opens, no heartbeat
    out = core.handle(Tick(CLOSE + 600_000))
    assert of(out, StartReplica) == [] and of(out, PutRecord) == []
    assert core.placement()[wl.uri] == placed


def test_resuming_starts_the_replica_in_the_same_slot_and_round() -> None:
    core, wl, _ = running_core()
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    feed(core, [replace(wl, cid="c2", paused=True)])
    core.handle(ReplicaStateChanged(wl.uri, 0, "stopped"))
    out = feed(core, [replace(wl, cid="c3", paused=False)])
    assert [(s.workload.uri, s.slot, s.round) for s in of(out, StartReplica)] == [(wl.uri, 0, 0)]
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    assert statuses(out) == [(0, 0, "running")]
    assert core.placement()[wl.uri] == ((0, mesh(0)), (0, mesh(1)))


def test_resumed_before_the_stop_completed_starts_again_once_stopped() -> None:
    core, wl, _ = running_core()
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    feed(core, [replace(wl, cid="c2", paused=True)])
    out = feed(core, [replace(wl, cid="c3", paused=False)])
    assert of(out, StartReplica) == []  # the stop is still on its way
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "stopped"))
    assert [(s.slot, s.round) for s in of(out, StartReplica)] == [(0, 0)]
    assert statuses(out) == []


def test_a_workload_created_paused_is_placed_but_not_started() -> None:
    core, wl, out = running_core(paused=True)
    assert core.placement()[wl.uri] == ((0, mesh(0)), (0, mesh(1)))
    assert of(out, StartReplica) == []
    assert statuses(out) == [(0, 0, "paused")]
    out = feed(core, [replace(wl, cid="c2", paused=False)])
    assert [(s.slot, s.round) for s in of(out, StartReplica)] == [(0, 0)]


def test_a_paused_slot_re_placed_here_is_held_not_started() -> None:
    # mesh(2) wins round 1 of slot 0 (mesh(0) was lost while the workload was paused).
    wl = replace(workload(replicas=2, owner_i=2), paused=True)
    core = observer(2)
    feed(core, [*cluster_records(3), wl])
    feed(core, [bid(wl, 0, priority=2), bid(wl, 1, priority=1)])
    core.handle(Tick(CLOSE))
    feed(core, [bid(wl, 2, round_=1, slot=0, at=CLOSE + 3000)])
    out = core.handle(Tick(CLOSE + 3000 + 1000 + 2000))
    assert core.placement()[wl.uri][0] == (1, mesh(2))
    assert of(out, StartReplica) == []
    assert statuses(out) == [(0, 1, "paused")]
    out = feed(core, [replace(wl, cid="c2", paused=False)])
    assert [(s.slot, s.round) for s in of(out, StartReplica)] == [(0, 1)]


def test_a_paused_replica_that_loses_its_slot_is_forgotten_without_a_stop() -> None:
    core, wl, _ = running_core()
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    feed(core, [replace(wl, cid="c2", paused=True)])
    core.handle(ReplicaStateChanged(wl.uri, 0, "stopped"))
    feed(core, [bid(replace(wl, cid="c2", paused=True), 2, round_=1, slot=0, at=CLOSE + 3000)])
    out = core.handle(Tick(CLOSE + 3000 + 1000 + 2000))
    assert core.placement()[wl.uri][0] == (1, mesh(2))
    assert of(out, StopReplica) == []
    assert [d.collection for d in of(out, DeleteRecord)] == ["commune.scheduler.workloadStatus"]
    assert core.replicas() == {}


def test_an_exit_during_the_pause_is_neither_restarted_nor_reported() -> None:
    core, wl, _ = running_core()
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    feed(core, [replace(wl, cid="c2", paused=True)])
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "exited", 143))
    assert statuses(out) == [] and of(out, StartReplica) == []
    core.handle(ReplicaStateChanged(wl.uri, 0, "stopped"))
    assert of(core.handle(Tick(CLOSE + 120_000)), StartReplica) == []
    assert core.replicas() == {(wl.uri, 0): "paused"}


def test_deleting_a_paused_workload_stops_nothing_and_removes_our_records() -> None:
    core, wl, _ = running_core(paused=True)
    out = core.handle(RecordDeleted(wl.uri))
    assert of(out, StopReplica) == []
    assert "commune.scheduler.workloadStatus" in {d.collection for d in of(out, DeleteRecord)}
    assert core.replicas() == {}
