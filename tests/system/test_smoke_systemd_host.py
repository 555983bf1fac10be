"""Smoke tests of the systemd host environment (dev/hostenv) and of what meshlet needs in it:
a transient unit made with pystemd that runs a rootless podman container."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.system.hostenv import HOSTENV_RUN, HostEnvError, LocalHost, NspawnHost, host_kind

PODMAN_UNIT = "tests/system/host_scripts/podman_unit.py"
MEMORY_MAX = 64 * 1024 * 1024


def _journal(host: NspawnHost | LocalHost, unit: str) -> str:
    return host.run("journalctl", "-u", unit, "-o", "cat", "--no-pager", check=True).stdout


def test_pystemd_unit_runs_rootless_container_logs_once_and_is_gone_after_stop(
    systemd_host: NspawnHost | LocalHost,
) -> None:
    host = systemd_host
    tag = f"smoke{os.getpid()}"
    unit, container, marker = f"meshlet-{tag}.service", f"meshlet-{tag}", f"hello-from-{tag}"
    script = f"echo {marker}; exec sleep 600"

    start = host.run(
        host.python,
        PODMAN_UNIT,
        "start",
        unit,
        container,
        str(MEMORY_MAX),
        "--",
        "sh",
        "-c",
        script,
    )
    assert start.returncode == 0, start.stderr
    try:
        deadline = time.monotonic() + 30
        while marker not in _journal(host, unit):
            assert time.monotonic() < deadline, f"no '{marker}' in journalctl -u {unit}"
            time.sleep(0.1)
        # A second copy (podman's journald log driver) would land right after the first.
        time.sleep(1)
        assert _journal(host, unit).count(marker) == 1

        shown = host.run("systemctl", "show", unit, "-p", "MemoryMax,Delegate,KillMode,User")
        assert sorted(shown.stdout.split()) == sorted(
            [f"MemoryMax={MEMORY_MAX}", "Delegate=yes", "KillMode=mixed", "User=meshlet"]
        ), shown.stdout
        # The payload lives in the unit's cgroup, so the limit really applies to it.
        pid = host.run(
            "podman", "inspect", "--format", "{{.State.Pid}}", container, user="meshlet", check=True
        ).stdout.strip()
        cgroups = host.run("cat", f"/proc/{pid}/cgroup", check=True).stdout
        memory_line = next(
            line for line in cgroups.splitlines() if line.split(":")[1] in ("memory", "")
        )
        assert unit in memory_line, cgroups
    finally:
        stop = host.run(host.python, PODMAN_UNIT, "stop", unit)
    assert stop.returncode == 0, stop.stderr

    assert host.run("systemctl", "status", unit).returncode == 4  # no such unit
    ps = host.run("podman", "ps", "-a", "--format", "{{.Names}}", user="meshlet", check=True)
    assert container not in ps.stdout.split()


async def test_commands_in_the_host_pass_exit_status_output_and_project_folder_back(
    systemd_host: NspawnHost | LocalHost,
) -> None:
    done = await systemd_host.arun("sh", "-c", "pwd; echo oops >&2; exit 3")
    assert done.returncode == 3
    assert done.stdout.decode().strip() == str(Path(__file__).resolve().parents[2])
    assert done.stderr.decode().strip() == "oops"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (None: no such live process;
    a zombie has ended, only its parent has not reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields[19]


@pytest.mark.skipif(host_kind() == "local", reason="boots nspawn hosts")
def test_three_hosts_boot_at_once_run_commands_and_leave_nothing_behind() -> None:
    names = [f"trio{os.getpid()}-{i}" for i in range(3)]
    hosts = NspawnHost.boot(*names)
    try:
        for i, host in enumerate(hosts):
            done = host.run("sh", "-c", f"hostname; exit {10 + i}")
            assert (done.returncode, done.stdout.strip()) == (10 + i, host.name)
        leaders = {host.leader_pid for host in hosts}
        assert len(leaders) == 3
        leaders_started = {pid: _start_time(pid) for pid in leaders}
        hosts[0].down(abrupt=True)  # a crash: every process of it killed at once
    finally:
        NspawnHost.shutdown(*hosts)

    for name in names:
        assert not (HOSTENV_RUN / name).exists()
        assert not list(Path("/sys/fs/cgroup").glob(f"*/meshlet-hostenv/{name}"))
    cache = Path(os.environ.get("MESHLET_CACHE", "/var/cache/meshlet-dev"))
    for log in Path(os.environ.get("MESHLET_LOGDIR", cache / "logs")).glob(f"hostenv-*-{name}.log"):
        log.unlink()  # the logs of this deliberate failure
        assert name not in Path("/proc/self/mountinfo").read_text()
    for pid, started in leaders_started.items():
        # A busy machine may hand the PID to a new process: the leader is gone when no
        # process with that PID has the leader's start time.
        assert _start_time(pid) != started, f"leader {pid} of a host still runs"


@pytest.mark.skipif(host_kind() == "local", reason="boots nspawn hosts")
def test_a_host_that_fails_to_boot_names_the_step_and_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MESHLET_HOSTENV_BOOT_TIMEOUT", "0")
    name = f"noboot{os.getpid()}"
    with pytest.raises(HostEnvError, match=f"step 'boot {name}' FAILED"):
        NspawnHost(name).up()
    assert not (HOSTENV_RUN / name).exists()
    assert name not in Path("/proc/self/mountinfo").read_text()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/meshlet-hostenv/{name}"))
    cache = Path(os.environ.get("MESHLET_CACHE", "/var/cache/meshlet-dev"))
    for log in Path(os.environ.get("MESHLET_LOGDIR", cache / "logs")).glob(f"hostenv-*-{name}.log"):
        log.unlink()  # the logs of this deliberate failure
