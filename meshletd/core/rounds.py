"""Rounds: bids arrive, rounds close (at their time or early), and the slot owners of a
workload are resolved from its bids by the placement rule (docs/protocol.md, sections 5-7).

`_resolve` is the hot path of the whole simulator (it runs for every workload on every
meshlet): its round 0 judges bids inline through the cluster view's host table. It must give
exactly the owners of `placement.reference_owners` (tests/unit/test_core_fast_path.py)."""

from __future__ import annotations

import heapq

from .bounds import BIDS_PER_MESHLET, MAX_ROUND, MAX_SLOT, bid_refusal
from .hashing import is_candidate, rendezvous_score
from .placement import (
    Owner,
    RoundWindow,
    WorkloadEntry,
    bid_counts,
    fill_round0,
    later_round_bids,
    round0_owners,
    round0_window,
    walk_slot_rounds,
)
from .records import NSID_BID, Bid, MeshletOwner, Workload, split_at_uri
from .state import SchedulerState

EARLY_CLOSE_MAX_MEMBERS = 64
ROUND0_SPARE = 1  # round 0 asks for replicas + this many candidates
REPLACEMENT_CANDIDATES = 3

# What a host-table look-up returns for a meshlet not in the table yet (compared by
# identity; of the table's value type so that the hot loop needs one look-up and no cast).
_NOT_IN_TABLE: tuple[MeshletOwner, frozenset[str]] = (MeshletOwner("", "", "", 0, 0), frozenset())


def _rank_key(x: tuple[int, int, Bid]) -> tuple[int, int]:
    return x[0], x[1]


def _bid_order(b: Bid) -> tuple[int, int, str]:
    """Which bids of one meshlet for one workload count first (section 20)."""
    return (b.round, b.slot, b.uri)


