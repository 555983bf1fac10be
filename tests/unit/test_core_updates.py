"""Rolling updates (docs/protocol.md, section 25): a new spec version is started beside the
old one, one slot at a time in slot order, the old one stops once the new one runs, and a
version that does not run within the bound is stopped, the old one kept, and the rollout of
that version stopped on every slot."""

from __future__ import annotations

from dataclasses import replace

from meshletd.core import (
    Bid,
    PutRecord,
    ReplicaStateChanged,
    StartReplica,
    StopReplica,
    Tick,
    WorkloadStatus,
)
from meshletd.core.records import NSID_HOST_POLICY, NSID_STATUS, HostPolicy, at_uri
from meshletd.core.versions import spec_version

from .core_helpers import T0, bid, cluster_records, feed, mesh, observer, workload

CLOSE = T0 + 2000 + 2000
U = 60_000  # Timing.update_timeout_ms


def of(actions: list[object], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def my_statuses(actions: list[object]) -> list[WorkloadStatus]:
    return [a.record for a in of(actions, PutRecord) if isinstance(a.record, WorkloadStatus)]


def status(wl, i: int, slot: int, version: str, state: str = "running", failed: str = ""):
    return WorkloadStatus(
        uri=at_uri(mesh(i), NSID_STATUS, f"s{slot}"),
        meshlet=mesh(i),
        workload_uri=wl.uri,
        slot=slot,
        round=0,
        state=state,
        updated_at=T0,
        version=version,
        failed_version=failed,
    )


def running(i: int):
    """mesh(i)'s core, owning slot i of a 2-replica service at version v1, running it."""
    wl = replace(workload(replicas=2, owner_i=2), version="v1")
    core = observer(i)
    feed(core, [*cluster_records(3), wl])
    feed(core, [bid(wl, 0, priority=2), bid(wl, 1, priority=1)])
    core.handle(Tick(CLOSE))
    core.handle(ReplicaStateChanged(wl.uri, i, "running"))
    return core, wl


def v2(wl):
    return replace(wl, cid="c2", version="v2", image="registry.test/app:2")


def test_the_first_slot_starts_the_new_version_beside_the_old_one() -> None:
    core, wl = running(0)
    placed = core.placement()[wl.uri]
    free = core.free_capacity()
    out = feed(core, [v2(wl)])
    starts = of(out, StartReplica)
    assert [(s.slot, s.lane, s.workload.version) for s in starts] == [(0, 1, "v2")]
    assert of(out, StopReplica) == []  # make-before-break: the old one keeps running
    assert core.free_capacity() == (free[0] - wl.milli_cpu, free[1] - wl.memory_mib)
    assert core.placement()[wl.uri] == placed
    assert not [a for a in of(out, PutRecord) if isinstance(a.record, Bid)]


def test_once_the_new_version_runs_the_old_one_stops_and_the_status_names_the_version() -> None:
    core, wl = running(0)
    free = core.free_capacity()
    feed(core, [v2(wl)])
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "running", lane=1))
    assert [(s.slot, s.lane, s.reason) for s in of(out, StopReplica)] == [(0, 0, "updated")]
    st = my_statuses(out)
    assert [(s.slot, s.state, s.version, s.failed_version) for s in st] == [
        (0, "running", "v2", "")
    ]
    # the old lane's end is expected: the replica stays, in its new lane
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "stopped", lane=0))
    assert core.replicas() == {(wl.uri, 0): "running"}
    assert core.free_capacity() == free
    assert of(out, StartReplica) == [] and my_statuses(out) == []
    # a later update goes back to lane 0
    out = feed(core, [replace(wl, cid="c3", version="v3")])
    assert [(s.lane, s.workload.version) for s in of(out, StartReplica)] == [(0, "v3")]


