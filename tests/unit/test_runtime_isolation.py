"""Tenants apart: a user namespace per replica, and the network rules of the host's grant."""

from __future__ import annotations

from dataclasses import replace

import pytest
import trio
import trio.testing

from meshletd.config import parse
from meshletd.runtime import (
    FakeMachine,
    ReplicaFailed,
    ReplicaRunning,
    ReplicaRuntime,
    contribution_runtime_config,
)
from meshletd.runtime.fake import FakeContainer
from meshletd.runtime.network import resolvers_from, ruleset
from meshletd.runtime.spec import ReplicaId, ReplicaSpec, Resources
from meshletd.runtime.units import (
    WARM_LABEL,
    RuntimeConfig,
    load_network_rules_argv,
    podman_run_argv,
    unit_properties,
)

SPEC = ReplicaSpec(
    replica=ReplicaId("did:plc:alice", "web", 0),
    owner_handle="alice.test",
    image="localhost/busybox:latest",
    resources=Resources(milli_cpu=100, memory_mib=16),
)


def test_each_replica_gets_a_user_namespace_of_its_own() -> None:
    argv = podman_run_argv(SPEC, RuntimeConfig(), "c")
    assert "--userns=auto:size=65536" in argv
    assert argv.index("--userns=auto:size=65536") < argv.index(SPEC.image)
    assert not any(
        a.startswith("--userns") for a in podman_run_argv(SPEC, RuntimeConfig(userns_size=0), "c")
    )


def test_the_rules_are_loaded_by_meshletd_not_on_each_units_start_path() -> None:
    props = unit_properties(SPEC, RuntimeConfig(), "u.service", "c")
    assert "ExecStartPreEx" not in props  # an nft process per start cost ~26 ms
    assert load_network_rules_argv(RuntimeConfig()) == [
        "/usr/sbin/nft",
        "-f",
        "/run/meshlet-replicas/network.nft",
    ]


def test_a_host_that_grants_no_network_starts_replicas_without_one() -> None:
    argv = podman_run_argv(SPEC, RuntimeConfig(network_grant="none"), "c")
    assert "--network=none" in argv
    assert "--network=slirp4netns" in podman_run_argv(SPEC, RuntimeConfig(), "c")


def test_the_internet_rules_drop_private_metadata_and_the_host_itself() -> None:
    text = ruleset("internet", uid=1000, cgroup_v2=False, resolvers_v4=["192.168.1.1"])
    assert text.startswith("table inet meshlet\ndelete table inet meshlet\n")  # atomic swap
    assert "meta skuid != 1000 return" in text
    # meshletd's own pulls (system.slice units) may still reach a registry on the LAN.
    assert 'socket cgroupv2 level 1 "unified/system.slice" return' in text
    assert "fib daddr type local counter drop" in text
    for cidr in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "fc00::/7",
        "fe80::/10",
    ):
        assert cidr in text
    assert "169.254.169.254" in text
    # DNS to the host's resolver (often on the LAN) stays open, port 53 only.
    dns = next(ln for ln in text.splitlines() if "192.168.1.1" in ln)
    assert "th dport 53 accept" in dns
    assert text.index(dns) < text.index("10.0.0.0/8")
    assert 'level 1 "system.slice"' in ruleset("internet", uid=7, cgroup_v2=True)


def test_lan_keeps_only_metadata_and_the_host_closed_and_none_drops_all() -> None:
    lan = ruleset("lan", uid=1000, cgroup_v2=True)
    assert "169.254.169.254" in lan and "fib daddr type local" in lan
    assert "10.0.0.0/8" not in lan
    none = ruleset("none", uid=1000, cgroup_v2=True)
    assert none.split("chain replica {")[1].split("}")[0].strip() == "counter drop"
    with pytest.raises(ValueError):
        ruleset("everything", uid=1000, cgroup_v2=True)  # type: ignore[arg-type]


def test_resolvers_are_read_from_resolv_conf() -> None:
    text = "# x\nnameserver 192.168.1.1\nnameserver fe80::1%eth0\nnameserver bogus\nsearch a\n"
    assert resolvers_from(text) == (["192.168.1.1"], ["fe80::1"])


