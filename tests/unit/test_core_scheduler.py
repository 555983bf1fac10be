"""Behaviour of one meshlet's scheduler core, driven by events as the daemon would."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

from meshletd.atproto.records import record_from_json, record_to_json
from meshletd.core import (
    Bid,
    DeleteRecord,
    MeshletIdentity,
    ProbePeer,
    ProbeResult,
    PutRecord,
    RecordDeleted,
    ReplicaStateChanged,
    Reply,
    Scheduler,
    SetDraining,
    StartReplica,
    StopReplica,
    Tick,
    WorkloadStatus,
)
from meshletd.core.records import NSID_STATUS, MeshletOwner, at_uri

from .core_helpers import MEM, T0, bid, cluster_records, feed, mesh, observer, owner, workload

CLOSE = T0 + 2000 + 2000  # createdAt + bidWindowMs + settle (2 x skew + grace)


def of(actions: list[object], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def placed_core(me: int, n: int = 3, replicas: int = 2, **kw: object):
    """A core for mesh(me) in an n-meshlet commune that sees one workload placed in round 0
    on mesh(0) (priority 2) and mesh(1) (priority 1)."""
    wl = workload(replicas=replicas, owner_i=2, **kw)  # type: ignore[arg-type]
    core = observer(me)
    feed(core, [*cluster_records(n), wl])
    feed(core, [bid(wl, 0, priority=2), bid(wl, 1, priority=1)])
    return core, wl


def test_a_new_workload_gets_a_bid_from_a_candidate_meshlet() -> None:
    wl = workload(replicas=2, owner_i=1)
    core = observer(0)
    feed(core, [*cluster_records(3), wl])
    out = core.handle(Tick(T0 + 100))
    bids = [a for a in of(out, PutRecord) if isinstance(a.record, Bid)]
    assert len(bids) == 1 and bids[0].create
    b = bids[0].record
    assert (b.round, b.slot, b.slots, b.workload_uri) == (0, -1, 1, wl.uri)
    assert b.created_at == T0 + 100


def test_the_winner_starts_its_replica_and_reports_running_once() -> None:
    core, wl = placed_core(0)
    assert of(core.handle(Tick(CLOSE - 10)), StartReplica) == []  # round still open
    out = core.handle(Tick(CLOSE))
    starts = of(out, StartReplica)
    assert [(s.workload.uri, s.slot, s.round) for s in starts] == [(wl.uri, 0, 0)]
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    statuses = [a for a in of(out, PutRecord) if isinstance(a.record, WorkloadStatus)]
    assert len(statuses) == 1 and statuses[0].create and statuses[0].record.state == "running"
    # the status names the version of the workload it runs, as the lexicon's workloadRef wants
    assert statuses[0].record.workload_cid == wl.cid
    out = core.handle(Tick(CLOSE + 5000))
    assert of(out, PutRecord) == []  # no heartbeat writes
    assert core.placement()[wl.uri] == ((0, mesh(0)), (0, mesh(1)))


def test_every_candidate_answering_closes_the_round_early() -> None:
    wl = workload(replicas=2, owner_i=2)
    core = observer(0)
    feed(core, [*cluster_records(3), wl])
    feed(core, [bid(wl, 0), bid(wl, 1), bid(wl, 2, slots=0)])
    core.handle(Tick(T0 + 400))  # long before the window ends
    assert core.placement()[wl.uri][0] is not None


def test_a_lost_host_is_probed_then_its_slot_reoffered_in_a_new_round() -> None:
    # Find a meshlet among 0..5 that watches mesh(0), the owner of slot 0.
    for me in range(1, 6):
        core, _wl = placed_core(me, n=6)
        out = core.handle(Tick(CLOSE))
        if ProbePeer(mesh(0)) in out:
            break
    else:
        raise AssertionError("nobody watches mesh(0)")
    for probe in of(out, ProbePeer):  # the other watched peers answer
        if probe.meshlet != mesh(0):
            core.handle(ProbeResult(probe.meshlet, ok=True))
    out = []
    for _ in range(core.t.probe_failures):
        out += core.handle(ProbeResult(mesh(0), ok=False))
    opened = [a.record for a in of(out, PutRecord) if isinstance(a.record, Bid)]
    assert [(b.round, b.slot) for b in opened] == [(1, 0)]


def test_a_moved_slot_stops_only_after_the_new_owner_runs_make_before_break() -> None:
    core, wl = placed_core(0)
    core.handle(Tick(CLOSE))
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    # mesh(2) wins replacement round 1 of slot 0 (opened when mesh(0) was suspected).
    feed(core, [bid(wl, 2, round_=1, slot=0, at=CLOSE + 3000)])
    out = core.handle(Tick(CLOSE + 3000 + 1000 + 2000))
    assert core.placement()[wl.uri][0] == (1, mesh(2))
    assert of(out, StopReplica) == []
    st = WorkloadStatus(
        at_uri(mesh(2), NSID_STATUS, "s"), mesh(2), wl.uri, 0, 1, "running", CLOSE + 7000
    )
    out = feed(core, [st])
    assert [(s.slot, s.reason) for s in of(out, StopReplica)] == [(0, "lost-slot")]


def test_deleting_the_workload_stops_replicas_and_removes_our_records() -> None:
    wl = workload(replicas=2, owner_i=2)
    core = observer(0)
    feed(core, [*cluster_records(3), wl])
    core.handle(Tick(T0 + 100))  # our bid
    feed(core, [bid(wl, 1, priority=-1)])
    core.handle(Tick(CLOSE))
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    out = core.handle(RecordDeleted(wl.uri))
    assert [(s.workload_uri, s.reason) for s in of(out, StopReplica)] == [(wl.uri, "deleted")]
    deleted = {d.collection for d in of(out, DeleteRecord)}
    assert deleted == {"commune.scheduler.bid", "commune.scheduler.workloadStatus"}


def test_a_finished_job_is_recorded_and_not_restarted() -> None:
    core, wl = placed_core(0, kind="job")
    core.handle(Tick(CLOSE))
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "exited", 0))
    st = [a.record for a in of(out, PutRecord) if isinstance(a.record, WorkloadStatus)]
    assert [(s.state, s.exit_code) for s in st] == [("succeeded", 0)]
    assert of(core.handle(Tick(CLOSE + 120_000)), StartReplica) == []


def test_a_finished_job_gives_its_room_back() -> None:
    # dev/chaos seed 1 (finding 3): each finished job held its room on the meshlet that ran
    # it for as long as its record lived; after ~17 minutes of churn every meshlet declined
    # new work, and nothing new was placed any more.
    core = Scheduler(MeshletIdentity(mesh(0), owner(0), 500, MEM, max_replicas=1))
    core.handle(Tick(T0))
    job = workload("job", owner_i=2, kind="job", cpu=500)
    feed(core, [*cluster_records(3), job])
    out = feed(core, [bid(job, 0), bid(job, 1, slots=0), bid(job, 2, slots=0)])
    out += core.handle(Tick(CLOSE))
    assert [s.slot for s in of(out, StartReplica)] == [0]
    core.handle(ReplicaStateChanged(job.uri, 0, "running"))
    assert core.free_capacity()[0] == 0 and core.free_replicas() == 0  # it runs: held
    core.handle(ReplicaStateChanged(job.uri, 0, "exited", 0))
    nxt = workload("next", owner_i=2, created=T0 + 60_000, cpu=500)
    core.handle(Tick(T0 + 60_000))
    out = feed(core, [nxt])
    out += core.handle(Tick(T0 + 60_100))
    offered = [a.record for a in of(out, PutRecord) if isinstance(a.record, Bid)]
    assert [(b.workload_uri, b.slots) for b in offered] == [(nxt.uri, 1)]
    assert core.free_capacity()[0] == 0  # the new bid reserves it


def test_a_failed_service_is_restarted_locally_with_backoff() -> None:
    core, wl = placed_core(0)
    core.handle(Tick(CLOSE))
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "exited", 1))
    assert of(out, StartReplica) == []
    assert of(core.handle(Tick(CLOSE + 999)), StartReplica) == []
    out = core.handle(Tick(CLOSE + 1000))
    assert [(s.slot, s.round) for s in of(out, StartReplica)] == [(0, 0)]


def test_draining_publishes_the_state_and_reoffers_our_slots() -> None:
    core, wl = placed_core(0)
    core.handle(Tick(CLOSE))
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    out = core.handle(SetDraining(True, request_id="r1"))
    owner_recs = [a.record for a in of(out, PutRecord) if isinstance(a.record, MeshletOwner)]
    assert [(r.state, r.state_since) for r in owner_recs] == [("draining", CLOSE)]
    opened = [a.record for a in of(out, PutRecord) if isinstance(a.record, Bid)]
    assert [(b.round, b.slot, b.slots) for b in opened] == [(1, 0, 0)]
    assert Reply("r1", True, "draining") in out
    assert of(out, StopReplica) == []  # keeps running until replaced


def test_records_round_trip_through_their_json_form() -> None:
    wl = workload()
    b = bid(wl, 3, round_=2, slot=1, priority=-7, slots=1, at=T0 + 1234)
    again = record_from_json(b.uri, "cid", record_to_json(b))
    assert again == b
    st = WorkloadStatus(
        at_uri(mesh(1), NSID_STATUS, "s"),
        mesh(1),
        wl.uri,
        0,
        3,
        "failed",
        T0 + 5,
        exit_code=2,
        restarts=4,
    )
    assert record_from_json(st.uri, "cid", record_to_json(st)) == st
    assert all(not isinstance(v, float) for v in record_to_json(b).values())


def test_the_core_is_pure_no_clock_randomness_or_io() -> None:
    banned = {"time", "random", "asyncio", "trio", "socket", "os", "subprocess", "threading"}
    core_dir = Path(__file__).parents[2] / "meshletd" / "core"
    for path in core_dir.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not names & banned, f"{path.name} imports {names & banned}"
        src = path.read_text()
        assert ".now(" not in src and "utcnow" not in src, path.name


def test_a_draining_meshlet_that_learns_late_it_won_reoffers_the_slot_instead_of_starting() -> None:
    # Chaos seed 140: a bid seen late (lost, healed by anti-entropy) moves the anchor of a
    # replacement round, and the re-decided round (closed before the drain) goes to a
    # meshlet that is draining by the time it learns it. It must not start the slot.
    core, wl = placed_core(1, n=6, replicas=1)
    core.handle(Tick(CLOSE))
    assert core.placement()[wl.uri] == ((0, mesh(0)),)
    a = T0 + 10_000
    feed(core, [bid(wl, 1, round_=1, slot=0, at=a + 600)])  # ours
    feed(core, [bid(wl, 4, round_=1, slot=0, at=a + 1200, priority=5)])  # wins in this view
    core.handle(Tick(a + 5000))
    assert core.placement()[wl.uri] == ((1, mesh(4)),)
    core.handle(Tick(a + 10_000))
    core.handle(SetDraining(True))
    core.handle(Tick(a + 12_000))
    # The round's opening bid (a decline), late: the window is [a, a + 1000] after all.
    out = feed(core, [bid(wl, 3, round_=1, slot=0, at=a, slots=0)])
    assert core.placement()[wl.uri] == ((1, mesh(1)),)  # the round closed before the drain
    assert of(out, StartReplica) == []
    reoffers = [a.record for a in of(out, PutRecord) if isinstance(a.record, Bid)]
    assert [(b.round, b.slot, b.slots) for b in reoffers] == [(2, 0, 0)]
    out = core.handle(Tick(a + 13_000))
    assert of(out, StartReplica) == []
    assert not [a for a in of(out, PutRecord) if isinstance(a.record, Bid)]  # once, not per tick


def test_a_cut_off_watcher_opens_no_round_until_a_peer_answers() -> None:
    # Chaos seed 123: a meshlet cut off with its ring neighbours suspected them one by one;
    # each suspicion added a never-probed peer to its watch list, which counted as alive, so
    # the cut-off meshlet opened a round whose bid (held back, delivered at heal) moved the
    # anchor of the round the real watchers opened later.
    for me in range(1, 6):
        core, _wl = placed_core(me, n=6)
        out = core.handle(Tick(CLOSE))
        if ProbePeer(mesh(0)) in out:
            break
    else:
        raise AssertionError("nobody watches mesh(0)")
    opened = []
    for _ in range(core.t.probe_failures):  # every probe fails: we are the one cut off
        for probe in of(out, ProbePeer):
            opened += of(core.handle(ProbeResult(probe.meshlet, ok=False)), PutRecord)
    assert not [a for a in opened if isinstance(a.record, Bid)]


def test_a_cut_off_watcher_does_not_take_a_peer_that_answered_long_ago_as_alive() -> None:
    # Chaos seeds 13 and 27: a suspected neighbour had once put peer z on our watch list; z
    # answered then, left the list when the neighbour recovered, and came back when we were
    # cut off. Its minute-old answer counted as "a watched peer answers", so the cut-off
    # meshlet opened rounds; its bids, held back and published at heal with their old
    # createdAt, moved the anchor of rounds the real watchers had won since.
    for me in range(1, 6):
        core, _wl = placed_core(me, n=6)
        out = core.handle(Tick(CLOSE))
        if ProbePeer(mesh(0)) in out:
            break
    else:
        raise AssertionError("nobody watches mesh(0)")
    first = [p.meshlet for p in of(out, ProbePeer)]
    x = next(m for m in first if m != mesh(0))
    now = CLOSE

    def probe_round(answer) -> list[object]:
        nonlocal now, out
        acts: list[object] = []
        for p in of(out, ProbePeer):
            acts += core.handle(ProbeResult(p.meshlet, ok=answer(p.meshlet)))
        now += core.t.probe_interval_ms
        out = core.handle(Tick(now))
        return acts

    # x stops answering: it is suspected and z joins the watch list
    for _ in range(core.t.probe_failures + 1):
        probe_round(lambda m: m != x)
    stand_ins = {p.meshlet for p in of(out, ProbePeer)} - set(first)
    assert stand_ins, "a suspected peer is replaced on the watch list"
    for _ in range(2):  # z answers; then x is back and z leaves the list
        probe_round(lambda m: True)
    now += 60_000
    out = core.handle(Tick(now))
    opened: list[object] = []
    for _ in range(core.t.probe_failures + 2):  # a minute later we are cut off: all fail
        opened += probe_round(lambda m: False)
    assert not [a for a in opened if isinstance(a, PutRecord) and isinstance(a.record, Bid)]


def test_a_replica_stopped_before_it_came_up_is_not_reported_running() -> None:
    # The runtime reports `running` for a start that a later StopReplica already undid (the
    # slot moved while the unit was starting): no status record, the stop stands.
    core, wl = placed_core(0)
    core.handle(Tick(CLOSE))
    feed(core, [bid(wl, 2, round_=1, slot=0, at=CLOSE + 100, priority=9)])
    out = core.handle(Tick(CLOSE + 4000))
    assert core.placement()[wl.uri][0] == (1, mesh(2))
    core.handle(Tick(CLOSE + 4000 + 60_000))  # fence timeout: the stop is sent
    assert core.replicas().get((wl.uri, 0)) == "stopping"
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    assert [a for a in of(out, PutRecord) if isinstance(a.record, WorkloadStatus)] == []
    assert core.replicas().get((wl.uri, 0)) == "stopping"


def test_a_bid_the_daemon_could_not_publish_in_time_is_forgotten_and_wins_nothing() -> None:
    """docs/protocol.md section 14: the daemon drops a queued bid past `not_after` (its
    round's deadline + skew) and tells the core, which must not count it either."""
    from meshletd.core import BidAbandoned

    wl = workload(replicas=1, owner_i=1)
    core = observer(0)
    feed(core, [*cluster_records(2), wl])
    out = core.handle(Tick(T0 + 100))
    put = next(a for a in of(out, PutRecord) if isinstance(a.record, Bid))
    # Honest only if written by the round's deadline (createdAt + window) + skew.
    assert put.not_after == T0 + 2000 + 250
    core.handle(BidAbandoned(put.record.uri))
    out = core.handle(Tick(CLOSE + 1))
    assert of(out, StartReplica) == [], "a bid nobody else will ever see won the slot"
    assert core.placement().get(wl.uri) in (None, (None,))


def _succeeded(wl, i: int, slot: int = 0, round_: int = 0) -> WorkloadStatus:  # type: ignore[no-untyped-def]
    return WorkloadStatus(
        at_uri(mesh(i), NSID_STATUS, f"s{slot}"),
        mesh(i),
        wl.uri,
        slot,
        round_,
        "succeeded",
        exit_code=0,
        updated_at=T0 + 3000,
    )


def test_a_job_slot_another_meshlet_finished_is_not_started_here() -> None:
    core, wl = placed_core(0, kind="job", replicas=1)
    feed(core, [_succeeded(wl, 1)])
    assert of(core.handle(Tick(CLOSE)), StartReplica) == []
    assert of(core.handle(Tick(CLOSE + 120_000)), StartReplica) == []


def test_a_running_copy_of_a_job_another_meshlet_finished_is_stopped() -> None:
    # dev/chaos seed 4: a later round of a job slot, opened while the first copy still ran,
    # kept its copy running after the first one's `succeeded`: the job completed twice.
    core, wl = placed_core(0, kind="job", replicas=1)
    core.handle(Tick(CLOSE))
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    out = feed(core, [_succeeded(wl, 1)])
    assert [(s.slot, s.reason) for s in of(out, StopReplica)] == [(0, "finished-elsewhere")]
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "stopped"))
    assert of(out + core.handle(Tick(CLOSE + 120_000)), StartReplica) == []


