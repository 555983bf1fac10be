"""dev/chaos's invariant checker (dev/lib/chaos_check.py) over hand-made observations: each
invariant of issue 14 flags what breaks it and lets the protocol's own moves pass."""

from __future__ import annotations

from chaos_check import (
    Applied,
    Completion,
    Final,
    HostView,
    Replica,
    Snapshot,
    Status,
    Workload,
    check,
    daemon_exits,
    failovers,
    jobs,
    lost_writes,
    over_replication,
    pct,
    recovery,
    replica_disturbances,
)
from chaos_plan import Bounds, Fault

SVC = "at://did:plc:alice/commune.scheduler.workload/svc"
JOB = "at://did:plc:bob/commune.scheduler.workload/job"
PEOPLE = ("alice", "bob", "carol")
B = Bounds(reachable_s=10, lease_valid_s=12, start_s=5)


def rep(uri: str = SVC, slot: int = 0, since: float = 1.0, cid: str = "c1") -> Replica:
    return Replica(f"meshlet-x-{uri[-3:]}-{slot}-tag.service", uri, slot, since, cid, "s")


def snap(
    t: float, runs: dict[str, list[Replica]], *, down: tuple[str, ...] = (), **kw: int
) -> Snapshot:
    hosts = {}
    for p in PEOPLE:
        if p in down:
            hosts[p] = HostView(p, ok=False)
        else:
            hosts[p] = HostView(
                p,
                True,
                boot=kw.get(f"{p}_boot", 1),
                daemon_pid=kw.get(f"{p}_pid", 100),
                daemon_restarts=kw.get(f"{p}_restarts", 0),
                daemon_state="active",
                replicas=tuple(runs.get(p, [])),
            )
    return Snapshot(t, hosts)


SERVICE = Workload(SVC, "alice", 1, False, created=0.0)


def test_a_slot_on_two_meshlets_beyond_the_bound_is_a_violation_within_it_is_not() -> None:
    snaps = [snap(t, {"alice": [rep()], "bob": [rep(cid="c2")]}) for t in range(100, 131, 10)]
    worst, v = over_replication(snaps, [SERVICE], bound_s=92, t0=0)
    assert worst == 30 and v == []
    worst, v = over_replication(snaps, [SERVICE], bound_s=20, t0=0)
    assert len(v) == 1 and "two meshlets for 30.0 s" in v[0].what


def test_a_slot_that_runs_again_within_the_bound_passes_one_that_does_not_fails() -> None:
    off = Applied(Fault(50, "power-off", "alice", duration=30), began=150, healed=190)
    fast = [
        snap(140, {"alice": [rep()]}),
        snap(152, {}, down=("alice",)),
        snap(158, {"bob": [rep(since=156, cid="c2")]}, down=("alice",)),
        snap(162, {"bob": [rep(since=156, cid="c2")]}, down=("alice",)),
    ]
    times, v = recovery(fast, [off], [SERVICE], {}, [], B, t0=0)
    assert v == [] and times[0][1] == 8
    slow = [*fast[:2], snap(162, {}, down=("alice",)), snap(170, {"bob": [rep(since=168)]})]
    times, v = recovery(slow, [off], [SERVICE], {}, [], B, t0=0)
    assert len(v) == 1 and "1 slot(s) not running" in v[0].what


def test_failover_is_timed_from_the_power_off_to_systemds_activation_elsewhere() -> None:
    off = Applied(Fault(50, "power-off", "alice", duration=30), began=150, healed=190)
    snaps = [
        snap(149, {"alice": [rep()]}),
        snap(155, {"bob": [rep(since=154.5, cid="c2")]}, down=("alice",)),
    ]
    samples, missing = failovers(snaps, [off], {})
    assert samples == [4.5] and missing == []
    samples, missing = failovers(snaps[:1], [off], {})
    assert samples == [] and len(missing) == 1
    # deleted by its owner before anyone ran it again: no failover to time
    gone = Workload(SVC, "alice", 1, False, 0.0, deleted=152.0)
    assert failovers(snaps[:1], [off], {}, [gone]) == ([], [])