def test_isolation_settings_come_from_meshlet_toml() -> None:
    cfg = parse(
        'did = "did:plc:m"\nowner = "did:plc:o"\npds = "http://127.0.0.1:1"\n'
        "[isolation]\nuserns_size = 4096\nuserns_warm = 0\nnetwork_rules = false\n"
    )
    config = contribution_runtime_config(
        cfg.contribution, isolation=cfg.isolation, network_grant="lan"
    )
    assert (config.userns_size, config.network_rules, config.network_grant) == (4096, False, "lan")
    assert config.userns_warm == 0
    default = parse('did = "did:plc:m"\nowner = "did:plc:o"\npds = "http://127.0.0.1:1"\n')
    assert default.isolation.userns_size == 65536 and default.isolation.network_rules
    assert default.isolation.userns_warm == 2


def test_rules_are_applied_on_serve_and_a_replica_does_not_start_without_them() -> None:
    machine = FakeMachine()
    machine.images.add(SPEC.image)
    runtime = ReplicaRuntime(machine, RuntimeConfig())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.serve)
            assert machine.network_grant == "internet"
            assert await runtime.set_network_grant("lan") and machine.network_grant == "lan"
            assert isinstance(await runtime.start(SPEC), ReplicaRunning)
            machine.network_rules_fail = True
            assert not await runtime.apply_network_rules()
            # Not in force: no replica with a network starts (one more try, then refused).
            other = replace(SPEC, replica=ReplicaId("did:plc:bob", "web", 0))
            assert isinstance(await runtime.start(other), ReplicaFailed)
            # A replica without a network needs no rules.
            quiet = replace(SPEC, replica=ReplicaId("did:plc:bob", "q", 0), network="none")
            assert isinstance(await runtime.start(quiet), ReplicaRunning)
            # Loaded again (the watcher retries): replicas start again.
            machine.network_rules_fail = False
            assert await runtime.apply_network_rules()
            assert isinstance(await runtime.start(other), ReplicaRunning)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_meshlet_bids_for_no_more_than_fits_with_each_replicas_overhead() -> None:
    from meshletd.core import StartReplica, Workload
    from meshletd.core.records import at_uri
    from meshletd.sim.world import K_ARRIVE, Config, Node, Sim

    class Tiny(Sim):
        """Meshlets of 100 MiB; 1000 replicas of a 1 MiB service, packing allowed."""

        def __init__(self, overhead: int) -> None:
            super().__init__(
                Config(
                    meshlets=3,
                    workloads=0,
                    seed=5,
                    hours=0.05,
                    memory_mib=100,
                    replica_overhead_mib=overhead,
                )
            )
            owner = self.nodes[0].owner
            self.push(
                1000,
                K_ARRIVE,
                Workload(
                    uri=at_uri(owner, "commune.scheduler.workload", "tiny"),
                    cid="c",
                    owner=owner,
                    cluster="commune",
                    milli_cpu=1,
                    memory_mib=1,
                    replicas=1000,
                    created_at=0,
                    kind="service",
                    allow_packing=True,
                    bid_window_ms=5000,
                ),
            )
            self.most: dict[int, int] = {}

        def _start(self, node: Node, a: StartReplica) -> None:
            super()._start(node, a)
            self.most[node.idx] = max(self.most.get(node.idx, 0), len(node.core.replicas()))

    without = Tiny(overhead=0)
    without.run()
    assert max(without.most.values()) == 100  # 100 x 1 MiB: the slice would be overrun
    sim = Tiny(overhead=9)
    figures = sim.run()
    # (1 MiB + 9 MiB overhead) x 10 = the 100 MiB promised, never more.
    assert max(sim.most.values()) == 10, sim.most
    assert figures["violations"] == []


def test_a_replicas_overhead_is_counted_against_the_capacity_it_bids_with() -> None:
    from meshletd.core.state import MeshletIdentity

    cfg = parse('did = "did:plc:m"\nowner = "did:plc:o"\npds = "http://127.0.0.1:1"\n')
    assert cfg.contribution.replica_overhead_mib == 8
    me = MeshletIdentity("did:plc:m", "did:plc:o", 1000, 100, replica_overhead_mib=8)
    assert me.replica_overhead_mib == 8


