"""The scheduler state machine of one meshlet: events in, actions out.

Pure: no I/O, no await, no clock reads (time arrives in Tick), no randomness. The rules it
implements are written normatively in docs/protocol.md; the section names are cited in each
layer. The core is built in layers, each in its own module:

- `state`: what a meshlet remembers, and writing our records;
- `placement`: the placement rule, pure (which bids count, round 0, the later rounds);
- `rounds`: bid intake, closing rounds (at their time or early), resolving slot owners;
- `bidding`: when and what this meshlet bids, replacement rounds;
- `reconcile`: local replicas, status records, usage counting; `updates`: rolling updates;
- `explain`: "why pending";
- `liveness` (probes, suspicions) and `ledger` (usage, fair-share balances): components;
- this module: the public `Scheduler`, record intake, ticks and wake-ups, drain.
"""

from __future__ import annotations

import heapq

from .actions import Action, Reply, WakeAt
from .bounds import (
    GONE_BIDS_KEPT,
    MAX_REPLICAS,
    MAX_ROUND,
    MAX_SLOT,
    WORKLOADS_PER_OWNER,
    status_refusal,
    workload_refusal,
)
from .events import (
    BidAbandoned,
    Event,
    FeedsBehind,
    ProbeResult,
    RecordDeleted,
    RecordSeen,
    ReplicaStateChanged,
    SetDraining,
    Tick,
)
from .explain import Explanations
from .hashing import is_candidate, own_score
from .placement import Owner, WorkloadEntry, round0_window
from .records import (
    MAX_DRAINS,
    NSID_BID,
    NSID_HOST_POLICY,
    NSID_LEASE,
    NSID_MESHLET_OWNER,
    NSID_STATUS,
    NSID_USAGE,
    NSID_WORKLOAD,
    Bid,
    HostPolicy,
    Lease,
    Membership,
    MeshletLink,
    MeshletOwner,
    Record,
    Usage,
    Workload,
    WorkloadStatus,
    at_uri,
    split_at_uri,
)
from .rounds import ROUND0_SPARE
from .state import MeshletIdentity, bid_rkey, status_rkey
from .timing import LEASE_MAX_VALID_MS
from .updates import Updates

TERMINAL = frozenset({"succeeded", "failed"})


