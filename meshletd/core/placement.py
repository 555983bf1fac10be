"""The placement rule, written once: which bids count in a round, who wins round 0, and how
the later rounds of a slot are walked (docs/protocol.md, sections 5 and 6).

Pure functions of public records (a workload, its bids, the cluster view) and of which
rounds have closed; the scheduler's fast path (`Rounds._resolve`) must give the same owners
as `reference_owners`, which is this rule with nothing inlined (a property test checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .bounds import CHAINED_FAST_ROUNDS, CHAINED_SLOW_PERIOD_MS, MAX_ROUND
from .cluster import ClusterView
from .hashing import rendezvous_score
from .records import Bid, Workload, WorkloadStatus
from .timing import Timing

Owner = tuple[int, str]
"""(round, meshlet DID) that owns a slot."""

FinishedSlot = tuple[str, int, str]
"""(meshlet DID, round, terminal state) of a slot whose job finished."""


class WorkloadEntry:
    """What one meshlet knows about one workload: the record, its bids, the slot owners as
    last resolved here, and the statuses that matter for it."""

    __slots__ = (
        "bids",
        "early",
        "finished",
        "owners",
        "small_cluster",
        "small_cluster_version",
        "statuses",
        "wl",
    )

    def __init__(self, wl: Workload) -> None:
        self.wl = wl
        # whether the owner's cluster is small (early close), as of cluster view version
        # `small_cluster_version`
        self.small_cluster = False
        self.small_cluster_version = -1
        self.bids: list[Bid] = []
        self.owners: tuple[Owner | None, ...] | None = None  # None: round 0 not closed yet
        self.statuses: dict[tuple[str, int], WorkloadStatus] | None = None
        self.finished: dict[int, FinishedSlot] | None = None  # slot -> its finished job
        self.early: set[tuple[int, int]] | None = None  # (slot, round) closed early here


@dataclass(frozen=True, slots=True)
class RoundWindow:
    """One round of one slot as the rule sees it: its bids and when it opens, stops taking
    bids (deadline) and closes (deadline + settle)."""

    round: int
    start: int
    deadline: int
    close: int
    bids: list[Bid]


def round0_window(wl: Workload, t: Timing) -> tuple[int, int, int]:
    """(opens, deadline, closes) of round 0: [createdAt, createdAt + window], closed
    2 x skew + grace after the deadline."""
    deadline = wl.created_at + wl.bid_window_ms
    return wl.created_at, deadline, deadline + t.settle_ms


def bid_counts(
    cluster: ClusterView, t: Timing, wl: Workload, b: Bid, start: int, deadline: int
) -> bool:
    """Whether bid `b` counts in a round whose window is [start, deadline]: it offers a
    slot, was made inside the window, offers enough room, comes from an eligible meshlet,
    that meshlet was not draining when the round closed (judged against the drain intervals
    of its record, so a later undrain does not re-judge the round), and its host policy
    admits the workload in a round closing then (section 21)."""
    if b.slots < 1 or b.created_at < start or b.created_at > deadline:
        return False
    if b.free_milli_cpu < wl.milli_cpu or b.free_memory_mib < wl.memory_mib:
        return False
    if not cluster.eligible(wl, b.meshlet):
        return False
    close = deadline + t.settle_ms
    return not cluster.drained_at(b.meshlet, close) and cluster.policy_admits(wl, b.meshlet, close)


def round0_rank(uri: str, b: Bid) -> tuple[int, int]:
    """Order of round-0 bids: higher priority first, then the lower rendezvous score."""
    return -b.priority, rendezvous_score(uri, 0, -1, b.meshlet)


def fill_round0(ranked: Sequence[Bid], replicas: int, allow_packing: bool) -> list[str | None]:
    """The meshlet of every slot after round 0, from the counting bids in rank order: one
    slot per bidder in rank order, and with packing allowed further layers (a bidder offering
    k slots takes one in each of its first k layers) until every slot is taken."""
    owners: list[str | None] = [None] * replicas
    caps = [min(b.slots, replicas) if allow_packing else 1 for b in ranked]
    s = 0
    layer = 0
    while s < replicas:
        progressed = False
        for i, b in enumerate(ranked):
            if caps[i] > layer and s < replicas:
                owners[s] = b.meshlet
                s += 1
                progressed = True
        if not progressed:
            break
        layer += 1
    return owners


def round0_owners(
    cluster: ClusterView, t: Timing, wl: Workload, bids: Sequence[Bid]
) -> list[Owner | None]:
    """Slot owners after round 0 by the plain rule (`bid_counts`, `round0_rank`,
    `fill_round0`)."""
    opens, deadline, _ = round0_window(wl, t)
    valid = [b for b in bids if b.round == 0 and bid_counts(cluster, t, wl, b, opens, deadline)]
    valid.sort(key=lambda b: round0_rank(wl.uri, b))
    return [
        None if m is None else (0, m) for m in fill_round0(valid, wl.replicas, wl.allow_packing)
    ]


def later_round_bids(bids: Sequence[Bid], slot: int) -> dict[int, list[Bid]]:
    """Bids of rounds >= 1 for `slot`, by round, in ascending round order."""
    by_round: dict[int, list[Bid]] = {}
    for b in bids:
        if b.round > 0 and b.slot == slot:
            by_round.setdefault(b.round, []).append(b)
    return dict(sorted(by_round.items()))


def chained_round_start(r: int, close0: int, t: Timing) -> int:
    """When chained round r >= 1 of a never-filled slot opens: every P after round 0's close
    for the first CHAINED_FAST_ROUNDS rounds, then every max(P, 1 min), so that the round
    numbers of any workload stay within the lexicon's bound for ~1.9 years after its
    createdAt (docs/protocol.md, section 20)."""
    period = t.chained_period_ms
    if r <= CHAINED_FAST_ROUNDS:
        return close0 + (r - 1) * period
    slow = max(period, CHAINED_SLOW_PERIOD_MS)
    return close0 + (CHAINED_FAST_ROUNDS - 1) * period + (r - CHAINED_FAST_ROUNDS) * slow


def chained_round_at(now: int, close0: int, t: Timing) -> tuple[int, int] | None:
    """(round, start) of the chained round whose window [start, start + W] holds `now`, or
    else of the next one to open; None when that round would be above MAX_ROUND (the slot is
    never offered again: only a new version of the workload re-offers it)."""
    period = t.chained_period_ms
    elapsed = max(now - close0, 0)
    if elapsed < CHAINED_FAST_ROUNDS * period:
        r = elapsed // period + 1
    else:
        slow = max(period, CHAINED_SLOW_PERIOD_MS)
        r = CHAINED_FAST_ROUNDS + (elapsed - (CHAINED_FAST_ROUNDS - 1) * period) // slow
    start = chained_round_start(r, close0, t)
    if now > start + t.replacement_window_ms:
        r += 1
        start = chained_round_start(r, close0, t)
    if r > MAX_ROUND:
        return None
    return r, start


def round_window(
    r: int, bids: list[Bid], owner: Owner | None, close0: int, t: Timing
) -> RoundWindow:
    """The window of round r >= 1 of a slot (section 5): a chained round of a slot no round
    has filled starts at a fixed time after round 0's close; a replacement round (the slot
    has an owner) starts at the earliest createdAt of its own bids."""
    if owner is None:
        start = chained_round_start(r, close0, t)
    else:
        start = min(b.created_at for b in bids)
    deadline = start + t.replacement_window_ms
    return RoundWindow(r, start, deadline, deadline + t.settle_ms, bids)


def round_winner(
    cluster: ClusterView, t: Timing, wl: Workload, slot: int, rw: RoundWindow
) -> Bid | None:
    """The winner of a closed round >= 1: the counting bid with the highest priority, then
    the lowest rendezvous score of (workload, round, slot, meshlet)."""
    best: Bid | None = None
    best_key: tuple[int, int] | None = None
    for b in rw.bids:
        if bid_counts(cluster, t, wl, b, rw.start, rw.deadline):
            k = (-b.priority, rendezvous_score(wl.uri, rw.round, slot, b.meshlet))
            if best_key is None or k < best_key:
                best, best_key = b, k
    return best


ClosedTest = Callable[[int, RoundWindow, Owner | None], bool]
"""closed(slot, round window, owner before it): whether that round has closed here."""


def walk_slot_rounds(
    cluster: ClusterView,
    t: Timing,
    wl: Workload,
    slot: int,
    by_round: dict[int, list[Bid]],
    owner: Owner | None,
    closed: ClosedTest,
) -> tuple[Owner | None, list[RoundWindow], bool]:
    """Walk the rounds >= 1 of a slot in order from the owner round 0 gave it: each closed
    round with a winner hands it the slot; the walk stops at the first round still open.
    Returns (owner, the rounds walked including an open one, whether one is open)."""
    close0 = round0_window(wl, t)[2]
    walked: list[RoundWindow] = []
    for r, bs in by_round.items():
        rw = round_window(r, bs, owner, close0, t)
        walked.append(rw)
        if not closed(slot, rw, owner):
            return owner, walked, True
        best = round_winner(cluster, t, wl, slot, rw)
        if best is not None:
            owner = (r, best.meshlet)
    return owner, walked, False


def reference_owners(
    cluster: ClusterView,
    t: Timing,
    wl: Workload,
    bids: Sequence[Bid],
    closed: ClosedTest,
) -> tuple[Owner | None, ...]:
    """Every slot's owner by the plain rule, once round 0 has closed: round 0's owners,
    then each slot's later rounds walked in order."""
    owners = round0_owners(cluster, t, wl, bids)
    for s in range(wl.replicas):
        by_round = later_round_bids(bids, s)
        if by_round:
            owners[s] = walk_slot_rounds(cluster, t, wl, s, by_round, owners[s], closed)[0]
    return tuple(owners)


__all__ = [
    "ClosedTest",
    "FinishedSlot",
    "Owner",
    "RoundWindow",
    "WorkloadEntry",
    "bid_counts",
    "chained_round_at",
    "chained_round_start",
    "fill_round0",
    "later_round_bids",
    "reference_owners",
    "round0_owners",
    "round0_rank",
    "round0_window",
    "round_window",
    "round_winner",
    "walk_slot_rounds",
]
