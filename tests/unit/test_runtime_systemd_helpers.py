"""Small pure helpers of the real machine adapter (no D-Bus, no podman)."""

from __future__ import annotations

import os
from pathlib import Path

from meshletd.runtime.systemd import _b, _proc_cpu_ns, detect_cgroup_v2


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
