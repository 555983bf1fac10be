"""Booted hosts on networks of their own (dev/hostenv): each host its own namespace and
address on this run's bridge, the faults tests inject (NAT, one-way link cuts, a cut to one
port of the gateway), and teardown that leaves nothing of the network behind."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.hostenv import (
    HOSTENV,
    HOSTENV_RUN,
    NspawnHost,
    build,
    host_kind,
    nspawn_available,
    remove_stale_hosts,
    unique_name,
)

pytestmark = pytest.mark.skipif(
    host_kind() == "local" or not nspawn_available(), reason="needs hosts booted by dev/hostenv"
)

# A TCP server (answers each connection with the caller's address and closes) and a UDP
# receiver (appends what arrives to a file), run inside a host as transient units.
TCP_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen()
while True:
    c, a = s.accept(); c.sendall(a[0].encode()); c.close()
"""
UDP_RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, a = s.recvfrom(100)
    with open(sys.argv[2], "a") as f: f.write(data.decode() + "\\n")
"""
CONNECT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(c.recv(100).decode())
except OSError as e:
    print("failed:", type(e).__name__); sys.exit(1)
"""
SEND_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"""
REACH = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)"
# The gateway answers (a refusal is an answer: its MAC address is right), within 2 s.
GATEWAY_ANSWERS = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=2)
except ConnectionRefusedError:
    pass
"""
PORT = 7070


@pytest.fixture(scope="module")
def pair(hostenv_network: str) -> Iterator[tuple[NspawnHost, NspawnHost]]:
    """Two hosts on this run's network, each with a TCP server and a UDP receiver."""
    remove_stale_hosts()
    build()
    a, b = NspawnHost.boot(unique_name("net-a"), unique_name("net-b"))
    try:
        for host in (a, b):
            host.run("systemd-run", "--unit=tcp-echo", "python3", "-c", TCP_SERVER, str(PORT))
            host.run(
                "systemd-run", "--unit=udp-recv", "python3", "-c", UDP_RECEIVER, str(PORT),
                "/run/udp.log",
            )  # fmt: skip
        for host in (a, b):
            deadline = time.monotonic() + 30
            while f":{PORT} " not in host.run("ss", "-ltn").stdout:
                assert time.monotonic() < deadline, f"the TCP server on {host.name} did not start"
                time.sleep(0.2)
        yield a, b
    finally:
        NspawnHost.shutdown(a, b)


def connect(host: NspawnHost, address: str, port: int = PORT, timeout: float = 2) -> str | None:
    """What a TCP server at address:port answers `host` (its view of host's address)."""
    done = host.run("python3", "-c", CONNECT, address, str(port), str(timeout))
    return done.stdout.strip() if done.returncode == 0 else None


def udp_received(host: NspawnHost, sender: NspawnHost, marker: str) -> bool:
    # A datagram dropped on its way out fails with EPERM at the sender: that is the cut.
    sender.run("python3", "-c", SEND_UDP, host.address, str(PORT), marker)
    time.sleep(0.5)
    return marker in host.run("cat", "/run/udp.log").stdout


def test_each_host_has_its_own_address_and_reaches_the_others_and_the_gateway(
    pair: tuple[NspawnHost, NspawnHost], hostenv_network: str
) -> None:
    a, b = pair
    assert a.address != b.address
    assert a.address.rsplit(".", 1)[0] == hostenv_network.rsplit(".", 1)[0]
    inside = a.run("ip", "-4", "-o", "addr", "show", "dev", "eth0", check=True).stdout
    assert f"inet {a.address}/24" in inside
    # Each sees the other's real address (no loopback, no translation between them).
    assert connect(a, b.address) == a.address
    assert connect(b, a.address) == b.address
    # A server of this machine on the gateway (where the PLC and PDSes listen) is reachable.
    with socket.socket() as server:
        server.bind((hostenv_network, 0))
        server.listen()
        port = server.getsockname()[1]

        def answer() -> None:
            c, addr = server.accept()
            c.sendall(addr[0].encode())
            c.close()

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        assert connect(a, hostenv_network, port) == a.address
        t.join(5)
    # Loopback is the host's own: b's server is not on a's 127.0.0.1 unless a runs one too.
    assert connect(a, "127.0.0.1") == "127.0.0.1"  # a's own server, not b's