def test_a_job_that_finished_after_its_slot_moved_keeps_its_result() -> None:
    core, wl = placed_core(0, kind="job", replicas=1)
    core.handle(Tick(CLOSE))
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    core.handle(ReplicaStateChanged(wl.uri, 0, "exited", 0))
    # mesh(1) opened and won a replacement round it had started before the result came.
    out = feed(core, [bid(wl, 1, round_=1, slot=0, priority=1, slots=1, at=CLOSE + 100)])
    out += core.handle(Tick(CLOSE + 60_000))
    deleted = [d for d in of(out, DeleteRecord) if d.collection == NSID_STATUS]
    assert deleted == []


def test_writes_decided_together_keep_the_order_they_were_decided_in() -> None:
    """A restarted meshlet hands its start-up read and the held runtime reports to the core
    as one batch (docs/protocol.md, section 13): an adopted job that ended while the view
    was incomplete is reported `running`, then `failed`, in the same batch. The daemon's
    write queue keeps the last write of a record, so the writes must come out in the order
    they were decided, or `running` would overwrite `failed` on the PDS for good."""
    wl = replace(workload(replicas=2, owner_i=2, kind="job"), restart_policy="never")
    core = observer(0)
    feed(core, [*cluster_records(3), wl])
    feed(core, [bid(wl, 0, priority=2), bid(wl, 1, priority=1)])
    core.handle(Tick(CLOSE))
    out = core.handle_batch(
        [
            ReplicaStateChanged(wl.uri, 0, "running"),
            ReplicaStateChanged(wl.uri, 0, "exited", 3),
        ]
    )
    puts = [a for a in of(out, PutRecord) if isinstance(a.record, WorkloadStatus)]
    assert [(p.record.state, p.record.exit_code) for p in puts] == [
        ("running", None),
        ("failed", 3),
    ]
    # Writes still come before the other actions.
    kinds = [isinstance(a, PutRecord | DeleteRecord) for a in out]
    assert kinds == sorted(kinds, reverse=True), out
