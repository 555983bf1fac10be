"""meshletd as a real `Type=notify` service, with the unit from systemd/, in a booted host."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.system.hostenv import LocalHost, NspawnHost, host_kind
from tests.system.meshletd_unit import UNIT, VENV, install_meshletd_unit, remove_meshletd_unit

CTL = f"{VENV}/meshletctl"

# Port 0: the hosts share this machine's network, other test runs may hold any fixed port.
CONFIG = """
did = "did:plc:alicemesh"
owner = "did:plc:alice"
pds = "http://127.0.0.1:1"
backend = "memory"
[[clusters]]
name = "friends"
members = ["did:plc:bob"]
[listen]
xrpc = "127.0.0.1:0"
"""

# A short watchdog keeps the stall test quick.
EXTRA = """
WatchdogSec=3s
RestartSec=1s
"""

pytestmark = pytest.mark.skipif(
    host_kind() == "local", reason="installs a unit and /etc/meshlet: booted test hosts only"
)

Host = NspawnHost | LocalHost


def write(host: Host, path: str, text: str) -> None:
    host.run("sh", "-c", f"cat > {path}", input=text, check=True)


def show(host: Host, *props: str) -> dict[str, str]:
    out = host.run("systemctl", "show", UNIT, "-p", ",".join(props), check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def host(systemd_host: Host) -> Iterator[Host]:
    h = systemd_host
    install_meshletd_unit(h, extra=EXTRA)
    write(h, "/etc/meshlet/meshlet.toml", CONFIG)
    yield h
    h.run("systemctl", "stop", UNIT)
    remove_meshletd_unit(h)


@pytest.fixture
def running(host: Host) -> Host:
    host.run("systemctl", "reset-failed", UNIT)
    start = host.run("systemctl", "start", UNIT)
    assert start.returncode == 0, (
        start.stderr + host.run("journalctl", "-u", UNIT, "-n", "30").stdout
    )
    return host


def test_systemctl_start_returns_once_the_control_socket_answers(running: Host) -> None:
    # No sleep: Type=notify means `systemctl start` came back after READY=1.
    status = running.run(CTL, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["did"] == "did:plc:alicemesh"
    props = show(running, "ActiveState", "Type", "StatusText", "WatchdogUSec")
    assert props["ActiveState"] == "active" and props["Type"] == "notify"
    assert "1 member" in props["StatusText"]


def test_the_control_socket_belongs_to_group_meshlet(running: Host) -> None:
    stat = running.run("stat", "-c", "%a %U %G", "/run/meshlet/control.sock", check=True)
    assert stat.stdout.split() == ["660", "root", "meshlet"]
    as_member = running.run(CTL, "status", "--json", user="meshlet")
    assert as_member.returncode == 0, as_member.stderr
    refused = running.run(CTL, "drain", user="meshlet")
    assert refused.returncode == 6 and "admin group" in refused.stderr
    outsider = running.run(CTL, "status", user="nobody")
    assert outsider.returncode == 6 and "permission denied" in outsider.stderr


def test_a_stalled_event_loop_is_restarted_by_the_watchdog(running: Host) -> None:
    before = show(running, "MainPID", "NRestarts")
    running.run("kill", "-STOP", before["MainPID"], check=True)

    def restarted() -> bool:
        now = show(running, "MainPID", "ActiveState", "NRestarts")
        return (
            now["ActiveState"] == "active"
            and now["MainPID"] not in ("0", before["MainPID"])
            and int(now["NRestarts"]) > int(before["NRestarts"])
        )

    wait_for(restarted, 30, "systemd to restart the stalled meshletd")
    journal = running.run("journalctl", "-u", UNIT, "--no-pager", check=True).stdout
    assert "Watchdog timeout" in journal
    assert running.run(CTL, "status").returncode == 0


def test_sigterm_stops_it_cleanly_without_a_restart(running: Host) -> None:
    before = show(running, "MainPID", "NRestarts")
    running.run("kill", "-TERM", before["MainPID"], check=True)
    wait_for(lambda: show(running, "ActiveState")["ActiveState"] == "inactive", 20, "stop")
    after = show(running, "Result", "NRestarts", "ExecMainStatus")
    assert after["Result"] == "success" and after["ExecMainStatus"] == "0"
    assert after["NRestarts"] == before["NRestarts"]
    journal = running.run("journalctl", "-u", UNIT, "-n", "20", "--no-pager").stdout
    assert "stopping (replicas keep running" in journal
    assert running.run("test", "-e", "/run/meshlet/control.sock").returncode != 0


def test_reload_applies_a_new_member_list(running: Host) -> None:
    write(
        running,
        "/etc/meshlet/meshlet.toml",
        CONFIG.replace('["did:plc:bob"]', '["did:plc:bob", "did:plc:carol"]'),
    )
    try:
        assert running.run("systemctl", "reload", UNIT).returncode == 0
        wait_for(
            lambda: json.loads(running.run(CTL, "status", "--json").stdout)["members"] == 2,
            10,
            "the reload",
        )
    finally:
        write(running, "/etc/meshlet/meshlet.toml", CONFIG)


def test_a_config_error_names_the_key_and_file_in_the_journal(host: Host) -> None:
    write(host, "/etc/meshlet/meshlet.toml", CONFIG + "\n[contribution]\nmemory_mb = 1\n")
    try:
        host.run("systemctl", "stop", UNIT)
        host.run("systemctl", "reset-failed", UNIT)
        assert host.run("systemctl", "start", UNIT).returncode != 0
        journal = host.run("journalctl", "-u", UNIT, "-n", "40", "--no-pager").stdout
        assert "/etc/meshlet/meshlet.toml: contribution.memory_mb: unknown key" in journal
    finally:
        write(host, "/etc/meshlet/meshlet.toml", CONFIG)
        host.run("systemctl", "reset-failed", UNIT)
