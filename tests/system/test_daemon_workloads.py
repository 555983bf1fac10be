"""meshletd end to end in a booted host: the real systemd runtime, the real PDS.

A workload published with `meshletctl run` runs as a transient unit; restarting meshletd
leaves it running and adopts it (no duplicate); `meshletctl stop` removes it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterator

import pytest

from tests.system.hostenv import LocalHost, NspawnHost, host_kind
from tests.system.meshletd_unit import UNIT, VENV, install_meshletd_unit, remove_meshletd_unit

CTL = f"{VENV}/meshletctl"

pytestmark = pytest.mark.skipif(
    host_kind() == "local", reason="installs a unit and /etc/meshlet: booted test hosts only"
)
Host = NspawnHost | LocalHost
_n = itertools.count()


def write(host: Host, path: str, text: str, mode: str = "644") -> None:
    host.run("sh", "-c", f"cat > {path} && chmod {mode} {path}", input=text, check=True)


def ctl_json(host: Host, *args: str):
    done = host.run(CTL, *args, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def journal(host: Host, n: int = 60) -> str:
    return host.run("journalctl", "-u", UNIT, "-n", str(n), "--no-pager").stdout


@pytest.fixture(scope="module")
def host(systemd_host: Host, devnet) -> Iterator[Host]:
    h = systemd_host
    k = next(_n)
    owner = devnet.create_account(f"sysown{k}", pds=0)
    mesh = devnet.create_account(f"sysmesh{k}", pds=0)
    config = f"""
did = "{mesh.did}"
owner = "{owner.did}"
pds = "{mesh.pds_url}"
plc_url = "{devnet.plc_url}"
runtime = "systemd"
[[clusters]]
name = "home"
members = []
[contribution]
milli_cpu = 3000
memory_mib = 2048
tasks_max = 4000
max_replicas = 8
[listen]
xrpc = "127.0.0.1:0"
"""
    install_meshletd_unit(h)
    write(h, "/etc/meshlet/meshlet.toml", config)
    write(h, "/etc/meshlet/credentials/meshlet-app-password", mesh.app_password, "600")
    write(h, "/etc/meshlet/credentials/owner-app-password", owner.app_password, "600")
    h.run("systemctl", "reset-failed", UNIT)
    start = h.run("systemctl", "start", UNIT)
    assert start.returncode == 0, start.stderr + journal(h)
    yield h
    h.run("systemctl", "stop", UNIT)
    h.run("sh", "-c", "systemctl stop 'meshlet-*' 2>/dev/null; true")
    h.run("rm", "-rf", "/etc/meshlet/credentials", "/etc/meshlet/meshlet.toml")
    remove_meshletd_unit(h)


def replica_here(host: Host, name: str) -> dict | None:
    me = ctl_json(host, "status")["did"]
    for w in ctl_json(host, "workloads"):
        if w["name"] == name:
            for r in w["running"]:
                if r.get("meshletDid") == me and r["state"] == "running":
                    return r
    return None


def meshlet_units(host: Host) -> list[str]:
    out = host.run(
        "systemctl", "list-units", "--plain", "--no-legend", "--state=active", "meshlet-*"
    ).stdout
    units = [line.split()[0] for line in out.splitlines() if line.strip()]
    # The host's podman pause holder (dev/hostenv) is not a replica.
    return [u for u in units if u != "meshlet-podman-pause.service"]


def test_meshletd_caps_its_slice_with_the_contribution_and_status_shows_it(host: Host) -> None:
    shown = host.run(
        "systemctl", "show", "meshlet.slice", "-p", "CPUQuotaPerSecUSec,MemoryMax,TasksMax"
    ).stdout.split()
    assert shown == ["CPUQuotaPerSecUSec=3s", f"MemoryMax={2048 << 20}", "TasksMax=4000"], shown
    limits = ctl_json(host, "status")["limits"]
    assert limits == {
        "milliCpu": 3000,
        "memoryMiB": 2048,
        "tasksMax": 4000,
        "maxReplicas": 8,
        "enforced": True,
    }, limits


def test_a_workload_runs_survives_a_meshletd_restart_and_stops(host: Host) -> None:
    run = host.run(
        CTL,
        "run",
        "localhost/busybox:latest",
        "--name",
        "sleeper",
        "--cpu",
        "0.1",
        "--memory",
        "32Mi",
        "--",
        "sh",
        "-c",
        "echo hello-from-sleeper; exec sleep 600",
    )
    assert run.returncode == 0, run.stderr + journal(host)
    wait_for(lambda: replica_here(host, "sleeper") is not None, 60, "the replica to run")
    unit = replica_here(host, "sleeper")["unit"]
    assert host.run("systemctl", "is-active", unit).stdout.strip() == "active"

    # Its output, read from its journal by meshletd: plain lines, or with their time.
    def logged() -> bool:
        return "hello-from-sleeper" in host.run(CTL, "logs", "sleeper").stdout.splitlines()

    wait_for(logged, 30, "the replica's output in its journal")
    got = ctl_json(host, "logs", "sleeper")
    assert "hello-from-sleeper" in got["lines"] and got["cursor"]
    entry = next(e for e in got["entries"] if e["line"] == "hello-from-sleeper")
    assert entry["time"].endswith("Z")

    # meshletd stops cleanly; the replica keeps running.
    assert host.run("systemctl", "stop", UNIT).returncode == 0
    assert host.run("systemctl", "is-active", unit).stdout.strip() == "active"

    # ... and is adopted on start: same unit, no duplicate.
    start = host.run("systemctl", "start", UNIT)
    assert start.returncode == 0, start.stderr + journal(host)
    assert "1 replica(s) adopted" in journal(host)
    wait_for(lambda: replica_here(host, "sleeper") is not None, 30, "the adopted replica")
    assert replica_here(host, "sleeper")["unit"] == unit
    assert meshlet_units(host) == [unit]
    assert ctl_json(host, "status")["replicas"] == 1

    stop = host.run(CTL, "stop", "sleeper")
    assert stop.returncode == 0, stop.stderr
    wait_for(lambda: not meshlet_units(host), 60, "the replica's unit to go")


def test_a_secret_reaches_the_container_and_nothing_else(host: Host) -> None:
    value = f"s3cret-{os.getpid()}-{time.time_ns()}"
    write(host, "/root/token", value, "600")
    run = host.run(
        CTL,
        "run",
        "localhost/busybox:latest",
        "--name",
        "vault",
        "--secret",
        "token=@/root/token",
        "--",
        "sh",
        "-c",
        "sha256sum /run/secrets/token; exec sleep 600",
    )
    assert run.returncode == 0, run.stderr + journal(host)
    digest = hashlib.sha256(value.encode()).hexdigest()
    try:
        wait_for(lambda: replica_here(host, "vault") is not None, 60, "the replica to run")
        unit = replica_here(host, "vault")["unit"]
        wait_for(
            lambda: digest in host.run("journalctl", "-u", unit, "-o", "cat").stdout,
            30,
            "the container to read its secret",
        )
        # Not in the replica's unit, not in meshletd's journal, not on a command line.
        assert value not in host.run("systemctl", "show", unit).stdout
        assert value not in host.run("journalctl", "-u", UNIT, "--no-pager").stdout
        assert value not in host.run("sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
    finally:
        host.run(CTL, "stop", "vault")
        host.run("rm", "-f", "/root/token")
    wait_for(lambda: not meshlet_units(host), 60, "the replica's unit to go")
