"""A drain around a round's close, replayed on purpose in the simulator (found replaying the
real commune's writes: job4 ran on alice, then bob, then alice again after the undrain)."""

from __future__ import annotations

from meshletd.core import StartReplica, Workload
from meshletd.core.records import at_uri
from meshletd.sim.world import K_ARRIVE, K_FAULT, Config, Node, Sim


class DrainAtStart(Sim):
    """Two meshlets (so the drain's replacement round finds no winner); owner 0 publishes a
    1-replica job; the meshlet that starts it first drains as its replica runs (round 0
    closed early there, before its nominal close) and is undrained a minute later."""

    def __init__(self, name: str) -> None:
        super().__init__(Config(meshlets=2, workloads=0, seed=1, hours=0.1))
        owner = self.nodes[0].owner
        self.wl = Workload(
            uri=at_uri(owner, "commune.scheduler.workload", name),
            cid="c",
            owner=owner,
            cluster="commune",
            milli_cpu=100,
            memory_mib=32,
            replicas=1,
            created_at=0,
            kind="job",
            bid_window_ms=5000,
        )
        self.push(1000, K_ARRIVE, self.wl)
        self.starts: list[tuple[int, int, int]] = []  # (time, meshlet index, round)
        self.drained: int | None = None

    def _start(self, node: Node, a: StartReplica) -> None:
        self.starts.append((self.now, node.idx, a.round))
        super()._start(node, a)

    def _running(self, node: Node, key: tuple[str, int]) -> None:
        super()._running(node, key)
        if self.drained is None:
            self.drained = node.idx
            self.push(self.now, K_FAULT, ("drain", node.idx, None))
            self.push(self.now + 60_000, K_FAULT, ("undrain", node.idx))


def test_a_job_moved_off_a_meshlet_drained_before_its_round_closed_does_not_move_back() -> None:
    sim = DrainAtStart("job")
    figures = sim.run()
    close0 = 1000 + 5000 + 2000  # arrival + window + settle (virtual clock, no skew here)
    assert sim.drained is not None
    first = sim.starts[0]
    assert first[1] == sim.drained and first[0] < close0  # started after an early close
    # It moves once (the drain came before round 0's close) and never back.
    assert [idx for _, idx, _ in sim.starts].count(sim.drained) == 1, sim.starts
    assert len(sim.starts) == 2, sim.starts
    assert figures["converged"] and figures["violations"] == []
