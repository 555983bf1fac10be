"""Tenants apart from each other and from the host, on a real booted host (issue #16).

- each replica in a user namespace of its own (podman --userns=auto): two owners' replicas
  never share a uid, in the container's map or on the host;
- the network default, checked from inside a container: outbound "internet" answers, the
  LAN (a private address of another host), cloud metadata and the host's own ports do not;
  the host policy's grant "lan" opens the LAN only, "none" closes everything.

"The internet" offline: a namespace of this test's own on the hosts' bridge holds a public
(documentation, RFC 5737) address 198.51.100.7, a private address of "another host"
(10.251.N.250) and the metadata address 169.254.169.254, each serving HTTP; the booted host
gets routes to the first and the last through its link. So every address is reachable at
the IP level (the host itself reaches all three: the control), and only meshlet's rules
decide what a replica reaches.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.system.hostenv import HOSTENV_RUN, LocalHost, NspawnHost

CHECKS = "tests/system/host_scripts/tenancy_checks.py"
INTERNET, METADATA = "198.51.100.7", "169.254.169.254"
PORT, HOST_PORT = 8080, 9998


def run_check(host: NspawnHost | LocalHost, *args: str) -> dict:
    done = host.run(host.python, CHECKS, *args, timeout=600)
    if done.returncode != 0:
        host.run(host.python, "tests/system/host_scripts/runtime_checks.py", "cleanup")
        pytest.fail(f"check {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(args[0], result)
    return result


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def world(systemd_host: NspawnHost | LocalHost) -> Iterator[dict[str, str]]:
    """The stand-in namespace beside the host: internet, a LAN host and metadata."""
    if not isinstance(systemd_host, NspawnHost):
        pytest.skip("needs a dev/hostenv host on a network of its own")
    net = (HOSTENV_RUN / systemd_host.name / "net").read_text().strip()
    lan = f"10.251.{net}.250"
    ns, veth = f"tny-world-{os.getpid()}", f"tnyw{os.getpid() % 100000}"
    host_ns = f"mh-{systemd_host.name}"
    ip("netns", "add", ns)
    server = None
    try:
        ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        ip("link", "set", veth, "master", f"mhb{net}", "up")
        ip("link", "set", f"{veth}p", "netns", ns, "name", "eth0")
        ip("-n", ns, "link", "set", "lo", "up")
        for addr in (f"{INTERNET}/32", f"{lan}/24", f"{METADATA}/32"):
            ip("-n", ns, "addr", "add", addr, "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        for addr in (INTERNET, METADATA):
            ip("-n", host_ns, "route", "replace", f"{addr}/32", "dev", "eth0")
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "python3",
                "-m",
                "http.server",
                str(PORT),
                "--bind",
                "0.0.0.0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        yield {
            "internet": f"{INTERNET}:{PORT}",
            "lan": f"{lan}:{PORT}",
            "metadata": f"{METADATA}:{PORT}",
            "host": f"{systemd_host.address}:{HOST_PORT}",
        }
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        subprocess.run(["ip", "link", "del", veth], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def test_each_owners_replicas_run_in_user_namespaces_of_their_own(
    systemd_host: NspawnHost | LocalHost,
) -> None:
    got = run_check(systemd_host, "userns")
    ranges, uids = [], []
    for seen in got["replicas"].values():
        (inside, outside, size), *_ = seen["uid_map"]
        assert inside == 0 and size == 65536, seen  # a full 16-bit id space each
        ranges.append(range(outside, outside + size))
        # The container's processes (catatonit, sleep); conmon and slirp4netns are meshlet's.
        uids.append(set(seen["host_uids"]) - {1000})
    assert len(ranges) == 3
    for i, a in enumerate(ranges):
        for b in ranges[i + 1 :]:
            assert not set(a) & set(b), got  # no id shared between two replicas
    for i, a in enumerate(uids):
        assert a and 1000 not in a, got
        for b in uids[i + 1 :]:
            assert not a & b, got


def test_a_second_replica_of_an_image_finds_its_copy_for_its_user_namespace_made(
    systemd_host: NspawnHost | LocalHost,
) -> None:
    # Rootless storage copies (chowns) the whole image for each user-namespace range on the
    # range's first use: 0.7-1.1 s for 214 MB, on a failover's replacement too. After a
    # replica starts, meshletd makes the next ranges' copies in the background.
    got = run_check(systemd_host, "warm")
    assert got["copies_at_first"] == {}, got  # a new image: no copy yet
    before = got["copies_before_second"]
    assert got["copy_of_first"] in before, got
    # The second replica runs in another range, on a copy made before it started.
    assert got["copy_of_second"] in before, got
    assert got["copy_of_second"] != got["copy_of_first"], got
    assert len(before) == 1 + 2, got  # the first's range and the 2 ranges after it
    assert got["warm_containers_left"] == [], got


def test_a_replica_reaches_the_internet_but_not_the_lan_metadata_or_host_ports(
    systemd_host: NspawnHost | LocalHost, world: dict[str, str]
) -> None:
    got = run_check(systemd_host, "network", "internet", str(HOST_PORT), *world.values())
    # The control: every address answers the host itself.
    assert all(got["from_host"].values()), got
    reach = {name: got["from_replica"][addr] for name, addr in world.items()}
    assert reach == {"internet": True, "lan": False, "metadata": False, "host": False}, got
    assert got["userns_auto"] and got["rules_loaded"]


def test_the_lan_grant_opens_the_lan_only_and_none_closes_everything(
    systemd_host: NspawnHost | LocalHost, world: dict[str, str]
) -> None:
    got = run_check(systemd_host, "network", "lan", str(HOST_PORT), *world.values())
    reach = {name: got["from_replica"][addr] for name, addr in world.items()}
    assert reach == {"internet": True, "lan": True, "metadata": False, "host": False}, got
    got = run_check(systemd_host, "network", "none", str(HOST_PORT), *world.values())
    assert got["podman_network"] == "none"
    assert not any(got["from_replica"].values()), got
    # Back to the default for whatever runs next on this host.
    run_check(systemd_host, "restore_default")


def test_past_the_store_cap_unused_images_are_pruned_and_used_ones_kept(
    systemd_host: NspawnHost | LocalHost,
) -> None:
    got = run_check(systemd_host, "storage")
    assert got["pruned"] and got["store_bytes_after"] < got["store_bytes_before"]
    assert got["present_after"] == {
        "localhost/busybox:latest": True,
        "localhost/tenancy-unused:1": False,
    }
    # Evidence for docs/runtime.md: no per-container disk cap on ext4 (XFS pquota only).
    assert "only supported for backingFS XFS" in got["storage_opt_size"][0], got


def test_replicas_exceeding_the_slice_are_contained_and_a_host_service_keeps_its_share(
    systemd_host: NspawnHost | LocalHost,
) -> None:
    got = run_check(systemd_host, "contained_under_load")
    # Slice: 500 milli-CPU, 256 MiB, 150 tasks; each unit alone would allow far more.
    # The 600 MB hog never got its memory: OOM-killed, or still held at the slice's
    # 256 MiB when we stopped it (cgroup v1 can reclaim for minutes before the kill).
    assert not got["hog_survived"], got
    if got["hog_event"] != "ReplicaOomKilled":
        assert got["hog_event"] == "HeldAtTheSliceLimit", got
        assert 200 <= got["hog_slice_memory_mib"] <= 256, got
    assert got["replicas_cpu"] <= 0.55, got  # two burners and a fork loop together
    tasks = dict(kv.split("=") for kv in got["slice_tasks"])
    assert tasks["TasksMax"] == "150" and 140 <= int(tasks["TasksCurrent"]) <= 150, got
    assert got["fork_refused"], got  # the fork loop hit the slice's 150, not its own 4160
    # The host's own service (outside the slice, CPUWeight 100 against the slice's 20), one
    # busy thread, keeps most of what it had alone, and more than the replicas together. (It
    # cannot use more than one CPU, and the slice's cap is 0.5, so "twice the replicas"
    # asked for more than one CPU whenever the replicas used their whole cap: 0.977 against
    # 2 x 0.5 in a full run; 60 %: docs/runtime.md measured 64 % with the machine at load 10.)
    assert got["host_under_load_cpu"] >= 0.6 * got["host_alone_cpu"], got
    assert got["host_under_load_cpu"] > got["replicas_cpu"], got
    assert got["host_state"] in ("running", "degraded"), got