class Scheduler(Explanations, Updates):
    """One meshlet's scheduler core. Feed events to `handle`; perform the returned actions.

    Public read-only views: `placement()` (the slots of every known workload as this meshlet
    sees them), `replicas()` (local replicas), `free_capacity()`, `pending_reasons()`,
    `suspects`, `decisions` (rounds resolved so far).
    """

    # ==================================================================== public API
    def handle(self, event: Event) -> list[Action]:
        """Apply one event; return the actions to perform, in order (writes first)."""
        out: list[Action] = []
        self._out = out
        self._writes_out = 0
        self._apply(event)
        self._flush()
        return out

    def handle_batch(self, events: list[Event]) -> list[Action]:
        """Apply several events (e.g. one firehose frame or a listRecords page) and decide
        once: the start-up snapshot MUST come this way, so that nothing is decided on a
        half-read state (docs/protocol.md, section 13)."""
        out: list[Action] = []
        self._out = out
        self._writes_out = 0
        on_record = self._on_record
        on_bid = self._on_bid
        on_status = self._on_status
        for event in events:
            if type(event) is RecordSeen:
                rec = event.record
                # The two most frequent records, dispatched here (same as `_on_record`).
                if type(rec) is Bid:
                    on_bid(rec)
                elif type(rec) is WorkloadStatus:
                    on_status(rec)
                else:
                    on_record(rec)
            else:
                self._apply(event)
        if not self._view_read:  # the start-up batch: the view is complete (section 13)
            self._view_read = True
            self._resolve_dirty()  # (who owns each slot now decides which statuses go)
            self._drop_own_orphans()
        self._flush()
        return out

    def placement(self) -> dict[str, tuple[Owner | None, ...]]:
        """Slot owners of every workload whose round 0 has closed here."""
        return {u: e.owners for u, e in self.workloads.items() if e.owners is not None}

    def replicas(self) -> dict[tuple[str, int], str]:
        """Local replicas and their states."""
        return {k: r.state for k, r in self._replicas.items()}

    # ==================================================================== events
    def _apply(self, event: Event) -> None:
        if type(event) is RecordSeen:
            self._on_record(event.record)
        elif type(event) is ProbeResult:
            self._on_probe(event)
        elif type(event) is Tick:
            if event.now > self.now:
                self.now = event.now
            self._resched = True
            self._on_tick()
        elif type(event) is RecordDeleted:
            self._on_deleted(event.uri)
        elif type(event) is ReplicaStateChanged:
            self._resched = True
            self._on_replica(event)
        elif type(event) is SetDraining:
            self._resched = True
            self._on_drain(event)
        elif type(event) is BidAbandoned:
            self._on_bid_abandoned(event.uri)
        elif type(event) is FeedsBehind:
            self.liveness.feeds_behind = event.repos

    def _on_probe(self, p: ProbeResult) -> None:
        if self.liveness.on_probe(p.meshlet, p.ok, self.now) and not self.liveness.isolated(
            self.now
        ):
            self._scan_lost({p.meshlet}, force=True)
        # A new suspect while we look isolated: maybe we are the one cut off. Suspicions that
        # outlive our isolation are acted on by the periodic scan; those that were our own
        # cut-off clear at the first probe that answers (acting on them at once re-placed
        # healthy slots).

    def _renew_lease(self) -> None:
        """Without an endpoint nobody can probe us: our lease says we are alive
        (docs/protocol.md, section 8). Renewed every `lease_renew_ms`: 2 points each."""
        t = self.t
        self._next_lease = self.now + t.lease_renew_ms
        self._put(
            NSID_LEASE,
            "self",
            Lease(
                uri=at_uri(self.me.did, NSID_LEASE, "self"),
                meshlet=self.me.did,
                renewed_at=self.now,
                valid_ms=min(t.lease_valid_ms, LEASE_MAX_VALID_MS),
            ),
        )

    # ==================================================================== records
    def _on_record(self, rec: Record) -> None:
        if type(rec) is Bid:
            self._on_bid(rec)
        elif type(rec) is WorkloadStatus:
            self._on_status(rec)
        elif type(rec) is Workload:
            self._on_workload(rec)
        elif type(rec) is Usage:
            self.ledger.put_usage(rec)
            self._note_mine(rec.uri)
        elif type(rec) is MeshletOwner:
            self._on_meshlet_owner(rec)
        elif type(rec) is MeshletLink:
            self.cluster.put_link(rec)
            self._cluster_changed()
        elif type(rec) is HostPolicy:
            self._on_host_policy(rec)
        elif type(rec) is Membership:
            self.cluster.put_membership(rec)
            self._cluster_changed()
        elif type(rec) is Lease:
            liveness = self.liveness
            was_isolated = bool(liveness.suspects) and liveness.isolated(self.now)
            liveness.on_lease(rec, self.now)
            self._note_mine(rec.uri)
            if was_isolated and not liveness.isolated(self.now):
                # The renewal shows our view is current: the suspicions we held back while
                # we might have been the one cut off are acted on now, not at the next scan
                # (chaos, 30 % of hosts behind NAT: +15-30 s failovers of reachable hosts
                # whose watcher probed no other peer).
                self._scan_lost(set(liveness.suspects))

    def _on_meshlet_owner(self, rec: MeshletOwner) -> None:
        old = self.cluster.owners.get(rec.meshlet)
        if old == rec:
            if old is not None and rec.meshlet == self.me.did and old.extra != rec.extra:
                # Only fields the core does not model changed (the daemon published a new
                # version or key): keep them for our next rewrite, decide nothing.
                self.cluster.owners[rec.meshlet] = rec
            return
        self.cluster.put_owner(rec)
        self._note_mine(rec.uri)
        if rec.meshlet == self.me.did:
            self.draining = rec.state == "draining"
            self.draining_since = rec.state_since
        self._cluster_changed()

    def _on_workload(self, wl: Workload) -> None:
        refusal = workload_refusal(wl)
        if refusal:
            self._refuse(wl.uri, refusal, min(max(wl.replicas, 0), MAX_REPLICAS))
            return
        e = self.workloads.get(wl.uri)
        if e is None:
            if not self._owner_room(wl):
                return
            e = WorkloadEntry(wl)
            self.workloads[wl.uri] = e
            orphan_bids, orphan_statuses = self.orphans.take(wl.uri)
            if orphan_bids:
                e.bids.extend(orphan_bids)
            for st in orphan_statuses:
                self._store_status(e, st)
            uri = wl.uri
            small = self._entry_in_small_cluster(e)
            # `_is_candidate(wl, -1, 0)`, inlined for a large cluster (this runs for every
            # workload on every meshlet)
            if small or is_candidate(
                own_score(uri, 0, -1, self.me.did),
                wl.replicas + ROUND0_SPARE + 2,
                self.cluster.member_estimate(wl),
            ):
                self._queue_bid(uri)
            close0 = round0_window(wl, self.t)[2]
            if self.now < close0 and not e.bids:
                # Nothing to resolve before the close (or before a bid allows early close).
                # `_push_close(close0, uri)`, inlined
                if small or uri in self._involved or uri in self._my_bids:
                    heapq.heappush(self._closes, (close0, uri))
                    self._resched = True
                else:
                    heapq.heappush(self._lazy_closes, (close0, uri))
                return
        else:
            if e.wl == wl:
                return
            e.wl = wl
        self._dirty[wl.uri] = None

    def _owner_room(self, wl: Workload) -> bool:
        """An owner's workloads that take part are the WORKLOADS_PER_OWNER with the smallest
        record keys (section 20): make room for `wl` by setting aside (forgetting, as if
        deleted) the owner's one with the largest key, or refuse `wl` (False) when its key
        is larger than all of theirs."""
        keys = self._owner_keys.setdefault(wl.owner, set())
        rkey = split_at_uri(wl.uri)[2]
        if len(keys) >= WORKLOADS_PER_OWNER:
            reason = (
                f"its owner has {WORKLOADS_PER_OWNER} workloads with smaller record keys "
                "(at most that many take part, docs/protocol.md section 20)"
            )
            largest = max(keys)
            if rkey > largest:
                self._refuse(wl.uri, reason, wl.replicas)
                return False
            uri = at_uri(wl.owner, NSID_WORKLOAD, largest)
            aside = self.workloads[uri].wl.replicas
            self._on_workload_deleted(uri)
            self._dirty[uri] = None  # reconciled as gone: nothing of it runs here
            self._refuse(uri, reason, aside)
        keys.add(rkey)
        self._unrefuse(wl.uri)
        return True

    def _on_status(self, st: WorkloadStatus) -> None:
        if not (0 <= st.round <= MAX_ROUND and 0 <= st.slot <= MAX_SLOT):
            # the fields that enter make-before-break, judged here whatever fed the status
            # (section 20)
            self._refuse(st.uri, status_refusal(st))
            return
        if st.meshlet == self.me.did:
            self._my_rkeys.add((NSID_STATUS, split_at_uri(st.uri)[2]))
        e = self.workloads.get(st.workload_uri)
        if e is None:
            if st.state in TERMINAL or st.state == "running":
                self.orphans.add_status(st, self.now)
            return
        if self._store_status(e, st):
            self._dirty[st.workload_uri] = None

    def _store_status(self, e: WorkloadEntry, st: WorkloadStatus) -> bool:
        """Keep statuses that matter here: terminal ones (a finished job is never re-placed)
        and, for workloads we bid on or run, the others' (make-before-break needs them)."""
        if st.state in TERMINAL:
            if e.finished is None:
                e.finished = {}
            e.finished[st.slot] = (st.meshlet, st.round, st.state)
            return True
        uri = e.wl.uri
        if uri not in self._involved and uri not in self._my_bids and st.meshlet != self.me.did:
            return False
        if e.statuses is None:
            e.statuses = {}
        replaced = e.statuses.get((st.meshlet, st.slot))
        if replaced is not None and replaced.uri != st.uri:
            # one status per (meshlet, slot) is kept: so is one URI for it (section 20)
            self._status_keys.pop(replaced.uri, None)
        e.statuses[(st.meshlet, st.slot)] = st
        self._status_keys[st.uri] = (uri, st.slot)
        finished = e.finished
        if finished and st.slot in finished and finished[st.slot][0] == st.meshlet:
            if finished[st.slot][1] <= st.round and st.state not in TERMINAL:
                del finished[st.slot]
        return True

    def _on_deleted(self, uri: str) -> None:
        repo, coll, rkey = split_at_uri(uri)
        if repo == self.me.did:
            self._my_rkeys.discard((coll, rkey))
        if coll == NSID_WORKLOAD:
            self._on_workload_deleted(uri)
            return
        if coll == NSID_BID:
            self._on_bid_deleted(uri, repo, rkey)
            return
        if coll == NSID_STATUS:
            self._on_status_deleted(uri, repo)
            return
        if coll == NSID_USAGE:
            self.ledger.delete_usage(uri)
            return
        if coll == NSID_HOST_POLICY:
            self._on_host_policy_deleted(uri, repo)
            return
        if self.cluster.delete(uri, repo):
            self._cluster_changed()

    def _on_workload_deleted(self, uri: str) -> None:
        self._unrefuse(uri)
        e = self.workloads.pop(uri, None)
        self.orphans.take(uri)
        if e is None:
            return
        keys = self._owner_keys.get(e.wl.owner)
        if keys is not None:
            keys.discard(split_at_uri(uri)[2])
            if not keys:
                del self._owner_keys[e.wl.owner]
        gone = self._gone_bids
        for b in e.bids:
            gone[b.uri] = None  # their deletions will come: nothing to look for then
        while len(gone) > GONE_BIDS_KEPT:
            del gone[next(iter(gone))]
        for s in range(e.wl.replicas):
            self._reopened.pop((uri, s), None)
        self._forget_missed(uri)
        self._gave_up.pop(uri, None)
        for st in (e.statuses or {}).values():
            self._status_keys.pop(st.uri, None)
        for key in [k for k in self._replicas if k[0] == uri]:
            if self._replicas[key].state == "paused":  # nothing runs
                del self._replicas[key]
            else:
                self._stop(key, "deleted")
        for key in [k for k in self._owned_capacity if k[0] == uri]:
            del self._owned_capacity[key]
        for rkey3 in [k for k in self._reserved if k[0] == uri]:
            del self._reserved[rkey3]
        for rk in self._my_bids.pop(uri, ()):
            self._delete(NSID_BID, rk)
        for s in range(e.wl.replicas):
            self._delete(NSID_STATUS, status_rkey(uri, s))

    def _on_bid_deleted(self, uri: str, meshlet: str, rkey: str) -> None:
        """Forget a deleted bid (section 20): it no longer counts, here as everywhere. Most
        deletions are of bids whose workload is gone; then there is nothing to look for."""
        if self._gone_bids.pop(uri, 0) is None:
            return
        if self.orphans.remove_bid(uri):
            return
        if meshlet == self.me.did:
            # one of ours (e.g. a write the PDS refused): the workload is known by its rkey
            found = [u for u, rkeys in self._my_bids.items() if rkey in rkeys]
            entries = [self.workloads[u] for u in found if u in self.workloads]
        else:
            entries = list(self.workloads.values())
        for e in entries:
            for i, b in enumerate(e.bids):
                if b.uri == uri:
                    del e.bids[i]
                    self._reserved.pop((b.workload_uri, b.slot, b.round), None)
                    self._dirty[b.workload_uri] = None
                    return

    def _on_status_deleted(self, uri: str, meshlet: str) -> None:
        """Forget a deleted status: a host deletes it when it loses the slot, and a stale
        `running` kept here would pass for the new owner's make-before-break signal if the
        slot ever came back to that host at the same round (docs/protocol.md, section 9). A
        finished job stays finished (e.finished is kept): it is never re-placed."""
        key = self._status_keys.pop(uri, None)
        if key is None:
            self.orphans.remove_status(uri)
            return
        wl_uri, slot = key
        e = self.workloads.get(wl_uri)
        if e is None:
            return
        if e.statuses:
            st = e.statuses.get((meshlet, slot))
            if st is not None and st.uri == uri:
                del e.statuses[(meshlet, slot)]

    # ==================================================================== drain
    def _my_owner_record(self, state: str) -> MeshletOwner:
        """Our meshletOwner record in `state`, built on the last one of our repo: the fields
        the core does not model (encryption key, version...) are kept, and undrain appends
        the drain it ends to `drains` (the newest MAX_DRAINS), so that the rounds that closed
        during the drain keep their judgement (docs/protocol.md, section 4)."""
        me = self.me
        last = self.cluster.owners.get(me.did)
        drains = last.drains if last is not None else ()
        if state == "active" and self.draining:
            since = self.draining_since
            if last is not None and last.state == "draining":
                since = last.state_since
            drains = (*drains, (since, max(since, self.now)))[-MAX_DRAINS:]
        return MeshletOwner(
            uri=at_uri(me.did, NSID_MESHLET_OWNER, "self"),
            meshlet=me.did,
            owner=me.owner,
            milli_cpu=me.milli_cpu,
            memory_mib=me.memory_mib,
            state=state,
            state_since=self.now,
            arch=me.arch,
            labels=me.labels,
            endpoint=me.endpoint,
            drains=drains,
            extra=last.extra if last is not None else "",
        )

    def _on_drain(self, cmd: SetDraining) -> None:
        """Operator command: drain (re-offer every slot we own, start nothing new) or
        undrain; written in our meshletOwner record."""
        state = "draining" if cmd.draining else "active"
        if self.draining == cmd.draining:
            if cmd.request_id:
                self._out.append(Reply(cmd.request_id, True, f"already {state}"))
            return
        rec = self._my_owner_record(state)
        self._put(NSID_MESHLET_OWNER, "self", rec)
        self.cluster.put_owner(rec)
        self._cluster_changed()
        self.draining = cmd.draining
        self.draining_since = self.now
        if cmd.draining:
            self._scan_lost({self.me.did}, force=True)
        if cmd.request_id:
            self._out.append(Reply(cmd.request_id, True, state))

    # ==================================================================== tick
    def _on_tick(self) -> None:
        """Time passed: close rounds, wake workloads, expire reservations, probe, scan for
        lost hosts, restart or fence replicas, close the usage period."""
        now = self.now
        for closes in (self._closes, self._lazy_closes):
            while closes and closes[0][0] <= now:
                _, uri = heapq.heappop(closes)
                self._dirty[uri] = None
        wakes = self._wakes
        while wakes and wakes[0][0] <= now:
            _, uri = heapq.heappop(wakes)
            self._dirty[uri] = None
            self._bid_queue.add(uri)
            self._bid_batch_at = now
        if self._reserved:
            for rkey3 in [k for k, v in self._reserved.items() if v[2] <= now]:
                del self._reserved[rkey3]
        liveness = self.liveness
        if self.me.lease and (self._next_lease is None or now >= self._next_lease):
            self._renew_lease()
        if now >= liveness.next_probe:
            liveness.next_probe = now + self.t.probe_interval_ms
            probes, answers = liveness.probe_round(now)
            self._out.extend(probes)
            for meshlet, ok in answers:  # peers behind NAT: their lease answers
                self._on_probe(ProbeResult(meshlet, ok))
        if now >= self._next_scan:
            self._next_scan = now + self.t.reopen_backoff_ms // 2
            lost = set() if liveness.isolated(now) else set(liveness.suspects)
            if self.draining:
                lost.add(self.me.did)
            if lost:
                self._scan_lost(lost)
            self._replace_misfits(force=False)
        if self._replicas_waiting:
            for key, rep in self._waiting_replicas():
                if rep.restart_at is not None and rep.restart_at <= now:
                    self._dirty[key[0]] = None
                if rep.lost_at is not None or self._due(rep) <= now:
                    self._dirty[key[0]] = None
        if self.orphans.first_seen:
            self.orphans.expire(now)
        self._usage_tick()

    # ==================================================================== decide
    def _flush(self) -> None:
        """Decide once after the events: resolve what changed, bid, ask for a wake-up."""
        if self._dirty:
            self._resolve_dirty()
        if self._bid_batch_at is not None and self._bid_batch_at <= self.now:
            self._bid_batch()
            self._resolve_dirty()
        if self.orphans.over:  # a writer above its share (section 20)
            self.orphans.trim()
        if self._resched or self._out:
            self._schedule()

    def _resolve_dirty(self) -> None:
        """Resolve and reconcile every workload marked dirty (again, up to 4 passes, for
        what the resolution itself marks)."""
        rounds = 0
        if self._dirty:
            self._resched = True
        while self._dirty and rounds < 4:
            rounds += 1
            dirty = self._dirty
            self._dirty = {}
            for uri in dirty:
                e = self.workloads.get(uri)
                if e is None:
                    self._reconcile_gone(uri)
                    continue
                before = e.owners
                pending = self._resolve(e)
                if pending is not None:
                    self._push_close(pending, uri)
                if e.owners != before and e.owners is not None and None in e.owners:
                    self._bid_queue.add(uri)
                    if self._bid_batch_at is None:
                        self._bid_batch_at = self.now + self.t.bid_batch_ms
                self._reconcile(e)

    def _schedule(self) -> None:
        """Ask for a Tick at the next deadline (WakeAt), when it changed."""
        if not self._resched and not self._out:
            return
        self._resched = False
        nxt = [self.liveness.next_probe, self._next_scan]
        if self._next_lease is not None:
            nxt.append(self._next_lease)
        if self._closes:
            nxt.append(self._closes[0][0])
        if self._wakes:
            nxt.append(self._wakes[0][0])
        if self._bid_batch_at is not None:
            nxt.append(self._bid_batch_at)
        for _, rep in self._waiting_replicas() if self._replicas_waiting else ():
            if rep.restart_at is not None:
                nxt.append(rep.restart_at)
            if rep.lost_at is not None:
                nxt.append(rep.lost_at + self.t.fence_timeout_ms)
            nxt.append(self._due(rep))  # a job's stop, an update's bound (far: none)
        period_end = self.ledger.period_end()
        if period_end is not None:
            nxt.append(period_end)
        at = max(min(nxt), self.now + 1)
        if at != self._last_wake or self.now >= at - 1:
            self._last_wake = at
            self._out.append(WakeAt(at))


__all__ = ["MeshletIdentity", "Scheduler", "bid_rkey", "status_rkey"]