def test_the_next_slot_waits_until_the_lower_slot_runs_the_new_version() -> None:
    core, wl = running(1)
    feed(core, [status(wl, 0, 0, "v1")])
    out = feed(core, [v2(wl)])
    assert of(out, StartReplica) == []  # slot 0 first
    out = feed(core, [status(wl, 0, 0, "v2", state="starting")])
    assert of(out, StartReplica) == []  # not running yet
    out = feed(core, [status(wl, 0, 0, "v2")])
    assert [(s.slot, s.lane, s.workload.version) for s in of(out, StartReplica)] == [(1, 1, "v2")]


def test_a_version_that_does_not_run_within_the_bound_is_stopped_and_the_old_one_kept() -> None:
    core, wl = running(0)
    free = core.free_capacity()
    feed(core, [v2(wl)])
    out = core.handle(Tick(CLOSE + U - 1))
    assert of(out, StopReplica) == []
    out = core.handle(Tick(CLOSE + U + 1))
    assert [(s.lane, s.reason) for s in of(out, StopReplica)] == [(1, "update-failed")]
    st = my_statuses(out)
    assert [(s.state, s.version, s.failed_version) for s in st] == [("running", "v1", "v2")]
    assert "not serving within 60 s" in (st[0].message or "")
    assert core.replicas() == {(wl.uri, 0): "running"}
    assert core.free_capacity() == free
    # and it is not tried again for this version
    out = core.handle(Tick(CLOSE + 3 * U))
    assert of(out, StartReplica) == []


def test_a_version_that_cannot_start_fails_at_once_with_the_reason() -> None:
    core, wl = running(0)
    feed(core, [v2(wl)])
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "exited", 3, lane=1))
    assert [(s.lane, s.reason) for s in of(out, StopReplica)] == [(1, "update-failed")]
    (st,) = my_statuses(out)
    assert st.failed_version == "v2" and "exited with code 3" in (st.message or "")


def test_a_failed_version_stops_the_rollout_on_the_other_slots() -> None:
    core, wl = running(1)
    feed(core, [status(wl, 0, 0, "v1", failed="v2")])
    out = feed(core, [v2(wl)])
    assert of(out, StartReplica) == []
    # the owner rolls the record back (or on to another version): that one rolls
    out = feed(core, [replace(wl, cid="c3", version="v3")])
    assert of(out, StartReplica) == []  # slot 0 runs v1, not v3: its turn first
    out = feed(core, [status(wl, 0, 0, "v3")])
    assert [s.workload.version for s in of(out, StartReplica)] == ["v3"]


def test_a_rolled_back_record_clears_the_failure_from_the_status() -> None:
    core, wl = running(0)
    feed(core, [v2(wl)])
    core.handle(ReplicaStateChanged(wl.uri, 0, "failed", lane=1))
    out = feed(core, [replace(wl, cid="c3")])  # back to v1 (the rollback)
    assert of(out, StartReplica) == []
    st = my_statuses(out)
    assert [(s.version, s.failed_version) for s in st] == [("v1", "")]


def test_pausing_during_an_update_stops_both_and_resume_starts_the_new_version() -> None:
    core, wl = running(0)
    feed(core, [v2(wl)])
    out = feed(core, [replace(v2(wl), cid="c3", paused=True)])
    assert sorted((s.lane, s.reason) for s in of(out, StopReplica)) == [
        (0, "paused"),
        (1, "paused"),
    ]
    core.handle(ReplicaStateChanged(wl.uri, 0, "stopped", lane=1))
    core.handle(ReplicaStateChanged(wl.uri, 0, "stopped", lane=0))
    assert core.replicas() == {(wl.uri, 0): "paused"}
    out = feed(core, [replace(v2(wl), cid="c4", paused=False)])
    assert [(s.lane, s.workload.version) for s in of(out, StartReplica)] == [(0, "v2")]


def test_a_replica_whose_status_has_no_version_is_not_waited_for() -> None:
    core, wl = running(1)
    feed(core, [status(wl, 0, 0, "")])  # a meshletd that does not update
    out = feed(core, [v2(wl)])
    assert [s.slot for s in of(out, StartReplica)] == [1]