class Rounds(SchedulerState):
    """Bid intake, round closing and the resolution of slot owners."""

    # -- cluster size --------------------------------------------------------------------
    def _small_cluster(self, wl: Workload) -> bool:
        """Whether the owner's cluster has at most 64 members: there every member can list
        a round's candidates, so rounds close early and declines are written."""
        cv = self.cluster.version
        if cv != self._small_cluster_version:
            self._small_cluster_cache.clear()
            self._small_cluster_version = cv
        key = (wl.owner, wl.cluster)
        got = self._small_cluster_cache.get(key)
        if got is None:
            got = self.cluster.member_estimate(wl) <= EARLY_CLOSE_MAX_MEMBERS
            if len(self._small_cluster_cache) >= 4096:
                self._small_cluster_cache.clear()  # keyed by what records name: capped
            self._small_cluster_cache[key] = got
        return got

    def _entry_in_small_cluster(self, e: WorkloadEntry) -> bool:
        """`_small_cluster(e.wl)`, cached on the entry."""
        if e.small_cluster_version != self.cluster.version:
            e.small_cluster = self._small_cluster(e.wl)
            e.small_cluster_version = self.cluster.version
        return e.small_cluster

    # -- candidates ----------------------------------------------------------------------
    def _wanted(self, wl: Workload, slot: int, round_: int, chained: bool = False) -> int:
        """How many candidates a round asks for: replicas + 1 in round 0, 3 in a
        replacement round, and 3 doubling each time in the chained rounds of a slot that
        no round has filled yet (so a short cluster is eventually asked in full)."""
        if round_ == 0:
            return wl.replicas + ROUND0_SPARE
        if chained:
            return REPLACEMENT_CANDIDATES << min(round_, 16)
        return REPLACEMENT_CANDIDATES

    def _candidates(
        self, wl: Workload, slot: int, round_: int, exclude: frozenset[str] = frozenset()
    ) -> list[str] | None:
        """In a small cluster (<= 64 members) the candidates of a round are exactly the
        `wanted` eligible, non-draining members with the lowest rendezvous scores; None in
        a large cluster, where each meshlet samples itself (see `_is_candidate`)."""
        if not self._small_cluster(wl):
            return None
        key = (wl.uri, slot, round_, exclude, self.cluster.version)
        got = self._candidates_cache.get(key)
        if got is None:
            uri = wl.uri
            members = [m for m in self.cluster.active_members(wl) if m not in exclude]
            members.sort(key=lambda m: rendezvous_score(uri, round_, slot, m))
            got = members[: self._wanted(wl, slot, round_, chained=not exclude)]
            if len(self._candidates_cache) > 4096:
                self._candidates_cache.clear()
            self._candidates_cache[key] = got
        return got

    def _is_candidate(
        self, wl: Workload, slot: int, round_: int, exclude: frozenset[str] = frozenset()
    ) -> bool:
        """Whether this meshlet is a candidate of the round (it bids only if it is)."""
        if self._small_cluster(wl):
            cands = self._candidates(wl, slot, round_, exclude)
            return cands is not None and self.me.did in cands
        # Large cluster: sample the wanted number plus two by score threshold (O(1) here).
        return is_candidate(
            rendezvous_score(wl.uri, round_, slot, self.me.did),
            self._wanted(wl, slot, round_, chained=not exclude) + 2,
            self.cluster.member_estimate(wl),
        )

    def _early_closed(
        self,
        e: WorkloadEntry,
        slot: int,
        round_: int,
        bids: list[Bid],
        exclude: frozenset[str] = frozenset(),
    ) -> bool:
        """Early close: every candidate has answered (bid or declined). Only in small
        clusters, where every member can list the candidates. Once closed here, a round
        stays closed (remembered in e.early)."""
        wl = e.wl
        if e.early is not None and (slot, round_) in e.early:
            return True
        if not bids:
            return False
        cands = self._candidates(wl, slot, round_, exclude)
        if not cands:
            return False
        answered = {b.meshlet for b in bids}
        if not all(m in answered for m in cands):
            return False
        if e.early is None:
            e.early = set()
        e.early.add((slot, round_))
        return True

    # -- bids ----------------------------------------------------------------------------
    def _on_bid(self, b: Bid) -> None:
        """A bid was seen (ours included): keep it as evidence for its round."""
        if not (0 <= b.round <= MAX_ROUND and -1 <= b.slot <= MAX_SLOT):
            # The fields that number rounds and index slots, judged here whatever fed the
            # bid; the daemon's lexicon validation refuses the rest before (section 20).
            self._refuse(b.uri, bid_refusal(b))
            return
        if b.meshlet == self.me.did:
            self._my_rkeys.add((NSID_BID, split_at_uri(b.uri)[2]))
        e = self.workloads.get(b.workload_uri)
        if e is None:
            self.orphans.add_bid(b, self.now)
            return
        bids = e.bids
        buri = b.uri
        bidder = b.meshlet
        i = 0
        same = 0  # bids of the same meshlet for this workload
        for old in bids:
            if old.uri == buri:
                if old is b or old == b:
                    return
                bids[i] = b
                break
            if old.meshlet == bidder:
                same += 1
            i += 1
        else:
            if same >= BIDS_PER_MESHLET and not self._bid_room(e, b):
                return
            bids.append(b)
        if e.owners is not None:
            # round 0 closed here: a late or a later-round bid may change the answer.
            self._dirty[b.workload_uri] = None
            if b.round > 0 and b.meshlet != self.me.did:
                self._queue_bid(b.workload_uri)
        elif (
            e.small_cluster
            if e.small_cluster_version == self.cluster.version
            else self._entry_in_small_cluster(e)
        ):
            self._dirty[b.workload_uri] = None  # early close may now hold

    def _bid_room(self, e: WorkloadEntry, b: Bid) -> bool:
        """A meshlet at BIDS_PER_MESHLET bids for one workload: only its smallest
        (round, slot, rkey) count (section 20). Make room for `b` by dropping its largest
        other bid, or refuse `b` (False) when it is the largest itself."""
        key = _bid_order
        mine = [old for old in e.bids if old.meshlet == b.meshlet]
        largest = max(mine, key=key)
        if key(b) > key(largest):
            self._refuse(b.uri, f"{b.meshlet} has {BIDS_PER_MESHLET} bids for this workload")
            return False
        e.bids.remove(largest)
        self._refuse(largest.uri, f"{b.meshlet} has {BIDS_PER_MESHLET} bids for this workload")
        self._reserved.pop((largest.workload_uri, largest.slot, largest.round), None)
        return True

    def _push_close(self, at: int, uri: str) -> None:
        """Remember to resolve uri at `at`. Rounds we take part in (or any round in a small
        cluster) wake us exactly; the others are resolved at the next tick (<= 1 probe
        interval later), which keeps a large commune cheap."""
        e = self.workloads.get(uri)
        if (
            e is None
            or self._entry_in_small_cluster(e)
            or uri in self._involved
            or uri in self._my_bids
        ):
            heapq.heappush(self._closes, (at, uri))
            self._resched = True
        else:
            heapq.heappush(self._lazy_closes, (at, uri))

    # -- resolution ----------------------------------------------------------------------
    def _closed_here(self, e: WorkloadEntry) -> ClosedHere:
        return ClosedHere(self, e)

    def _resolve(self, e: WorkloadEntry) -> int | None:
        """Recompute e.owners from the bids (pure function of records + which rounds have
        closed here). Returns the next close time still pending, if any."""
        wl = e.wl
        n = wl.replicas
        opens0, deadline0, close0 = round0_window(wl, self.t)
        bids = e.bids
        if self.now < close0 and not self._early_closed(
            e, -1, 0, [b for b in bids if b.round == 0]
        ):
            e.owners = None
            return close0
        self.decisions += 1
        uri = wl.uri
        # Round 0 (section 6): the counting bids, in (-priority, score) order. `bid_counts`,
        # inlined: this loop runs for every workload on every meshlet.
        cpu, mem = wl.milli_cpu, wl.memory_mib
        cluster = self.cluster
        eligible = cluster.eligible
        drained_at = cluster.drained_at
        drainy = cluster.drainy()
        table = cluster.host_table(wl)
        # no table (wl has constraints): every lookup misses and `eligible` decides
        hosts, cluster_consent = table if table is not None else ({}, frozenset())
        wowner = wl.owner
        cut = deadline0 + self.t.settle_ms
        # host policies (section 21): only these meshlets can refuse wl (every one for `lan`)
        strict = cluster.strict() if wl.network != "lan" else None
        policy_admits = cluster.policy_admits
        ranked: list[tuple[int, int, Bid]] = []
        later: list[Bid] = []  # bids of later rounds for slots of wl
        for b in bids:
            if b.round != 0:
                if b.round > 0 and 0 <= b.slot < n:
                    later.append(b)
                continue
            if (
                b.slots < 1
                or b.created_at < opens0
                or b.created_at > deadline0
                or b.free_milli_cpu < cpu
                or b.free_memory_mib < mem
            ):
                continue
            m = b.meshlet
            # `eligible(wl, m)`, inlined through the host table when wl has no constraints
            host = hosts.get(m, _NOT_IN_TABLE)
            if host is _NOT_IN_TABLE:
                if not eligible(wl, m):
                    continue
            elif (
                host is None
                or wowner not in host[1]
                or (host[0].owner != wowner and host[0].owner not in cluster_consent)
            ):
                continue
            if drainy and m in drainy and drained_at(m, cut):
                continue
            if (strict is None or (strict and m in strict)) and not policy_admits(wl, m, cut):
                continue
            ranked.append((-b.priority, rendezvous_score(uri, 0, -1, m), b))
        owners: list[Owner | None] = [None] * n
        if ranked:
            ranked.sort(key=_rank_key)
            if not wl.allow_packing:
                # `fill_round0` without packing: one slot per bidder, in rank order.
                owner_of = self._round0_owner_of
                for s, x in enumerate(ranked[:n]):
                    m = x[2].meshlet
                    o = owner_of.get(m)
                    if o is None:
                        o = owner_of[m] = (0, m)  # one tuple per meshlet: memory
                    owners[s] = o
            else:
                filled = fill_round0([x[2] for x in ranked], n, True)
                owners = [None if m is None else (0, m) for m in filled]
        pending: int | None = None
        if later:
            closed = self._closed_here(e)
            for s in range(n):
                by_round = later_round_bids(later, s)
                if not by_round:
                    continue
                owner, walked, is_open = walk_slot_rounds(
                    cluster, self.t, wl, s, by_round, owners[s], closed
                )
                owners[s] = owner
                self.decisions += len(walked) - is_open
                if is_open:
                    close = walked[-1].close
                    pending = close if pending is None else min(pending, close)
        e.owners = tuple(owners)
        return pending

    def _slot_rounds(self, e: WorkloadEntry, slot: int) -> list[RoundWindow]:
        """Every round >= 1 of `slot` that has a bid, as `_resolve` walks them from round 0's
        result, up to the first one still open by the clock (for queries: reads only)."""
        by_round = later_round_bids(e.bids, slot)
        if not by_round:
            return []
        owner: Owner | None = None
        if e.owners is not None and slot < min(len(e.owners), e.wl.replicas):
            owner = round0_owners(self.cluster, self.t, e.wl, e.bids)[slot]
        now = self.now
        return walk_slot_rounds(
            self.cluster,
            self.t,
            e.wl,
            slot,
            by_round,
            owner,
            lambda _s, rw, _o: now >= rw.close,
        )[1]

    def _counts(self, wl: Workload, b: Bid, start: int, deadline: int) -> bool:
        """`placement.bid_counts` with this meshlet's cluster view and timing."""
        return bid_counts(self.cluster, self.t, wl, b, start, deadline)


class ClosedHere:
    """Whether a round >= 1 of a workload has closed here: by the clock, or early (every
    candidate answered; remembered)."""

    __slots__ = ("e", "rounds")

    def __init__(self, rounds: Rounds, e: WorkloadEntry) -> None:
        self.rounds = rounds
        self.e = e

    def __call__(self, slot: int, rw: RoundWindow, owner: Owner | None) -> bool:
        if self.rounds.now >= rw.close:
            return True
        exclude = frozenset({owner[1]}) if owner else frozenset()
        return self.rounds._early_closed(self.e, slot, rw.round, rw.bids, exclude)


__all__ = ["EARLY_CLOSE_MAX_MEMBERS", "REPLACEMENT_CANDIDATES", "ROUND0_SPARE", "Rounds"]