def test_a_scheduled_kill_explains_a_daemon_restart_an_unscheduled_one_is_a_crash() -> None:
    kill = Applied(Fault(10, "kill-daemon", "bob"), began=110, healed=110)
    snaps = [snap(108, {}), snap(112, {}, bob_pid=200, bob_restarts=1)]
    assert daemon_exits(snaps, [kill], t0=0) == []
    v = daemon_exits(snaps, [], t0=0)
    assert len(v) == 1 and "meshletd on bob exited unscheduled" in v[0].what
    # a power-off is a new boot: its new meshletd is no crash
    rebooted = [snap(108, {}), snap(112, {}, bob_pid=300, bob_boot=2)]
    assert daemon_exits(rebooted, [], t0=0) == []


def test_a_replica_restarted_or_stopped_for_no_reason_is_flagged() -> None:
    restarted = [snap(10, {"alice": [rep()]}), snap(12, {"alice": [rep(since=11.5, cid="c9")]})]
    v = replica_disturbances(restarted, [SERVICE], t0=0)
    assert len(v) == 1 and "restarted" in v[0].what
    stopped = [snap(10, {"alice": [rep()]}), snap(12, {})]
    v = replica_disturbances(stopped, [SERVICE], t0=0)
    assert len(v) == 1 and "stopped" in v[0].what


def test_a_stop_by_the_owner_a_protocol_move_a_job_exit_or_a_power_off_is_no_violation() -> None:
    deleted = Workload(SVC, "alice", 1, False, created=0.0, deleted=11.0)
    assert replica_disturbances([snap(10, {"alice": [rep()]}), snap(12, {})], [deleted], 0) == []
    moved = [
        snap(10, {"alice": [rep()]}),
        snap(12, {"alice": [rep()], "bob": [rep(cid="c2")]}),
        snap(14, {"bob": [rep(cid="c2")]}),
    ]
    assert replica_disturbances(moved, [SERVICE], 0) == []
    job = Workload(JOB, "bob", 1, True, created=0.0)
    assert replica_disturbances([snap(10, {"bob": [rep(JOB)]}), snap(12, {})], [job], 0) == []
    rebooted = [snap(10, {"alice": [rep()]}), snap(40, {}, alice_boot=2)]
    assert replica_disturbances(rebooted, [SERVICE], 0) == []


def test_a_job_must_complete_and_never_start_again_after_its_completion_was_published() -> None:
    job = Workload(JOB, "bob", 1, True, created=0.0)
    done, v = jobs([job], [Completion(JOB, "c1", 30)], None, end=600, job_s=15, t0=0)
    assert done == {JOB: 30} and v == []
    _, v = jobs([job], [], None, end=600, job_s=15, t0=0)
    assert len(v) == 1 and "never ran to completion" in v[0].what
    # its succeeded status counts as completion when the report got lost
    final = Final(frozenset({JOB}), (Status("bob", JOB, 0, "succeeded"),))
    _, v = jobs([job], [], final, end=600, job_s=15, t0=0)
    assert v == []
    # two copies that both ran before the completion was published: at least once, a note
    ran = [snap(20, {"bob": [rep(JOB, since=10)], "carol": [rep(JOB, since=25, cid="c2")]})]
    twice = [Completion(JOB, "c1", 30), Completion(JOB, "c2", 31)]
    notes: list[str] = []
    _, v = jobs([job], twice, None, 600, 15, 0, ran, {JOB: 32.0}, notes)
    assert v == [] and notes == ["jobs completed by two or more containers (at least once): 1"]
    # a copy started after the completion was published is a violation
    again = [*ran, snap(50, {"alice": [rep(JOB, since=45, cid="c3")]})]
    _, v = jobs([job], twice, None, 600, 15, 0, again, {JOB: 32.0})
    assert len(v) == 1 and "started again on alice 13.0 s after" in v[0].what


