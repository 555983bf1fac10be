"""`max_replicas` ([contribution] in meshlet.toml) holds: a meshlet never bids for, and so
never runs, more replicas at once than its limit, whatever a workload asks for."""

from __future__ import annotations

from meshletd.core import StartReplica, Workload
from meshletd.core.records import at_uri
from meshletd.sim.world import K_ARRIVE, Config, Node, Sim


class ManyTiny(Sim):
    """Four meshlets of max_replicas 5 and one member's 1000 replicas of a tiny service
    (packing allowed: CPU and memory alone would let one meshlet take all of them)."""

    def __init__(self, max_replicas: int | None) -> None:
        super().__init__(
            Config(meshlets=4, workloads=0, seed=3, hours=0.05, max_replicas=max_replicas)
        )
        owner = self.nodes[0].owner
        wl = Workload(
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
        )
        self.push(1000, K_ARRIVE, wl)
        self.most: dict[int, int] = {}  # meshlet index -> most replicas at once

    def _start(self, node: Node, a: StartReplica) -> None:
        super()._start(node, a)
        # Started and not yet stopped here, counted the moment the core asks for it.
        self.most[node.idx] = max(self.most.get(node.idx, 0), len(node.core.replicas()))


def test_a_thousand_tiny_replicas_never_put_more_than_max_replicas_on_a_meshlet() -> None:
    sim = ManyTiny(max_replicas=5)
    figures = sim.run()
    assert sim.most and max(sim.most.values()) <= 5, sim.most
    assert sum(sim.most.values()) == 4 * 5  # every meshlet still fills up to its limit
    assert figures["violations"] == []


def test_without_a_limit_capacity_alone_decides() -> None:
    sim = ManyTiny(max_replicas=None)
    sim.run()
    assert max(sim.most.values()) > 5, sim.most
