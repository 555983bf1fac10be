"""In a small cluster, a candidate of a replacement round that cannot take the slot (it
holds another slot of the workload, or has no room) declines, so the round closes early
(docs/protocol.md, section 8, "Declines in replacement rounds").

A 2-replica service on three meshlets without packing: mesh(0) and mesh(1) hold its slots.
mesh(0) dies; mesh(2) opens round 1 of slot 0 with its bid. mesh(1), the other candidate,
used to stay silent, so every observer waited for the round's close (W + settle = 3 s):
`dev/bench failover 5` had 2 of 5 power-offs replaced after 7.4 s instead of 4 s.
"""

from __future__ import annotations

import pytest

from meshletd.core import Bid, PutRecord, Tick

from .core_helpers import T0, bid, cluster_records, feed, mesh, observer, workload

pytestmark = pytest.mark.unit

CLOSE0 = T0 + 2000 + 2000  # round 0: createdAt + bidWindowMs + settle
OPEN = CLOSE0 + 5000  # mesh(2) opens round 1 of slot 0
CLOSE1 = OPEN + 1000 + 2000


def _my_bids(out: list[object]) -> list[Bid]:
    return [a.record for a in out if isinstance(a, PutRecord) and isinstance(a.record, Bid)]


def _holder_of_slot_1():
    wl = workload(replicas=2)
    core = observer(1)
    feed(core, [*cluster_records(3), wl, bid(wl, 0, priority=2), bid(wl, 1, priority=1)])
    core.handle(Tick(CLOSE0))
    assert core.placement()[wl.uri] == ((0, mesh(0)), (0, mesh(1)))
    return core, wl


def test_a_candidate_holding_another_slot_declines_and_the_round_closes_early() -> None:
    core, wl = _holder_of_slot_1()
    core.handle(Tick(OPEN + 100))
    out = feed(core, [bid(wl, 2, round_=1, slot=0, slots=1, at=OPEN)])
    out += core.handle(Tick(OPEN + 200))
    mine = _my_bids(out)
    assert [(b.round, b.slot, b.slots) for b in mine] == [(1, 0, 0)], out
    feed(core, mine)  # its decline comes back: every candidate has answered
    core.handle(Tick(OPEN + 300))
    assert core.placement()[wl.uri][0] == (1, mesh(2))  # long before CLOSE1


def test_it_declines_only_once_and_not_after_the_window() -> None:
    core, wl = _holder_of_slot_1()
    core.handle(Tick(OPEN + 1500))  # the round reaches it after its window
    out = feed(core, [bid(wl, 2, round_=1, slot=0, slots=1, at=OPEN)])
    out += core.handle(Tick(OPEN + 1600))
    assert _my_bids(out) == []
    core.handle(Tick(CLOSE1 + 1))
    assert core.placement()[wl.uri][0] == (1, mesh(2))  # closed by the clock
