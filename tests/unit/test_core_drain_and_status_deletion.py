"""A drain that ended does not re-judge the rounds that closed during it, and a deleted
workloadStatus is forgotten (found replaying the real commune's writes: a job ran three times
around a drain, and its second host stopped its copy before the third was running)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshletd.atproto.records import record_from_json, record_to_json
from meshletd.core import (
    MeshletIdentity,
    PutRecord,
    RecordDeleted,
    ReplicaStateChanged,
    Scheduler,
    SetDraining,
    StartReplica,
    StopReplica,
    Tick,
    WorkloadStatus,
)
from meshletd.core.records import (
    MAX_DRAINS,
    NSID_MESHLET_OWNER,
    NSID_STATUS,
    MeshletOwner,
    at_uri,
    format_datetime_ms,
    with_state_history,
)
from meshletd.core.scheduler import status_rkey

from .core_helpers import CPU, MEM, T0, bid, cluster_records, feed, mesh, observer, owner, workload
from .test_core_placement_properties import scenarios

CLOSE = T0 + 2000 + 2000  # createdAt + bidWindowMs + settle
DRAIN = T0 + 500  # just after the round-0 bids, before round 0's close
UNDRAIN = T0 + 600_000


def of(actions: list[object], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def owner_record(i: int, state: str, since: int, drains=()) -> MeshletOwner:
    return MeshletOwner(
        at_uri(mesh(i), NSID_MESHLET_OWNER, "self"),
        mesh(i),
        owner(i),
        CPU,
        MEM,
        state=state,
        state_since=since,
        drains=tuple(drains),
    )


def as_published(rec: MeshletOwner) -> MeshletOwner:
    """The record as a peer reads it back from the PDS (through its JSON form)."""
    got = record_from_json(rec.uri, "cid", record_to_json(rec))
    assert isinstance(got, MeshletOwner)
    return got


def my_owner_records(out: list[object]) -> list[MeshletOwner]:
    return [a.record for a in of(out, PutRecord) if isinstance(a.record, MeshletOwner)]


def test_a_job_won_just_before_a_drain_does_not_move_back_after_undrain() -> None:
    # mesh(0) bids first and best in round 0, then drains before the round closes: the
    # slot goes to mesh(1). Undrained ten minutes later, mesh(0) must not get it back (for a
    # job, moving back means running it a third time).
    wl = workload(kind="job", owner_i=2)
    bids = [bid(wl, 0, priority=2), bid(wl, 1, priority=1)]
    drained = Scheduler(MeshletIdentity(mesh(0), owner(0), CPU, MEM))
    drained.handle(Tick(T0))
    feed(drained, [*cluster_records(3), wl, *bids])
    new_host, watcher = observer(1), observer(2)
    for core in (new_host, watcher):
        feed(core, [*cluster_records(3), wl, *bids])

    drained.handle(Tick(DRAIN))
    (draining,) = my_owner_records(drained.handle(SetDraining(True)))
    for core in (new_host, watcher):
        feed(core, [as_published(draining)])
    for core in (drained, new_host, watcher):
        core.handle(Tick(CLOSE))
        assert core.placement()[wl.uri] == ((0, mesh(1)),)
    new_host.handle(ReplicaStateChanged(wl.uri, 0, "running"))

    drained.handle(Tick(UNDRAIN))
    out = drained.handle(SetDraining(False))
    (active,) = my_owner_records(out)
    assert (active.state, active.state_since, active.drains) == (
        "active",
        UNDRAIN,
        ((DRAIN, UNDRAIN),),
    )
    assert of(out, StartReplica) == []
    assert drained.placement()[wl.uri] == ((0, mesh(1)),)
    for core in (new_host, watcher):
        out = feed(core, [as_published(active)])
        core.handle(Tick(UNDRAIN + 60_000))
        assert core.placement()[wl.uri] == ((0, mesh(1)),)
        assert of(out, StopReplica) == []
    assert new_host.replicas() == {(wl.uri, 0): "running"}


def test_a_round_closed_after_the_undrain_counts_the_meshlet_again() -> None:
    # The drain interval is [since, until): a round that closes after the undrain is judged
    # as any other, and one that closed before the drain started was never affected.
    after = workload("after", created=UNDRAIN + 1000)
    before = workload("before", created=T0 - 10_000)
    core = observer(5)
    undrained = owner_record(0, "active", UNDRAIN, [(DRAIN, UNDRAIN)])
    feed(core, [*cluster_records(3), after, before, undrained])
    feed(core, [bid(after, 0, priority=2), bid(after, 1, priority=1)])
    feed(core, [bid(before, 0, priority=2), bid(before, 1, priority=1)])
    core.handle(Tick(UNDRAIN + 1000 + 4000))
    assert core.placement()[after.uri] == ((0, mesh(0)),)
    assert core.placement()[before.uri] == ((0, mesh(0)),)


def test_old_meshletowner_records_without_drains_stay_valid() -> None:
    value = {
        "$type": NSID_MESHLET_OWNER,
        "ownerDid": owner(0),
        "state": "draining",
        "stateSince": format_datetime_ms(DRAIN),
        "capacity": {"milliCpu": CPU, "memoryMiB": MEM},
        "arch": "amd64",
        "createdAt": format_datetime_ms(DRAIN),
    }
    rec = record_from_json(at_uri(mesh(0), NSID_MESHLET_OWNER, "self"), "cid", value)
    assert isinstance(rec, MeshletOwner)
    assert rec.drains == ()
    assert rec.drained_at(DRAIN) and not rec.drained_at(DRAIN - 1)
    assert "drains" not in record_to_json(rec)


def test_the_drain_history_keeps_the_newest_intervals() -> None:
    core = Scheduler(MeshletIdentity(mesh(0), owner(0), CPU, MEM))
    core.handle(Tick(T0))
    feed(core, cluster_records(2))
    last = None
    for k in range(MAX_DRAINS + 3):
        core.handle(Tick(T0 + 10_000 * k))
        core.handle(SetDraining(True))
        core.handle(Tick(T0 + 10_000 * k + 5000))
        (last,) = my_owner_records(core.handle(SetDraining(False)))
    assert last is not None and len(last.drains) == MAX_DRAINS
    k = MAX_DRAINS + 2
    assert last.drains[-1] == (T0 + 10_000 * k, T0 + 10_000 * k + 5000)
    assert as_published(last).drains == last.drains


def test_a_drain_record_read_back_from_its_json_is_the_one_written() -> None:
    # What the core writes on drain and undrain is what every peer reads back (the
    # publisher adds only fields that take no part in placement: key, version, storage).
    core = Scheduler(MeshletIdentity(mesh(0), owner(0), CPU, MEM))
    core.handle(Tick(T0))
    feed(core, cluster_records(2))
    for draining in (True, False):
        core.handle(Tick(T0 + 1000 + 1000 * draining))
        (rec,) = my_owner_records(core.handle(SetDraining(draining)))
        assert as_published(rec) == rec
        assert "endpoint" not in record_to_json(rec)  # the lexicon wants a URI or nothing


def test_the_drain_record_validates_against_the_lexicon() -> None:
    from meshletd.atproto.lexicon import validate_record

    rec = owner_record(0, "active", UNDRAIN, [(DRAIN, UNDRAIN), (T0, T0 + 100)])
    value = record_to_json(rec)
    validate_record(NSID_MESHLET_OWNER, value, rkey="self")
    assert value["drains"][0]["since"] == format_datetime_ms(DRAIN)


def test_a_deleted_status_does_not_pass_for_the_new_owner_running() -> None:
    # bob (mesh 1) runs slot 0 that alice (mesh 0) ran before in the same round; alice
    # deleted her status when she stopped. When the slot goes back to alice at that round
    # (here: alice undrains with a record from an older meshletd, without `drains`), bob
    # must wait for alice's new status, not take her deleted one as "running".
    wl = workload(owner_i=0)
    bob = observer(1)
    feed(bob, [*cluster_records(2), wl])
    bob.handle(Tick(T0 + 100))  # bob's round-0 bid
    feed(bob, [bid(wl, 0, priority=5)])
    assert bob.placement()[wl.uri] == ((0, mesh(0)),)  # early close: both answered
    alice_status = WorkloadStatus(
        at_uri(mesh(0), NSID_STATUS, status_rkey(wl.uri, 0)),
        mesh(0),
        wl.uri,
        0,
        0,
        "running",
        T0 + 800,
    )
    feed(bob, [alice_status])
    bob.handle(Tick(DRAIN))
    out = feed(bob, [owner_record(0, "draining", DRAIN)])
    assert bob.placement()[wl.uri] == ((0, mesh(1)),)
    assert [(s.slot, s.round) for s in of(out, StartReplica)] == [(0, 0)]
    bob.handle(Tick(T0 + 1500))
    bob.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    bob.handle(RecordDeleted(alice_status.uri))  # alice stopped her copy
    bob.handle(Tick(UNDRAIN))
    out = feed(bob, [owner_record(0, "active", UNDRAIN)])  # no `drains`: old meshletd
    assert bob.placement()[wl.uri] == ((0, mesh(0)),)
    assert of(out, StopReplica) == []
    assert of(bob.handle(Tick(UNDRAIN + 2000)), StopReplica) == []
    # alice's new copy runs: now bob stops (make-before-break).
    out = feed(bob, [alice_status])
    assert [(s.slot, s.reason) for s in of(out, StopReplica)] == [(0, "lost-slot")]


def test_a_deleted_bid_no_longer_counts_and_observers_agree_once_they_see_it() -> None:
    # Placement is a function of the records that exist (docs/protocol.md, section 19): a
    # bid deleted while its workload exists stops counting (it used to be ignored, and so
    # stayed in memory for the workload's life, and a meshlet whose bid write was refused
    # had no way to withdraw it). Seen in any order, the deletion gives the same answer.
    wl = workload(owner_i=2)
    records = [*cluster_records(3), wl, bid(wl, 0, priority=2), bid(wl, 1, priority=1)]
    early, late = observer(5), observer(6)
    feed(early, records)
    early.handle(Tick(CLOSE))
    assert early.placement()[wl.uri] == ((0, mesh(0)),)
    early.handle(RecordDeleted(bid(wl, 0).uri))
    early.handle(Tick(CLOSE + 1000))
    assert early.placement()[wl.uri] == ((0, mesh(1)),)
    feed(late, [r for r in records if r != bid(wl, 0, priority=2)])
    late.handle(Tick(CLOSE + 1000))
    assert late.placement() == early.placement()


def test_republishing_our_record_at_start_keeps_the_drain_history() -> None:
    # The publisher rebuilds meshletOwner from its configuration at start (state active); it
    # must not drop past drains, and leaving a drain that way records its interval too.
    now = UNDRAIN + 5000
    was = owner_record(0, "active", UNDRAIN, [(DRAIN, UNDRAIN)])
    wanted = owner_record(0, "active", 0)
    assert with_state_history(wanted, was, now) == was
    was_draining = owner_record(0, "draining", DRAIN)
    got = with_state_history(wanted, was_draining, now)
    assert (got.state_since, got.drains) == (now, ((DRAIN, now),))
    assert with_state_history(wanted, None, now) == owner_record(0, "active", now)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scenarios(),
    st.integers(0, 7),
    st.integers(-1000, 25_000),
    st.integers(0, 100_000),
    st.randoms(use_true_random=False),
)
def test_an_undrain_never_changes_the_placement_of_closed_rounds(scen, k, d, u, rnd) -> None:
    # Any meshlet drains at any time around the rounds and undrains after they all closed:
    # an observer that saw the drain keeps its placement after the undrain, and agrees with
    # one that only ever saw the undrained record (in any order).
    n, wl, bids = scen
    k %= n
    drain_at, undrain_at = T0 + d, T0 + 30_000 + u
    base = [*cluster_records(n), wl, *bids]
    seen = observer()
    feed(seen, [*base, owner_record(k, "draining", drain_at)])
    seen.handle(Tick(T0 + 30_000))
    before = seen.placement()
    undrained = owner_record(k, "active", undrain_at, [(drain_at, undrain_at)])
    feed(seen, [as_published(undrained)])
    seen.handle(Tick(undrain_at + 1000))
    assert seen.placement() == before
    late = observer()
    records = [r for r in base if getattr(r, "uri", "") != undrained.uri] + [undrained]
    rnd.shuffle(records)
    feed(late, records)
    late.handle(Tick(undrain_at + 1000))
    assert late.placement() == before