def test_lost_writes_are_records_meshletd_meant_to_write_that_are_missing() -> None:
    last = snap(600, {"alice": [rep()]})
    good = Final(frozenset({SVC}), (Status("alice", SVC, 0, "running"),))
    assert lost_writes(last, [SERVICE], {}, good, 600, 0) == []
    no_status = Final(frozenset({SVC}), ())
    v = lost_writes(last, [SERVICE], {}, no_status, 600, 0)
    assert len(v) == 1 and "alice runs svc#0 but its status says nothing" in v[0].what
    no_record = Final(frozenset(), (Status("alice", SVC, 0, "running"),))
    assert len(lost_writes(last, [SERVICE], {}, no_record, 600, 0)) == 1
    deleted = Workload(SVC, "alice", 1, False, 0.0, deleted=300.0)
    leftover = Final(frozenset(), (Status("bob", SVC, 0, "running"),))
    v = lost_writes(snap(600, {}), [deleted], {}, leftover, 600, 0)
    assert len(v) == 1 and "status of deleted" in v[0].what
    # a stop that failed (its PDS was down) is no lost write if the record stayed
    failed = Workload(SVC, "alice", 1, False, 0.0, deleted=300.0, stop_failed=True)
    assert lost_writes(snap(600, {}), [failed], {}, Final(frozenset({SVC}), ()), 600, 0) == []


# alice is powered off at 150 s; her replica runs again on bob from 154 s
OFF = Applied(Fault(50, "power-off", "alice", duration=30), began=150, healed=190)
FAILED_OVER = [
    snap(140, {"alice": [rep()]}),
    snap(156, {"bob": [rep(since=154, cid="c2")]}, down=("alice",)),
    snap(200, {"bob": [rep(since=154, cid="c2")]}, alice_boot=2),
]
RUN = {"nat": [], "bounds": B, "t0": 0, "end": 200, "job_s": 15}


def test_check_reports_a_clean_run_as_clean() -> None:
    final = Final(frozenset({SVC}), (Status("bob", SVC, 0, "running", 1),))
    r = check(FAILED_OVER, [SERVICE], [OFF], [], final, **RUN)  # type: ignore[arg-type]
    assert r.violations == [] and r.failovers == [4] and r.lost_writes == 0
    assert r.daemon_crashes == 0


def test_a_workload_whose_stop_failed_and_lived_on_is_checked_as_live() -> None:
    # The owner's `meshletctl stop` failed at 100 s (its PDS was cut): the record stayed, the
    # replica ran on, and its failover after alice's power-off is timed like any other.
    failed = Workload(SVC, "alice", 1, False, 0.0, deleted=100.0, stop_failed=True)
    stayed = Final(frozenset({SVC}), (Status("bob", SVC, 0, "running", 1),))
    r = check(FAILED_OVER, [failed], [OFF], [], stayed, **RUN)  # type: ignore[arg-type]
    assert r.failovers == [4] and r.violations == []
    assert any("stop failed and that lived on" in n for n in r.notes)
    # ...and had it never run again, that would be a violation, as for any live workload
    r = check(FAILED_OVER[:1], [failed], [OFF], [], stayed, **RUN)  # type: ignore[arg-type]
    assert any("never ran again" in v.what for v in r.violations)
    # The delete landed after all (the record is gone): deleted from the failed stop on.
    gone = Final(frozenset(), ())
    r = check(FAILED_OVER[:1], [failed], [OFF], [], gone, **RUN)  # type: ignore[arg-type]
    assert r.failovers == [] and r.violations == []


def test_percentiles_are_nearest_rank() -> None:
    assert pct([], 50) is None
    assert pct([3.0, 1.0, 2.0], 50) == 2.0
    assert pct([float(i) for i in range(1, 101)], 99) == 99.0


def test_a_saved_run_loads_back_as_it_was_observed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from chaos_run import Record

    off = Applied(Fault(50, "power-off", "alice", duration=30), began=150, healed=190)
    rec = Record(
        [snap(140, {"alice": [rep()]}), snap(156, {}, down=("alice",))],
        [SERVICE, Workload(JOB, "bob", 1, True, 1.0, 9.0, True)],
        [off],
        [Completion(JOB, "c1", 30)],
        Final(frozenset({SVC}), (Status("bob", SVC, 0, "running", 1),)),
        ["dave"],
        B,
        0.0,
        200.0,
        [],
        {"seed": 1, "hosts": 3, "minutes": 3},
    )
    path = tmp_path / "run.json"
    rec.save(str(path))
    assert Record.load(str(path)) == rec