def test_rootless_podman_in_a_host_reaches_the_network_through_slirp4netns(
    pair: tuple[NspawnHost, NspawnHost],
) -> None:
    a, b = pair
    got = a.run(
        "podman", "run", "--rm", "localhost/busybox:latest", "nc", "-w", "3", b.address,
        str(PORT), user="meshlet", timeout=60,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    # slirp4netns connects from the host's own address.
    assert got.stdout.strip() == a.address


def test_a_host_behind_nat_connects_out_from_its_public_address_and_takes_nothing_in(
    pair: tuple[NspawnHost, NspawnHost],
) -> None:
    a, b = pair
    a.behind_nat()
    try:
        assert a.faults() == ["nat"]
        assert connect(a, b.address) == a.public_address  # masqueraded
        assert connect(b, a.address) is None  # no inbound
        assert connect(b, a.public_address) is None
        assert not udp_received(a, b, "to-nat")
        # Its containers still go out (slirp4netns, then the NAT).
        got = a.run(
            "podman", "run", "--rm", "localhost/busybox:latest", "nc", "-w", "3", b.address,
            str(PORT), user="meshlet", timeout=60,
        )  # fmt: skip
        assert got.stdout.strip() == a.public_address, got.stderr
    finally:
        a.heal()
    assert a.faults() == []
    assert connect(b, a.address) == b.address
    assert a.public_address not in a.run("ip", "-4", "-o", "addr", check=True).stdout


def test_a_cut_link_drops_one_way_and_heals(pair: tuple[NspawnHost, NspawnHost]) -> None:
    a, b = pair
    a.cut_link(b)
    try:
        assert a.faults() == [f"cut-to-{b.name}"]
        assert b.faults() == []
        assert not udp_received(b, a, "a-to-b")
        assert udp_received(a, b, "b-to-a")  # the other way still carries
        assert connect(a, b.address) is None
    finally:
        a.heal()
    assert connect(a, b.address) == a.address
    a.cut_link(b, both=True)
    try:
        assert b.faults() == [f"cut-to-{a.name}"]
        assert not udp_received(a, b, "b-to-a-cut")
    finally:
        a.heal()
        b.heal()
    assert udp_received(a, b, "b-to-a-healed")


def test_a_cut_port_drops_only_that_port_of_the_gateway(
    pair: tuple[NspawnHost, NspawnHost], hostenv_network: str
) -> None:
    a, b = pair
    servers = [socket.create_server((hostenv_network, 0)) for _ in range(2)]
    try:
        cut, kept = (s.getsockname()[1] for s in servers)
        a.cut_port(cut)
        try:
            assert a.faults() == [f"cut-port-{cut}"]
            reach = REACH
            assert a.run("python3", "-c", reach, hostenv_network, str(cut)).returncode != 0
            assert a.run("python3", "-c", reach, hostenv_network, str(kept)).returncode == 0
            assert b.run("python3", "-c", reach, hostenv_network, str(cut)).returncode == 0
        finally:
            a.heal()
        assert a.run("python3", "-c", reach, hostenv_network, str(cut)).returncode == 0
    finally:
        for s in servers:
            s.close()


def test_status_shows_each_hosts_address_and_faults(pair: tuple[NspawnHost, NspawnHost]) -> None:
    a, b = pair
    a.behind_nat()
    try:
        status = subprocess.run(
            [str(HOSTENV), "status"], capture_output=True, text=True, check=True
        ).stdout
    finally:
        a.heal()
    rows = {line.split()[0]: line.split() for line in status.splitlines() if line.strip()}
    assert rows[a.name][3] == a.address and rows[a.name][5:] == ["nat"]
    assert rows[b.name][3] == b.address and rows[b.name][5:] == ["-"]


def _hostenv(env: dict[str, str], *args: str) -> str:
    """dev/hostenv ARGS as the owner `env` names (a network of the test's own)."""
    return subprocess.run(
        [str(HOSTENV), *args], env=env, capture_output=True, text=True, check=True, timeout=180
    ).stdout


def _leftovers(net: int, names: list[str]) -> dict[str, object]:
    links = json.loads(subprocess.check_output(["ip", "-j", "link"], text=True))
    netns = subprocess.check_output(["ip", "netns", "list"], text=True)
    routes = subprocess.check_output(["ip", "route"], text=True)
    return {
        "links": [i["ifname"] for i in links if i["ifname"] == f"mhb{net}" or
                  i["ifname"].startswith(f"mhv{net}x")],
        "netns": [n for n in names if f"mh-{n}" in netns],
        "routes": [r for r in routes.splitlines() if f"10.251.{net}." in r],
        "state": [p.name for p in (HOSTENV_RUN / ".net").glob(f"{net}")]
        + [n for n in names if (HOSTENV_RUN / n).exists()],
    }  # fmt: skip


def test_teardown_leaves_no_namespace_link_table_or_route() -> None:
    """A network of its own (another owner: this test's child), two hosts with faults in
    force, powered off (one abruptly), then the network removed: nothing is left."""
    owner = subprocess.Popen(["sleep", "600"])  # the owner of the network under test
    env = {**os.environ, "MESHLET_HOSTENV_OWNER": str(owner.pid)}
    names = [unique_name("net-td1"), unique_name("net-td2")]

    hostenv = functools.partial(_hostenv, env)

    try:
        net = int(hostenv("net", "up").split()[0].split("=")[1])
        hostenv("up", *names)
        hostenv("fault", names[0], "nat")
        hostenv("fault", names[0], "cut", names[1], "--both")
        hostenv("fault", names[1], "cut-port", "9")
        assert _leftovers(net, names)["netns"] == names
        hostenv("down", "--abrupt", names[0])
        hostenv("down", names[1])
        hostenv("net", "down", str(net))
        assert _leftovers(net, names) == {"links": [], "netns": [], "routes": [], "state": []}
        # And `down --stale` removes the network of an owner that died, with its hosts.
        net = int(hostenv("net", "up").split()[0].split("=")[1])
        hostenv("up", names[0])
        hostenv("fault", names[0], "nat")
    finally:
        owner.kill()
        owner.wait()
    remove_stale_hosts()
    assert _leftovers(net, names) == {"links": [], "netns": [], "routes": [], "state": []}


def test_a_host_coming_or_going_leaves_the_gateway_where_the_others_reach_it() -> None:
    """The gateway (where the PLC and the PDSes listen) keeps its MAC address while hosts
    boot and power off: the others' ARP entries stay right, so a host's power-off never
    cuts the rest from their PDS (it did for 15-45 s when the bridge took a port's MAC)."""
    owner = subprocess.Popen(["sleep", "600"])
    env = {**os.environ, "MESHLET_HOSTENV_OWNER": str(owner.pid)}
    names = [unique_name("net-gw1"), unique_name("net-gw2"), unique_name("net-gw3")]

    hostenv = functools.partial(_hostenv, env)

    def bridge_mac(net: int) -> str:
        return (Path("/sys/class/net") / f"mhb{net}" / "address").read_text().strip()

    try:
        net = int(hostenv("net", "up").split()[0].split("=")[1])
        gateway, mac = f"10.251.{net}.1", bridge_mac(net)
        hostenv("up", *names)
        assert bridge_mac(net) == mac  # three ports came
        for name in names[1:]:
            hostenv("exec", name, "--", "python3", "-c", GATEWAY_ANSWERS, gateway)
        for name in names[:2]:  # whichever port's MAC a bridge would have taken goes
            hostenv("down", "--abrupt", name)
        assert bridge_mac(net) == mac
        neigh = hostenv("exec", names[2], "--", "ip", "neigh", "show", gateway)
        assert mac in neigh, neigh
        hostenv("exec", names[2], "--", "python3", "-c", GATEWAY_ANSWERS, gateway)  # at once
    finally:
        for name in names:
            subprocess.run([str(HOSTENV), "down", name], env=env, capture_output=True)
        owner.kill()
        owner.wait()
        remove_stale_hosts()
