"""The core's bounds (docs/protocol.md, section 20): what the lexicons refuse is refused at
intake and never written; a bid the core cannot publish is never acted on; what others'
records make a meshlet remember is bounded (issue #15, points 1 and 10)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from meshletd.core import (
    Bid,
    DeleteRecord,
    MeshletIdentity,
    PutRecord,
    RecordDeleted,
    RecordSeen,
    ReplicaStateChanged,
    Scheduler,
    StartReplica,
    Tick,
    Workload,
    WorkloadStatus,
    bounds,
)
from meshletd.core.ledger import UsageLedger
from meshletd.core.records import NSID_BID, NSID_STATUS, at_uri
from meshletd.core.timing import DEFAULT_TIMING

from .core_helpers import CPU, T0, bid, cluster_records, feed, mesh, observer, owner, workload

CLOSE = T0 + 2000 + 2000
LEXICONS = Path(__file__).resolve().parents[2] / "lexicons" / "commune" / "scheduler"


def of(actions: list[object], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def _lexicon(name: str) -> dict:
    return json.loads((LEXICONS / f"{name}.json").read_text())["defs"]


def test_the_core_bounds_are_the_lexicons_bounds() -> None:
    bid_props = _lexicon("bid")["main"]["record"]["properties"]
    status_props = _lexicon("workloadStatus")["main"]["record"]["properties"]
    wl_props = _lexicon("workload")["main"]["record"]["properties"]
    res = _lexicon("defs")["resources"]["properties"]
    usage = _lexicon("usage")["main"]["record"]["properties"]
    assert bid_props["round"]["maximum"] == status_props["round"]["maximum"] == bounds.MAX_ROUND
    assert bid_props["slot"]["maximum"] == status_props["slot"]["maximum"] == bounds.MAX_SLOT
    assert bid_props["slots"]["maximum"] == bounds.MAX_SLOTS_OFFERED
    assert bid_props["priority"]["maximum"] == bounds.MAX_PRIORITY
    assert wl_props["replicas"]["maximum"] == bounds.MAX_REPLICAS
    assert wl_props["bidWindowMs"]["minimum"] == bounds.MIN_BID_WINDOW_MS
    assert wl_props["bidWindowMs"]["maximum"] == bounds.MAX_BID_WINDOW_MS
    assert res["milliCpu"]["maximum"] == bounds.MAX_MILLI_CPU
    assert res["memoryMiB"]["maximum"] == bounds.MAX_MEMORY_MIB
    assert status_props["restarts"]["maximum"] == bounds.MAX_RESTARTS
    assert status_props["exitCode"]["minimum"] == bounds.MIN_EXIT_CODE
    assert status_props["exitCode"]["maximum"] == bounds.MAX_EXIT_CODE
    assert usage["entries"]["maxLength"] == bounds.MAX_USAGE_ENTRIES


def test_a_bid_the_lexicon_refuses_counts_nowhere_and_its_reason_is_kept() -> None:
    wl = workload(owner_i=2)
    core = observer(5)
    huge = replace(bid(wl, 0, priority=9), round=bounds.MAX_ROUND + 1, slot=0)
    feed(core, [*cluster_records(3), wl, bid(wl, 1), huge])
    core.handle(Tick(CLOSE + 10_000))
    assert core.placement()[wl.uri] == ((0, mesh(1)),)
    assert "round" in core.refused[huge.uri]


def test_a_workload_the_lexicon_refuses_is_not_scheduled() -> None:
    core = observer(5)
    wl = replace(workload(owner_i=2), replicas=0)
    feed(core, [*cluster_records(3), wl])
    core.handle(Tick(CLOSE))
    assert wl.uri not in core.placement()
    assert "replicas" in core.refused[wl.uri]


def test_no_replacement_round_above_the_lexicon_maximum_is_opened() -> None:
    # mesh(1) won slot 0 in a lexicon-valid round numbered MAX_ROUND; when it is lost, the
    # next round would be above the maximum: nobody can publish it, so nobody opens it, and
    # the slot keeps its owner instead of going to every meshlet that bid alone.
    wl = workload(owner_i=2)
    top = replace(bid(wl, 1, round_=bounds.MAX_ROUND, slot=0), created_at=CLOSE + 100)
    core = observer(0)
    feed(core, [*cluster_records(3), wl, bid(wl, 1), top])
    core.handle(Tick(CLOSE + 10_000))
    assert core.placement()[wl.uri] == ((bounds.MAX_ROUND, mesh(1)),)
    core._scan_lost({mesh(1)}, force=True)  # as a fresh suspicion of mesh(1) would
    out = core.handle(Tick(CLOSE + 11_000))
    assert [a for a in of(out, PutRecord) if isinstance(a.record, Bid)] == []


def test_a_bid_write_the_pds_refused_is_withdrawn_and_its_room_freed() -> None:
    # The daemon feeds the deletion of our own bid when its write is refused for good: the
    # core then neither counts it nor holds room for it (it never acts as if it had bid).
    wl = workload(owner_i=2)
    core = observer(0)
    feed(core, [*cluster_records(3), wl])
    out = core.handle(Tick(T0 + 100))
    mine = [a.record for a in of(out, PutRecord) if isinstance(a.record, Bid)]
    assert len(mine) == 1 and core.free_capacity()[0] == CPU - wl.milli_cpu
    core.handle(RecordDeleted(mine[0].uri))
    assert core.free_capacity()[0] == CPU
    feed(core, [bid(wl, 1)])
    out = core.handle(Tick(CLOSE))
    assert core.placement()[wl.uri] == ((0, mesh(1)),)
    assert of(out, StartReplica) == []


def test_orphan_bids_are_bounded_per_writer_and_a_flood_costs_only_the_flooder() -> None:
    wl = workload(owner_i=2)
    core = observer(5)
    feed(core, cluster_records(3))
    honest = bid(wl, 1)  # arrives before its workload
    flood = [
        replace(bid(wl, 0), uri=at_uri(mesh(0), NSID_BID, f"f{i}"), workload_uri=f"at://x/y/{i}")
        for i in range(500)
    ]
    core.handle_batch([RecordSeen(r) for r in [honest, *flood]])
    assert len(core.orphans) == bounds.ORPHANS_PER_MESHLET + 1
    feed(core, [wl])
    core.handle(Tick(CLOSE))
    assert core.placement()[wl.uri] == ((0, mesh(1)),)  # the honest orphan was kept


def test_orphans_of_a_workload_that_never_comes_are_purged() -> None:
    core = observer(5)
    feed(core, cluster_records(3))
    stray = replace(bid(workload(owner_i=2), 0), workload_uri="at://did:plc:nobody/x/y")
    feed(core, [stray])
    assert len(core.orphans) == 1
    core.handle(Tick(T0 + bounds.ORPHAN_TTL_MS + 1))
    assert len(core.orphans) == 0


def test_a_deleted_orphan_bid_is_forgotten() -> None:
    core = observer(5)
    stray = replace(bid(workload(owner_i=2), 0), workload_uri="at://did:plc:nobody/x/y")
    feed(core, [stray])
    core.handle(RecordDeleted(stray.uri))
    assert len(core.orphans) == 0


def test_bids_of_a_deleted_workload_are_gone_and_their_deletions_cost_nothing() -> None:
    wl = workload(owner_i=2)
    core = observer(5)
    feed(core, [*cluster_records(3), wl, bid(wl, 0), bid(wl, 1)])
    core.handle(Tick(CLOSE))
    core.handle(RecordDeleted(wl.uri))
    for i in (0, 1):
        core.handle(RecordDeleted(bid(wl, i).uri))
    assert len(core.orphans) == 0 and core.placement() == {}


def test_an_exit_code_beyond_the_lexicon_is_written_clamped() -> None:
    wl = replace(workload(owner_i=2, kind="job"), restart_policy="never")
    core = observer(0)
    feed(core, [*cluster_records(3), wl, bid(wl, 0, priority=2)])
    core.handle(Tick(CLOSE))
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "exited", exit_code=-9999))
    written = [a.record for a in of(out, PutRecord) if isinstance(a.record, WorkloadStatus)]
    assert [(s.state, s.exit_code) for s in written] == [("failed", bounds.MIN_EXIT_CODE)]
    assert written[0].uri.startswith(at_uri(mesh(0), NSID_STATUS, ""))


def test_a_usage_record_keeps_the_512_owners_who_used_most() -> None:
    ledger = UsageLedger(mesh(0), DEFAULT_TIMING)
    ledger.start_period(T0)
    for i in range(600):
        ledger.add(owner(i), 1000 + i, 0, 1000)
    rec = ledger.close_period(T0 + 1)
    assert rec is not None and len(rec.entries) == bounds.MAX_USAGE_ENTRIES
    assert min(e.milli_cpu_seconds for e in rec.entries) == 1000 + 600 - 512


def test_a_restarted_meshlet_deletes_its_records_of_workloads_deleted_while_it_was_away() -> None:
    """Chaos finding 2: a `running` status stayed on the PDS for ever when its workload was
    deleted during a meshletd restart (docs/protocol.md, section 13)."""
    gone, kept = workload(owner_i=2, name="gone"), workload(owner_i=2, name="kept")
    core = Scheduler(MeshletIdentity(mesh(1), owner(1), 4000, 4096))

    def status(wl: Workload, i: int) -> WorkloadStatus:
        return WorkloadStatus(
            at_uri(mesh(i), NSID_STATUS, f"s{wl.uri[-6:]}"), mesh(i), wl.uri, 0, 0, "running", T0
        )

    others = [bid(gone, 3), status(gone, 3)]  # another meshlet's: not ours to delete
    view = [
        *cluster_records(3),
        kept,
        bid(kept, 1),
        status(kept, 1),
        bid(gone, 1),
        status(gone, 1),
        *others,
    ]
    out = core.handle_batch([Tick(T0), *[RecordSeen(r) for r in view]])
    deleted = {a.uri for a in of(out, DeleteRecord)}
    assert deleted == {bid(gone, 1).uri, status(gone, 1).uri}
    assert len(core.orphans) == 2  # the others' records are still kept as orphans
    assert of(core.handle_batch([RecordSeen(bid(gone, 1))]), DeleteRecord) == []  # once only


def test_a_restarted_meshlet_deletes_its_status_of_a_slot_that_moved_while_it_was_away() -> None:
    """Chaos: mesh(1)'s machine was off while its slot moved to mesh(2) (round 1); its
    `running` status of round 0 stayed on its PDS. Once its view is complete it deletes that
    status, keeps a job's result and the status of a slot it still owns (docs/protocol.md,
    section 13)."""
    moved, kept = workload(owner_i=2, name="moved"), workload(owner_i=2, name="kept")
    done = workload(owner_i=2, name="done", kind="job")
    core = Scheduler(MeshletIdentity(mesh(1), owner(1), 4000, 4096))
    close0 = T0 + 2000 + 2000

    def status(wl: Workload, i: int, round_: int, state: str = "running") -> WorkloadStatus:
        uri = at_uri(mesh(i), NSID_STATUS, f"s-{wl.uri.rsplit('/', 1)[1]}")
        return WorkloadStatus(uri, mesh(i), wl.uri, 0, round_, state, T0)

    view: list[object] = [*cluster_records(3)]
    for wl in (moved, kept, done):
        view += [wl, bid(wl, 1), status(wl, 1, 0, "succeeded" if wl is done else "running")]
    for wl in (moved, done):  # taken over by mesh(2) in round 1 while mesh(1) was away
        view += [bid(wl, 2, round_=1, slot=0, at=close0 + 3000), status(wl, 2, 1)]
    out = core.handle_batch([Tick(close0 + 10_000), *[RecordSeen(r) for r in view]])
    assert core.placement()[moved.uri][0] == (1, mesh(2))
    assert {a.uri for a in of(out, DeleteRecord)} == {status(moved, 1, 0).uri}
