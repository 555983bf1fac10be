"""How the runtime reads an ended unit: exit code, OOM kill, failure to start, stop."""

from __future__ import annotations

from meshletd.runtime.events import (
    ReplicaExited,
    ReplicaFailed,
    ReplicaOomKilled,
    ReplicaStopped,
    ReplicaUsage,
)
from meshletd.runtime.outcome import (
    CLD_EXITED,
    CLD_KILLED,
    ContainerSnapshot,
    UnitSnapshot,
    end_event,
    oom_killed_from_counters,
    peak_memory_from_counters,
    unit_phase,
)
from meshletd.runtime.spec import ReplicaId

R = ReplicaId("did:plc:x", "w", 0)


def snap(**kw: object) -> UnitSnapshot:
    base = {"name": "u.service", "load_state": "loaded"}
    base.update(kw)
    return UnitSnapshot(**base)  # type: ignore[arg-type]


def test_unit_phases() -> None:
    assert unit_phase(UnitSnapshot("u")) == "gone"
    assert unit_phase(snap(active_state="activating", sub_state="start")) == "starting"
    assert unit_phase(snap(active_state="active", sub_state="running")) == "running"
    assert unit_phase(snap(active_state="active", sub_state="exited")) == "ended"
    assert unit_phase(snap(active_state="failed", sub_state="failed")) == "ended"
    assert unit_phase(snap(active_state="deactivating", sub_state="stop")) == "stopping"
    # just after StartTransientUnit the unit is still inactive, with its start job queued
    assert unit_phase(snap(active_state="inactive", sub_state="dead", job_pending=True)) == (
        "starting"
    )


def end(unit: UnitSnapshot, container: ContainerSnapshot | None = None, **kw: object):
    args = {"ran": True, "stop_requested": False, "oom_counted": False, "usage": ReplicaUsage()}
    args.update(kw)
    return end_event(R, unit, container, **args)  # type: ignore[arg-type]


def test_an_exit_code_comes_from_the_container() -> None:
    ev = end(
        snap(active_state="failed", main_code=CLD_EXITED, main_status=3),
        ContainerSnapshot("exited", 3),
    )
    assert ev == ReplicaExited(R, "u.service", 3)


def test_on_cgroup_v1_an_oom_is_exit_137_plus_the_saved_counter() -> None:
    unit = snap(active_state="failed", main_code=CLD_EXITED, main_status=137)
    counters = {"memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n"}
    assert oom_killed_from_counters(counters)
    ev = end(unit, ContainerSnapshot("exited", 137), oom_counted=True)
    assert isinstance(ev, ReplicaOomKilled)
    # a plain SIGKILL without the counter is an exit, not an OOM
    assert isinstance(end(unit, ContainerSnapshot("exited", 137)), ReplicaExited)


def test_on_cgroup_v2_systemd_says_oom_kill_itself() -> None:
    assert isinstance(end(snap(active_state="failed", result="oom-kill")), ReplicaOomKilled)
    assert oom_killed_from_counters({"memory.events": "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n"})


def test_a_unit_that_never_ran_is_a_failure_pointing_at_the_journal() -> None:
    ev = end(
        snap(active_state="failed", result="exit-code", main_code=CLD_EXITED, main_status=125),
        ran=False,
    )
    assert isinstance(ev, ReplicaFailed) and ev.error == "UnitStartFailed"
    assert "125" in ev.message and "journalctl -u u.service" in ev.message


def test_a_requested_stop_is_a_stop_whatever_the_status() -> None:
    ev = end(snap(active_state="failed", main_code=CLD_KILLED, main_status=9), stop_requested=True)
    assert isinstance(ev, ReplicaStopped)


def test_without_a_container_the_unit_status_is_used() -> None:
    assert end(snap(active_state="failed", main_code=CLD_KILLED, main_status=9)).exit_code == 137  # type: ignore[union-attr]


def test_peak_memory_is_read_from_either_cgroup_version() -> None:
    assert peak_memory_from_counters({"memory.max_usage_in_bytes": "123\n"}) == 123
    assert peak_memory_from_counters({"memory.peak": "456\n"}) == 456
    assert peak_memory_from_counters({}) == 0
