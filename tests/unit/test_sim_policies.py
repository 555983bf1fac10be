"""Host policies in the simulator (docs/protocol.md, section 21): random policies under
chaos leave every meshlet with the same placement, and an eviction moves the evicted
owner's replica to another meshlet, make-before-break."""

from __future__ import annotations

import pytest

from meshletd.core import StartReplica, StopReplica, Workload
from meshletd.core.records import HostPolicy, at_uri
from meshletd.sim.model import EPOCH
from meshletd.sim.world import K_ARRIVE, K_FAULT, Config, Node, Sim


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_host_policies_under_chaos_leave_one_placement_and_no_violation(
    seed: int,
) -> None:
    sim = Sim(Config(meshlets=24, workloads=60, seed=seed, faults="chaos", hours=0.3))
    figures = sim.run()
    assert figures["violations"] == []
    assert figures["converged"] and figures["placements_identical"]
    published = [r for r in sim.store.values() if isinstance(r, HostPolicy)]
    assert published, "the chaos run published no host policy"
    assert {wl.network for wl in sim.workloads.values()} >= {"internet"}
    assert all(wl.image for wl in sim.workloads.values())


class EvictWhileRunning(Sim):
    """Three meshlets; owner 2 publishes a 1-replica service; the meshlet that runs it first
    evicts owner 2 (its policy record) a minute later."""

    def __init__(self) -> None:
        super().__init__(Config(meshlets=3, workloads=0, seed=4, hours=0.1))
        owner = self.nodes[2].owner
        self.wl = Workload(
            uri=at_uri(owner, "commune.scheduler.workload", "svc"),
            cid="c",
            owner=owner,
            cluster="commune",
            milli_cpu=100,
            memory_mib=32,
            replicas=1,
            created_at=0,
            image="busybox",
        )
        self.push(1000, K_ARRIVE, self.wl)
        self.events_seen: list[tuple[int, str, int, str]] = []  # (time, what, meshlet, extra)
        self.evictor: int | None = None

    def _start(self, node: Node, a: StartReplica) -> None:
        self.events_seen.append((self.now, "start", node.idx, str(a.round)))
        super()._start(node, a)

    def _perform(self, node: Node, actions: list[object]) -> None:
        for a in actions:
            if isinstance(a, StopReplica):
                self.events_seen.append((self.now, "stop", node.idx, a.reason))
        super()._perform(node, actions)

    def _running(self, node: Node, key: tuple[str, int]) -> None:
        super()._running(node, key)
        self.events_seen.append((self.now, "running", node.idx, ""))
        if self.evictor is None:
            self.evictor = node.idx
            self.push(self.now + 60_000, K_FAULT, ("evict", node.idx))

    def _fault(self, f: tuple[object, ...]) -> None:
        if f[0] != "evict":
            super()._fault(f)
            return
        node = self.nodes[int(f[1])]  # type: ignore[call-overload]
        now = self.now + EPOCH + node.skew
        rec = HostPolicy(
            at_uri(node.did, "commune.scheduler.hostPolicy", "self"),
            node.did,
            now,
            evicted=frozenset({self.wl.owner}),
        )
        self._write(node, rec.uri, rec)


def test_an_eviction_moves_the_replica_elsewhere_and_stops_it_only_once_the_new_one_runs() -> None:
    sim = EvictWhileRunning()
    figures = sim.run()
    assert figures["converged"] and figures["violations"] == [], figures["violations"]
    ev = sim.events_seen
    evictor = sim.evictor
    assert evictor is not None
    stops = [e for e in ev if e[1] == "stop" and e[2] == evictor]
    assert [s[3] for s in stops] == ["policy"], ev
    newcomer = [e for e in ev if e[1] == "running" and e[2] != evictor]
    assert newcomer, ev
    assert newcomer[0][0] <= stops[0][0]  # make-before-break: the new copy ran first
    owners = {n.core.placement()[sim.wl.uri][0][1] for n in sim.nodes if n.core}
    assert owners == {sim.nodes[newcomer[0][2]].did}