def test_both_lanes_adopted_after_a_restart_keep_the_record_s_version_only() -> None:
    core, wl = running(0)
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "running", lane=1, version="v0"))
    assert [(s.lane, s.reason) for s in of(out, StopReplica)] == [(1, "updated")]
    core2 = observer(0)
    wl2 = v2(wl)
    feed(core2, [*cluster_records(3), wl2, bid(wl, 0, priority=2), bid(wl, 1, priority=1)])
    core2.handle(ReplicaStateChanged(wl.uri, 0, "running", lane=0, version="v1"))
    out = core2.handle(ReplicaStateChanged(wl.uri, 0, "running", lane=1, version="v2"))
    out += core2.handle(Tick(CLOSE))
    assert [(s.lane, s.reason) for s in of(out, StopReplica)] == [(0, "updated")]
    assert of(out, StartReplica) == []


def test_the_version_ignores_what_does_not_change_what_runs() -> None:
    base = {
        "name": "web",
        "image": "registry.test/app:1",
        "resources": {"milliCpu": 100, "memoryMiB": 64},
        "replicas": 2,
        "cluster": "commune",
        "createdAt": "2026-12-04T08:00:00.000Z",
    }
    v = spec_version(base)
    assert len(v) == 16
    same = {
        **base,
        "replicas": 5,
        "paused": True,
        "name": "web2",
        "constraints": {"arch": ["amd64"]},
        "bidWindowMs": 9000,
        "createdAt": "2026-12-04T09:00:00.000Z",
        "previous": {"image": "registry.test/app:0"},
        "rollback": {"version": "x", "reason": "y"},
    }
    assert spec_version(same) == v
    assert spec_version(dict(reversed(list(base.items())))) == v  # key order does not count
    for change in (
        {"image": "registry.test/app:2"},
        {"resources": {"milliCpu": 200, "memoryMiB": 64}},
        {"env": [{"name": "A", "value": "1"}]},
        {"args": ["-v"]},
        {"ports": [{"name": "http", "containerPort": 80}]},  # a field this release lacks
    ):
        assert spec_version({**base, **change}) != v


def test_a_failed_version_in_the_status_of_a_meshlet_not_holding_the_slot_halts_nothing() -> None:
    core, wl = running(1)
    feed(core, [status(wl, 0, 0, "v2"), status(wl, 2, 0, "v1", failed="v2")])  # mesh 2: no slot
    out = feed(core, [v2(wl)])
    assert [s.workload.version for s in of(out, StartReplica)] == ["v2"]


def test_a_replica_that_restarts_starts_as_the_record_is_now() -> None:
    core, wl = running(0)
    core.handle(ReplicaStateChanged(wl.uri, 0, "exited", 1))  # on-failure: restarts later
    feed(core, [v2(wl)])
    out = core.handle(Tick(CLOSE + 5_000))
    assert [(s.lane, s.workload.version) for s in of(out, StartReplica)] == [(0, "v2")]


def test_a_slot_that_moves_away_during_its_update_stops_the_new_version_at_once() -> None:
    core, wl = running(0)
    feed(core, [v2(wl)])
    # another meshlet wins a replacement round for slot 0
    feed(core, [bid(wl, 2, round_=1, slot=0, at=CLOSE + 100)])
    out = core.handle(Tick(CLOSE + 100 + 1000 + 2000 + 1))
    stops = [(s.lane, s.reason) for s in of(out, StopReplica)]
    assert (1, "lost-slot") in stops and (0, "lost-slot") not in stops  # old: make-before-break


def test_a_version_that_never_ran_on_a_fresh_start_is_reported_failed_too() -> None:
    prev = replace(workload(replicas=1, owner_i=2), version="v1")
    wl = replace(prev, cid="c9", version="v9", image="registry.test/app:9", previous=prev)
    core = observer(0)
    feed(core, [*cluster_records(3), wl, bid(wl, 0)])
    core.handle(Tick(CLOSE))  # won: starts v9 with nothing else running (a failover, say)
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "failed"))
    (st,) = my_statuses(out)
    assert (st.state, st.failed_version) == ("starting", "v9")
    assert "could not start" in (st.message or "")
    # rolled back by the owner: the restart starts the record's version
    feed(core, [replace(wl, cid="c2", version="v1")])
    out = core.handle(Tick(CLOSE + 5_000))
    assert [s.workload.version for s in of(out, StartReplica)] == ["v1"]


