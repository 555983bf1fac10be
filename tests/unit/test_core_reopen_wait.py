"""A replacement round that found no winner is reopened at its close, then less and less
often (docs/protocol.md, section 8, "Reopening").

A 2-replica service on three meshlets without packing: mesh(0) and mesh(1) hold its slots,
mesh(2) is the only one that may take a lost slot. mesh(0) dies; mesh(1), its watcher, opens
round 1 of slot 0 with a decline (it holds slot 1). mesh(2)'s answer never comes (its
firehose dropped the frame, or it could not host at that moment). Before, the next round
came 30-45 s later (the 30 s backoff, looked at every 15 s): a 36.8 s failover in the e2e
power-off test of a full CI run, against its 15 s target.
"""

from __future__ import annotations

from itertools import pairwise

import pytest

from meshletd.core import Bid, ProbePeer, ProbeResult, PutRecord, Tick

from .core_helpers import T0, bid, cluster_records, feed, mesh, observer, workload

pytestmark = pytest.mark.unit

CLOSE0 = T0 + 2000 + 2000  # round 0: createdAt + bidWindowMs + settle


def _opener_of_a_dead_hosts_slot(until_ms: int) -> list[tuple[int, Bid]]:
    """mesh(1)'s core while mesh(0) stays dead and nobody else bids: (when, bid) it opens."""
    wl = workload(replicas=2)
    core = observer(1)
    feed(core, [*cluster_records(3), wl, bid(wl, 0, priority=2), bid(wl, 1, priority=1)])
    opened: list[tuple[int, Bid]] = []
    now = CLOSE0
    while now < until_ms:
        out = core.handle(Tick(now))
        for a in out:
            if isinstance(a, ProbePeer):
                out += core.handle(ProbeResult(a.meshlet, ok=a.meshlet != mesh(0)))
        for a in out:
            if isinstance(a, PutRecord) and isinstance(a.record, Bid):
                opened.append((now, a.record))
                feed(core, [a.record])  # its own bid comes back over the firehose
        now += 100
    assert core.placement()[wl.uri][0] == (0, mesh(0))  # nobody could take it
    return opened


def test_a_round_without_a_winner_is_reopened_at_its_close_then_less_often() -> None:
    opened = _opener_of_a_dead_hosts_slot(CLOSE0 + 150_000)
    assert [b.round for _, b in opened] == list(range(1, len(opened) + 1))
    assert all(b.slot == 0 and b.slots == 0 for _, b in opened)  # declines: it holds slot 1
    gaps = [round((b - a) / 1000) for (a, _), (b, _) in pairwise(opened)]
    # The round's length (W + settle = 3 s), doubling, at most the 30 s backoff.
    assert gaps[:5] == [3, 6, 12, 24, 30], gaps
    assert set(gaps[4:]) == {30}, gaps


def test_the_second_round_comes_within_one_round_of_the_first_closing() -> None:
    # What the failover of a host whose slot found no taker in the first round is bounded by.
    opened = _opener_of_a_dead_hosts_slot(CLOSE0 + 20_000)
    (t1, first), (t2, second) = opened[:2]
    assert second.round == first.round + 1
    assert t2 - t1 <= 3000 + 100  # its close (W + settle), to the tick
