"""Small pure helpers of the real machine adapter (no D-Bus, no podman)."""

from __future__ import annotations

import os
from pathlib import Path

from meshletd.runtime.dbus import to_dbus as _b
from meshletd.runtime.systemd import _proc_cpu_ns, detect_cgroup_v2


def test_unit_properties_are_turned_into_the_bytes_pystemd_sends() -> None:
    props = {"ExecStart": [("/usr/bin/podman", ["/usr/bin/podman", "run"], False)], "N": 3}
    assert _b(props["ExecStart"]) == [(b"/usr/bin/podman", [b"/usr/bin/podman", b"run"], False)]
    assert _b(props["N"]) == 3 and _b("x") == b"x"


def test_cpu_time_of_a_cgroup_adds_up_its_processes(tmp_path: Path) -> None:
    procs = tmp_path / "cgroup.procs"
    sum(i * i for i in range(300_000))  # spend a little CPU in this process
    procs.write_text(f"{os.getpid()}\n999999999\n")  # a vanished pid is skipped
    assert _proc_cpu_ns(procs) > 0
    assert _proc_cpu_ns(tmp_path / "missing") == 0


def test_a_hybrid_cgroup_layout_counts_as_v1(tmp_path: Path) -> None:
    assert not detect_cgroup_v2(str(tmp_path))
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    assert detect_cgroup_v2(str(tmp_path))


def test_a_podman_call_has_ended_only_once_its_unit_ran_and_stopped() -> None:
    from meshletd.runtime.outcome import UnitSnapshot
    from meshletd.runtime.podman_call import call_ended as _call_ended

    loaded = {"name": "u", "load_state": "loaded"}
    # StartTransientUnit returned, the start job has not run yet: inactive but not ended.
    assert not _call_ended(UnitSnapshot(**loaded, job_pending=True))
    assert not _call_ended(UnitSnapshot(**loaded, active_state="active", sub_state="running"))
    assert _call_ended(UnitSnapshot(**loaded, active_state="inactive", sub_state="dead"))
    assert _call_ended(UnitSnapshot(**loaded, active_state="failed", sub_state="failed"))
    # RemainAfterExit (a user manager's calls): active/exited is the end.
    assert _call_ended(UnitSnapshot(**loaded, active_state="active", sub_state="exited"))
    assert _call_ended(UnitSnapshot("u"))  # gone
