"""Bidding: when this meshlet bids, in which round, for how many slots, and when it opens a
replacement round for a slot whose host is lost or draining (docs/protocol.md, sections 5-8).
"""

from __future__ import annotations

from .bounds import (
    BIDS_PER_MESHLET,
    MAX_MEMORY_MIB,
    MAX_MILLI_CPU,
    MAX_ROUND,
    MISSED_KEPT,
    bid_refusal,
    clamp,
)
from .commons import AFTER, DEFAULT_PERIOD_DAYS, DEFERRED_PRIORITY, REFUSE, Rule, rule_of, standing
from .fairshare import meshlet_priority
from .hosting import Hosting
from .placement import (
    Owner,
    WorkloadEntry,
    chained_round_at,
    chained_round_start,
    round0_window,
)
from .records import NSID_BID, Bid, Workload, at_uri, split_at_uri
from .state import bid_rkey


class Bidding(Hosting):
    """Bids in open rounds where this meshlet is a candidate, and opens replacement rounds."""

    def _bid_batch(self) -> None:
        """Consider every workload queued for bidding, owners who used least first."""
        queue = self._bid_queue
        self._bid_queue = set()
        self._bid_batch_at = None
        if self.draining or not self.cluster.verified(self.me.did):
            return
        ledger = self.ledger
        ledger.refresh_balances(self.now, self.cluster)
        taken = ledger.taken
        entries = [self.workloads[u] for u in queue if u in self.workloads]
        # Capacity is short? Serve contributors before owners below our minContribution
        # (section 23), then owners who used least first.
        below = self._below_minimum
        entries.sort(
            key=lambda e: (
                below(e.wl.owner) is not None,
                taken.get(e.wl.owner, 0),
                e.wl.created_at,
                e.wl.uri,
            )
        )
        prio = meshlet_priority(self.me.owner, taken, ledger.given)
        for e in entries:
            self._consider(e, prio)

    def contribution(self) -> tuple[Rule | None, dict[str, int], dict[str, int]]:
        """Our host policy's free-rider rule (None: none) and (lent, used) per owner as our
        bids judge them (section 23); over the default period when we set no rule."""
        rule = rule_of(self.cluster.policies.get(self.me.did))
        days = None if rule is not None else DEFAULT_PERIOD_DAYS
        return self.ledger.contribution(self.now, self.cluster, self.me.did, days)

    def _contributor_waiting(self, cpu: int, mem: int) -> bool:
        """Whether a workload of an owner in good standing here has a slot nobody holds,
        not finished, that we could take now (eligible, fits our free room): mode "after"
        keeps that room for it rather than offer it to an owner below (section 23)."""
        me = self.me.did
        cluster = self.cluster
        for e in self.workloads.values():
            owners = e.owners
            wl = e.wl
            if owners is None or None not in owners:
                continue
            if wl.milli_cpu > cpu or wl.memory_mib > mem:
                continue
            if not any(
                c is None
                and not (e.finished and s in e.finished)
                and (wl.allow_packing or not self._holds_other(e, s))
                for s, c in enumerate(owners)
            ):
                continue
            if self._below_minimum(wl.owner) is not None:
                continue
            if cluster.eligible(wl, me) and cluster.policy_refusal(wl, me) is None:
                return True
        return False

    def _below_minimum(self, owner: str) -> str | None:
        """The mode ("after" or "refuse") of our host policy's minContribution when `owner`
        stands below it here (section 23), else None. Our own owner always stands well."""
        if owner == self.me.owner:
            return None
        rule, lent, used = self.ledger.contribution(self.now, self.cluster, self.me.did)
        if rule is None or not standing(owner, lent, used, rule).below:
            return None
        return rule.mode

    def _holds_other(self, e: WorkloadEntry, slot: int) -> bool:
        """Whether we own, run or have bid for another slot of e (one replica per meshlet
        unless the workload allows packing)."""
        uri = e.wl.uri
        if any(k[0] == uri and k[1] != slot for k in self._owned_capacity):
            return True
        # The reservation of a round-0 bid outlives an early close; once round 0 has closed
        # here without giving us a slot it is not a slot we hold (we may bid for one).
        closed0 = e.owners is not None
        return any(
            k[0] == uri and k[1] != slot and not (closed0 and k[1] == -1) for k in self._reserved
        )

    def _consider(self, e: WorkloadEntry, prio: int) -> None:
        """Bid on whatever round of e is open and where this meshlet is a candidate."""
        wl = e.wl
        me = self.me.did
        now = self.now
        uri = wl.uri
        if not self.cluster.eligible(wl, me) or self.cluster.policy_refusal(wl, me) is not None:
            return  # not eligible, or our host policy refuses wl (section 21)
        if self._gave_up and self._gave_up.get(uri) == wl.cid:
            return  # we handed a slot of this version off: it fails here (section 22)
        cpu, mem = self.free_capacity()
        room = self.free_replicas()
        fits = cpu >= wl.milli_cpu and mem >= self.replica_memory_mib(wl.memory_mib) and room != 0
        ports = self.free_ports() if wl.ports else 0
        if wl.ports and ports < len(wl.ports):
            fits = False
        below = self._below_minimum(wl.owner)
        if below == REFUSE:
            fits = False  # below our minContribution: we offer it nothing (section 23)
        elif below == AFTER:
            prio = DEFERRED_PRIORITY  # any host that does not defer it ranks first
            if fits and self._contributor_waiting(cpu, mem):
                fits = False  # our room goes to the contributor first
        opens0, deadline0, close0 = round0_window(wl, self.t)
        if e.owners is None:
            # Round 0: bid once, as a candidate, inside [createdAt, createdAt + window].
            if (
                now < opens0
                or now > deadline0
                or (uri, -1, 0) in self._reserved
                or any(b.meshlet == me and b.round == 0 for b in e.bids)
            ):
                if now < opens0:
                    self._wake(opens0, uri)
                return
            if not self._is_candidate(wl, -1, 0):
                return
            slots = 0
            if fits:
                slots = 1
                if wl.allow_packing:
                    slots = min(
                        wl.replicas,
                        cpu // max(wl.milli_cpu, 1),
                        mem // max(self.replica_memory_mib(wl.memory_mib), 1),
                    )
                    if room is not None:
                        slots = min(slots, room)
                    if wl.ports:
                        slots = min(slots, ports // len(wl.ports))
                slots = self._policy_slots(wl, close0, slots)
            if slots == 0 and not self._small_cluster(wl):
                return  # declines only help early close in small clusters
            self._bid(wl, 0, -1, prio, slots, cpu, mem, close0)
            return
        # Later rounds, slot by slot.
        owners = e.owners
        t = self.t
        for s, cur in enumerate(owners):
            if e.finished and s in e.finished:
                continue
            if cur is not None and cur[1] == me:
                continue
            holds = not wl.allow_packing and self._holds_other(e, s)
            if holds and cur is None:
                return
            slot_bids = [b for b in e.bids if b.slot == s and b.round > 0]
            if cur is None:
                # Chained round for a slot no round has filled.
                if now < close0:
                    self._wake(close0, uri)
                    continue
                chained = chained_round_at(now, close0, t)
                if chained is None:
                    continue  # rounds exhausted (section 20): only a new version re-offers
                r, start = chained
                if now < start:
                    self._wake(start, uri)
                    continue
                if any(b.meshlet == me and b.round == r for b in slot_bids):
                    continue
                close = start + t.replacement_window_ms + t.settle_ms
                if (
                    not fits
                    or not self._is_candidate(wl, s, r)
                    or not self._policy_slots(wl, close, 1)
                ):
                    self._wake(chained_round_start(r + 1, close0, t), uri)
                    continue
                self._bid(wl, r, s, prio, 1, cpu, mem, close)
                return
            # Replacement round opened by someone else and still open here?
            last = max((b.round for b in slot_bids), default=0)
            if last <= cur[0]:
                continue
            bs = [b for b in slot_bids if b.round == last]
            if any(b.meshlet == me for b in bs):
                continue
            start = min(b.created_at for b in bs)
            if now < start:
                continue
            close = start + t.replacement_window_ms + t.settle_ms
            able = not holds and fits and self._policy_slots(wl, close, 1) > 0
            if not self._is_candidate(wl, s, last, frozenset({cur[1]})):
                continue
            if now > start + t.replacement_window_ms:
                if able and self._missed_window(e, s, last, close):
                    return
                continue
            if not able:
                # A candidate that cannot take it declines, in a small cluster, where the
                # round closes early once every candidate answered (section 8, "Declines
                # in replacement rounds"); silent, it held every round to its close.
                if self._small_cluster(wl):
                    self._bid(wl, last, s, prio, 0, cpu, mem, close)
                continue
            self._bid(wl, last, s, prio, 1, cpu, mem, close)
            return

    def _missed_window(self, e: WorkloadEntry, slot: int, round_: int, close: int) -> bool:
        """We could take `slot` but saw its replacement round `round_` open only after the
        round's window: remember it until the round closes; if it closed without a winner
        (the caller only asks while the owner is unchanged), open the next round with our
        bid. True when we did (docs/protocol.md, section 8, "A missed window")."""
        key = (e.wl.uri, slot, round_)
        if self.now < close:
            missed = self._missed
            if key not in missed:
                if len(missed) >= MISSED_KEPT:
                    del missed[next(iter(missed))]
                missed[key] = None
                self._wake(close, e.wl.uri)
            return False
        if key not in self._missed:
            return False  # first seen after its close: perhaps published late, left alone
        del self._missed[key]
        self._open_replacement(e, slot)
        return True

    def _bid(
        self,
        wl: Workload,
        round_: int,
        slot: int,
        prio: int,
        slots: int,
        cpu: int,
        mem: int,
        until: int,
    ) -> None:
        """Write our bid (slots 0: a decline), reserve what it offers until `until`, and
        count it here at once."""
        rkey = bid_rkey(wl.uri, round_, slot)
        mine = self._my_bids.get(wl.uri, ())
        if len(mine) >= BIDS_PER_MESHLET and rkey not in mine:
            # Beyond the bound our new bids would count nowhere (section 20).
            return
        bid = Bid(
            uri=at_uri(self.me.did, NSID_BID, rkey),
            meshlet=self.me.did,
            workload_uri=wl.uri,
            workload_cid=wl.cid,
            round=round_,
            slot=slot,
            priority=prio,
            slots=slots,
            free_milli_cpu=clamp(cpu, 0, MAX_MILLI_CPU),
            free_memory_mib=clamp(mem, 0, MAX_MEMORY_MIB),
            created_at=self.now,
        )
        if bid_refusal(bid):
            # A bid the lexicon refuses cannot be published: acting on it (reserving, counting
            # it here) would make this meshlet the only one to see it (section 20).
            return
        if slots:
            self._reserved[(wl.uri, slot, round_)] = (
                wl.milli_cpu * slots,
                self.replica_memory_mib(wl.memory_mib) * slots,
                until,
                slots,
            )
        rkeys = self._my_bids.setdefault(wl.uri, [])
        if rkey not in rkeys:
            rkeys.append(rkey)
        # Honest only if written by the round's deadline + skew (section 5): `until` is the
        # round's close, deadline + settle. The daemon drops it unwritten after that.
        self._put(NSID_BID, rkey, bid, not_after=until - self.t.settle_ms + self.t.skew_ms)
        self._on_bid(bid)
        self._wake(until, wl.uri)

    def _on_bid_abandoned(self, uri: str) -> None:
        """Forget our bid that was never published (docs/protocol.md, section 14): no
        observer will ever count it, so neither may we."""
        repo, coll, rkey = split_at_uri(uri)
        if repo != self.me.did or coll != NSID_BID:
            return
        self._my_rkeys.discard((coll, rkey))
        for wuri, rkeys in self._my_bids.items():
            if rkey not in rkeys:
                continue
            rkeys.remove(rkey)
            e = self.workloads.get(wuri)
            if e is not None:
                for b in [b for b in e.bids if b.uri == uri]:
                    e.bids.remove(b)
                    self._reserved.pop((wuri, b.slot, b.round), None)
                self._dirty[wuri] = None
            return

    # -- replacement rounds --------------------------------------------------------------
    def _scan_lost(self, hosts: set[str], force: bool = False) -> None:
        """Open replacement rounds for slots owned by lost/draining hosts we answer for."""
        for e in self.workloads.values():
            if e.owners is None:
                continue
            for s, cur in enumerate(e.owners):
                if cur is None or cur[1] not in hosts:
                    continue
                self._reopen(e, s, cur, force)

    def _reopen(self, e: WorkloadEntry, s: int, cur: Owner, force: bool) -> None:
        """Open the next round of slot s, owned by `cur`, unless one is under way.

        Nothing is opened while a round above the owner's is still open (we bid in it as a
        candidate instead), nor when we opened a round against this same owner less than the
        reopen wait ago (`Timing.reopen_wait_ms`: the round's length, doubling up to the
        backoff): the wait is per owner, so a slot whose new owner is lost gets its round
        at once. Without `force` (the periodic re-scan) a round someone else opened
        against this owner is left to them; `force` (a fresh suspicion, a drain) opens
        anyway (docs/protocol.md, section 8)."""
        if e.finished and s in e.finished:
            return
        t = self.t
        now = self.now
        last = self._reopened.get((e.wl.uri, s))
        mine = last is not None and last[1] == cur
        if last is not None and mine and now - last[0] < t.reopen_wait_ms(last[2]):
            self._next_scan = min(self._next_scan, last[0] + t.reopen_wait_ms(last[2]))
            return
        higher = [b for b in e.bids if b.slot == s and b.round > cur[0]]
        if higher:
            top = max(b.round for b in higher)
            start = min(b.created_at for b in higher if b.round == top)
            close = start + t.replacement_window_ms + t.settle_ms
            if now <= close:
                # Open, or closing in this very tick (its winner is resolved after the scan
                # that called us): look again just after, when it is known.
                if mine:
                    self._next_scan = min(self._next_scan, close + 1)
                return
            if not mine and not force:
                return
        self._open_replacement(e, s)

    def _open_replacement(self, e: WorkloadEntry, slot: int) -> None:
        """Open the next round for a slot whose owner is lost or draining."""
        wl = e.wl
        rounds = [b.round for b in e.bids if b.slot == slot]
        cur = e.owners[slot] if e.owners else None
        r = max([*rounds, cur[0] if cur else 0]) + 1
        if r > MAX_ROUND:
            return  # rounds exhausted (section 20): the slot keeps its owner
        cpu, mem = self.free_capacity()
        t = self.t
        close = self.now + t.replacement_window_ms + t.settle_ms
        fits = (
            cpu >= wl.milli_cpu
            and mem >= self.replica_memory_mib(wl.memory_mib)
            and self.free_replicas() != 0
            and not self.draining
            and self.cluster.eligible(wl, self.me.did)
            and (cur is None or cur[1] != self.me.did)
            and (wl.allow_packing or not self._holds_other(e, slot))
            and (not wl.ports or self.free_ports() >= len(wl.ports))
            and self._gave_up.get(wl.uri) != wl.cid
            and self.cluster.policy_refusal(wl, self.me.did) is None
            and self._policy_slots(wl, close, 1) > 0
        )
        below = self._below_minimum(wl.owner)
        if below == REFUSE:
            fits = False  # an empty bid still opens the round for the others (section 23)
        ledger = self.ledger
        ledger.refresh_balances(self.now, self.cluster)
        prio = meshlet_priority(self.me.owner, ledger.taken, ledger.given)
        if below == AFTER:
            prio = DEFERRED_PRIORITY
        if cur is not None:
            last = self._reopened.get((wl.uri, slot))
            opened = last[2] + 1 if last is not None and last[1] == cur else 1
            self._reopened[(wl.uri, slot)] = (self.now, cur, opened)
            # The scan that reopens it, should it find no winner (section 8, "Reopening").
            self._next_scan = min(self._next_scan, self.now + t.reopen_wait_ms(opened))
        self._bid(
            wl,
            r,
            slot,
            prio,
            1 if fits else 0,
            cpu,
            mem,
            close,
        )


__all__ = ["Bidding"]