def test_a_slot_whose_version_failed_restarts_the_record_s_previous_spec() -> None:
    prev = replace(workload(replicas=1, owner_i=2), version="v1", image="registry.test/app:1")
    wl = replace(prev, cid="c2", version="v2", image="registry.test/app:2", previous=prev)
    core = observer(0)
    feed(core, [*cluster_records(3), wl, bid(wl, 0)])
    out = core.handle(Tick(CLOSE))  # a failover, say: starts the record's version
    assert [s.workload.version for s in of(out, StartReplica)] == ["v2"]
    core.handle(ReplicaStateChanged(wl.uri, 0, "failed"))
    # the owner's meshlet is away: no rollback yet; the restart serves the previous spec
    out = core.handle(Tick(CLOSE + 5_000))
    assert [s.workload.image for s in of(out, StartReplica)] == ["registry.test/app:1"]
    out = core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    (st,) = my_statuses(out)
    assert (st.state, st.version, st.failed_version) == ("running", "v1", "v2")


def test_without_room_for_a_second_copy_the_slot_is_re_offered_instead() -> None:
    wl = replace(workload(replicas=1, owner_i=2, cpu=2500), version="v1")
    core = observer(0)
    feed(core, [*cluster_records(3), wl, bid(wl, 0)])
    core.handle(Tick(CLOSE))
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    out = feed(core, [v2(wl)])
    assert of(out, StartReplica) == [] and of(out, StopReplica) == []  # the old one runs on
    bids = [a.record for a in of(out, PutRecord) if isinstance(a.record, Bid)]
    assert [(b.round, b.slot, b.slots) for b in bids] == [(1, 0, 0)]  # a replacement round


def test_a_running_job_finishes_as_it_started() -> None:
    wl = replace(workload(replicas=1, owner_i=2, kind="job"), version="v1")
    core = observer(0)
    feed(core, [*cluster_records(3), wl, bid(wl, 0)])
    core.handle(Tick(CLOSE))
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    out = feed(core, [v2(wl)])
    assert of(out, StartReplica) == [] and of(out, StopReplica) == []


def test_with_a_health_check_a_replica_serves_only_once_healthy() -> None:
    from meshletd.core.versions import serving

    assert serving("running") and not serving("starting") and not serving("exited")
    assert not serving("running", "starting", checked=True)
    assert not serving("running", "unhealthy", checked=True)
    assert serving("running", "healthy", checked=True)


def test_an_update_to_an_image_the_host_refuses_is_not_started_there() -> None:
    # docs/protocol.md section 21: every observer places the slot elsewhere (the host's
    # policy refuses the record as it is now); the old version runs on until the new
    # owner runs (make-before-break, section 9).
    allow = HostPolicy(
        at_uri(mesh(0), NSID_HOST_POLICY, "self"), mesh(0), T0 - 60_000,
        image_allow=("registry.ok/**",),
    )  # fmt: skip
    wl = replace(workload(replicas=2, owner_i=2), version="v1", image="registry.ok/app:1")
    core = observer(0)
    feed(core, [*cluster_records(3), allow, wl])
    feed(core, [bid(wl, 0, priority=2), bid(wl, 1, priority=1)])
    core.handle(Tick(CLOSE))
    core.handle(ReplicaStateChanged(wl.uri, 0, "running"))
    out = feed(core, [v2(wl)])  # registry.test: refused here
    for k in range(1, 5):
        out += core.handle(Tick(CLOSE + k * 1000))
    assert of(out, StartReplica) == []
    assert of(out, StopReplica) == []
    assert core.placement()[wl.uri][0] != (0, mesh(0))
    assert core.replicas() == {(wl.uri, 0): "running"}