def test_unused_images_are_pruned_once_the_store_passes_storage_mib() -> None:
    cfg = parse('did = "did:plc:m"\nowner = "did:plc:o"\npds = "http://127.0.0.1:1"\n')
    assert contribution_runtime_config(cfg.contribution).image_store_max_mib == 10_240
    machine = FakeMachine()
    machine.images |= {SPEC.image, "localhost/old:1", "localhost/old:2"}
    machine.image_sizes = {
        SPEC.image: 5 << 20,
        "localhost/old:1": 4 << 20,
        "localhost/old:2": 4 << 20,
    }
    runtime = ReplicaRuntime(machine, RuntimeConfig(image_store_max_mib=12))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.serve)
            assert isinstance(await runtime.start(SPEC), ReplicaRunning)
            assert await runtime.keep_image_store_in_bounds()  # 13 MiB > 12 MiB
            # The running replica's image stays; the unused ones are gone.
            assert SPEC.image in machine.images and "localhost/old:1" not in machine.images
            assert not await runtime.keep_image_store_in_bounds()  # 5 MiB: nothing to do
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_the_store_is_not_pruned_while_a_start_pulls_its_image() -> None:
    # A prune between a start's pull and its container would remove the image the start
    # is about to run (`--pull=never`): the prune waits for the start.
    spec = replace(SPEC, image="registry.test/alice/web:1")
    machine = FakeMachine()
    machine.pullable.add(spec.image)
    machine.pull_delay_s = 0.3
    machine.images = {"localhost/old:1"}  # not the replica's: it is pulled
    machine.image_sizes = {spec.image: 5 << 20, "localhost/old:1": 4 << 20}
    runtime = ReplicaRuntime(machine, RuntimeConfig(image_store_max_mib=1))
    started: list[object] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.serve)
            nursery.start_soon(lambda: _append(started, runtime.start(spec)))
            await trio.sleep(0.1)  # the start is pulling
            assert not await runtime.keep_image_store_in_bounds()
            assert machine.prunes == 0 and "localhost/old:1" in machine.images
            while not started:
                await trio.sleep(0.05)
            assert isinstance(started[0], ReplicaRunning), started
            assert await runtime.keep_image_store_in_bounds()  # now it may
            assert spec.image in machine.images and "localhost/old:1" not in machine.images
            nursery.cancel_scope.cancel()

    trio.run(main)


async def _append(into: list[object], start: object) -> None:
    into.append(await start)  # type: ignore[misc]


def test_the_rules_are_loaded_again_while_the_runtime_serves() -> None:
    # An administrator's `nft flush ruleset` must not leave replicas unconfined for long.
    machine = FakeMachine()
    runtime = ReplicaRuntime(machine, RuntimeConfig(network_rules_refresh_s=30.0))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.serve)
            assert machine.network_applies == 1
            await trio.sleep(95)
            assert machine.network_applies == 4  # at start, then at 30, 60 and 90 s
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_published_port_answers_clients_on_private_addresses() -> None:
    # rootlessport runs as the replica user: without this rule the replies to a LAN client
    # of a published port were dropped with the container's own private traffic (services,
    # on a booted host).
    for grant in ("internet", "lan"):
        chain = ruleset(grant, uid=1000, cgroup_v2=True).split("chain replica {")[1]  # type: ignore[arg-type]
        rules = [line.strip() for line in chain.splitlines() if line.strip()]
        assert rules[0] == "ct direction reply counter accept"


def _serve_and(runtime: ReplicaRuntime, body: object) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.serve)
            await body()  # type: ignore[operator]
            nursery.cancel_scope.cancel()

    trio.run(main)


async def _warmed(runtime: ReplicaRuntime, count: int) -> None:
    with trio.fail_after(5):
        while runtime.namespaces_warmed < count:
            await trio.sleep(0.01)


