"""A replacement round whose window an able meshlet missed (docs/protocol.md, section 8).

A 2-replica service on three meshlets without packing: mesh(0) and mesh(1) hold its slots,
mesh(2) is the only meshlet that may take a lost one. mesh(0) dies; mesh(1) opens round 1
of slot 0 with a decline (it holds slot 1). The round reaches mesh(2) 1.5 s late (a loaded
machine), after the round's 1 s window: it cannot bid in it, and the round closes without
a winner. Before, nothing happened until the opener's 30 s backoff (38.7 s and 48 s
failovers in a full CI run), and with the lag lasting, never.
"""

from __future__ import annotations

import pytest

from meshletd.core import Bid, PutRecord, Tick

from .core_helpers import T0, bid, cluster_records, feed, mesh, observer, workload

pytestmark = pytest.mark.unit

CLOSE0 = T0 + 2000 + 2000  # round 0: createdAt + bidWindowMs + settle
OPEN = CLOSE0 + 5000  # mesh(1)'s opening decline of round 1 (slot 0)
CLOSE1 = OPEN + 1000 + 2000  # W + settle


def _spare():
    wl = workload(replicas=2)
    core = observer(2)
    feed(core, [*cluster_records(3), wl, bid(wl, 0, priority=2), bid(wl, 1, priority=1)])
    core.handle(Tick(CLOSE0))
    assert sorted(m for _, m in core.placement()[wl.uri]) == [mesh(0), mesh(1)]
    return core, wl


def _my_bids(out: list[object]) -> list[Bid]:
    return [a.record for a in out if isinstance(a, PutRecord) and isinstance(a.record, Bid)]


def test_a_spare_that_saw_the_round_after_its_window_opens_the_next_round_when_it_closes() -> None:
    core, wl = _spare()
    core.handle(Tick(OPEN + 1500))
    out = feed(core, [bid(wl, 1, round_=1, slot=0, slots=0, at=OPEN)])
    out += core.handle(Tick(OPEN + 1600))
    assert _my_bids(out) == []  # too late for round 1: no bid outside the window
    out = core.handle(Tick(CLOSE1 + 1))
    mine = _my_bids(out)
    assert [(b.round, b.slot, b.slots) for b in mine] == [(2, 0, 1)], out
    feed(core, mine)
    core.handle(Tick(CLOSE1 + 1 + 1000 + 2000 + 1))
    assert core.placement()[wl.uri][0] == (2, mesh(2))


def test_a_round_seen_only_after_it_closed_is_left_alone() -> None:
    # A round published late (its opener was cut off, section 8) moves no healthy slot: only
    # a meshlet that saw the round while it was open, and missed its window, opens the next.
    core, wl = _spare()
    core.handle(Tick(CLOSE1 + 5000))
    out = feed(core, [bid(wl, 1, round_=1, slot=0, slots=0, at=OPEN)])
    out += core.handle(Tick(CLOSE1 + 6000))
    assert _my_bids(out) == []


def test_a_round_that_found_its_winner_is_not_reopened_by_the_late_spare() -> None:
    core, wl = _spare()
    core.handle(Tick(OPEN + 1500))
    feed(core, [bid(wl, 1, round_=1, slot=0, slots=0, at=OPEN)])
    core.handle(Tick(OPEN + 1600))
    feed(core, [bid(wl, 0, round_=1, slot=0, slots=1, at=OPEN + 300)])  # mesh(0) came back
    out = core.handle(Tick(CLOSE1 + 1))
    assert _my_bids(out) == []
    assert core.placement()[wl.uri][0] == (1, mesh(0))