def test_after_a_replica_starts_its_image_is_copied_for_the_next_user_namespaces() -> None:
    # Rootless storage copies an image per user-namespace range on first use: the next
    # replica (a second one, a failover's replacement) should find its copy made.
    machine = FakeMachine()
    runtime = ReplicaRuntime(machine, RuntimeConfig())

    async def body() -> None:
        assert isinstance(await runtime.start(SPEC), ReplicaRunning)
        await _warmed(runtime, 1)
        assert machine.warmed == [(SPEC.image, 65536, 2)]
        second = replace(SPEC, replica=ReplicaId("did:plc:alice", "web", 1))
        assert isinstance(await runtime.start(second), ReplicaRunning)
        await _warmed(runtime, 2)
        assert machine.warmed == [(SPEC.image, 65536, 2)] * 2
        assert len(machine.containers) == 2  # the two replicas, nothing else

    _serve_and(runtime, body)


def test_replicas_started_one_after_the_other_copy_the_image_ahead_once() -> None:
    # A range is free again once its container is gone, and its copy stays: starting
    # again at no more replicas than the last warm-up needs no new copy, and makes none.
    machine = FakeMachine()
    runtime = ReplicaRuntime(machine, RuntimeConfig())

    async def body() -> None:
        for _ in range(3):
            assert isinstance(await runtime.start(SPEC), ReplicaRunning)
            await runtime.stop(SPEC.replica)
        await trio.sleep(0.2)
        assert runtime.namespaces_warmed == 1
        assert isinstance(await runtime.start(SPEC), ReplicaRunning)
        second = replace(SPEC, replica=ReplicaId("did:plc:alice", "web", 1))
        assert isinstance(await runtime.start(second), ReplicaRunning)  # two at once
        await _warmed(runtime, 2)

    _serve_and(runtime, body)


def test_nothing_is_copied_ahead_without_user_namespaces_or_after_a_failed_start() -> None:
    machine = FakeMachine()
    runtime = ReplicaRuntime(machine, RuntimeConfig(userns_size=0))
    failing = ReplicaRuntime(FakeMachine(), RuntimeConfig())

    async def body() -> None:
        assert isinstance(await runtime.start(SPEC), ReplicaRunning)
        missing = replace(SPEC, image="localhost/nowhere:1")
        assert isinstance(await failing.start(missing), ReplicaFailed)
        await trio.sleep(0.2)
        assert machine.warmed == [] and runtime.namespaces_warmed == 0
        assert failing.namespaces_warmed == 0

    _serve_and(runtime, body)


def test_the_copy_ahead_waits_for_a_start_under_way() -> None:
    # The copies take podman's storage lock: made while another replica starts, they
    # would hold that start up.
    slow = replace(
        SPEC, replica=ReplicaId("did:plc:alice", "db", 0), image="registry.test/alice/db:1"
    )
    machine = FakeMachine()
    machine.pullable.add(slow.image)
    machine.pull_delay_s = 0.4
    runtime = ReplicaRuntime(machine, RuntimeConfig())
    order: list[str] = []

    async def start_slow() -> None:
        assert isinstance(await runtime.start(slow), ReplicaRunning)
        order.append("slow running")

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start_slow)
            await trio.sleep(0.1)  # the slow start is pulling its image
            assert isinstance(await runtime.start(SPEC), ReplicaRunning)
            await trio.sleep(0.1)
            assert machine.warmed == []  # held while the other start is under way
        assert order == ["slow running"]
        await _warmed(runtime, 2)
        assert sorted(i for i, _, _ in machine.warmed) == sorted([SPEC.image, slow.image])

    _serve_and(runtime, body)


def test_copy_ahead_containers_a_killed_meshletd_left_are_removed_on_adoption() -> None:
    # Each holds a user-namespace range for as long as it exists.
    machine = FakeMachine()
    machine.containers["meshlet-warm-0a1b"] = FakeContainer(
        "meshlet-warm-0a1b", SPEC.image, ("true",), {WARM_LABEL: "1"}, {}, status="created"
    )
    runtime = ReplicaRuntime(machine, RuntimeConfig())

    async def body() -> None:
        assert machine.containers == {}

    _serve_and(runtime, body)
