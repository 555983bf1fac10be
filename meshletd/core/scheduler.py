"""The scheduler state machine of one meshlet: events in, actions out.

Pure: no I/O, no await, no clock reads (time arrives in Tick), no randomness. The rules it
implements are written normatively in docs/protocol.md; the section names are cited below.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

from .actions import (
    Action,
    DeleteRecord,
    ProbePeer,
    PutRecord,
    Reply,
    StartReplica,
    StopReplica,
    WakeAt,
)
from .cluster import ClusterView
from .events import (
    Event,
    ProbeResult,
    RecordDeleted,
    RecordSeen,
    ReplicaStateChanged,
    SetDraining,
    Tick,
)
from .fairshare import balances, meshlet_priority
from .hashing import is_candidate, own_score, rendezvous_score, watch_score
from .records import (
    MAX_DRAINS,
    NSID_BID,
    NSID_LEASE,
    NSID_MESHLET_OWNER,
    NSID_STATUS,
    NSID_USAGE,
    NSID_WORKLOAD,
    Bid,
    Lease,
    Membership,
    MeshletLink,
    MeshletOwner,
    Usage,
    UsageEntry,
    Workload,
    WorkloadStatus,
    at_uri,
    format_datetime_ms,
    split_at_uri,
)
from .timing import DEFAULT_TIMING, LEASE_MAX_VALID_MS, Timing

Owner = tuple[int, str]  # (round, meshlet DID) that owns a slot
TERMINAL = frozenset({"succeeded", "failed"})
EARLY_CLOSE_MAX_MEMBERS = 64
ROUND0_SPARE = 1  # round 0 asks for replicas + this many candidates
REPLACEMENT_CANDIDATES = 3


@dataclass(frozen=True, slots=True)
class MeshletIdentity:
    """Who this meshlet is and what it offers (the content of its meshletOwner record)."""

    did: str
    owner: str
    milli_cpu: int
    memory_mib: int
    arch: str = "amd64"
    labels: frozenset[str] = frozenset()
    endpoint: str = ""
    lease: bool = False
    """Nobody can reach us (no endpoint, behind NAT): we write a lease every
    `lease_renew_ms` and our watchers judge us by it (docs/protocol.md, section 8)."""


_UNKNOWN: Any = object()  # not in the host table yet


def _first_two(x: tuple[int, int, Bid]) -> tuple[int, int]:
    return x[0], x[1]


def _rkey(prefix: str, text: str) -> str:
    return prefix + blake2b(text.encode(), digest_size=8).hexdigest()


def bid_rkey(workload_uri: str, round_: int, slot: int) -> str:
    """Deterministic rkey of our bid for (workload, round, slot): rewriting is idempotent."""
    return _rkey("b", f"{workload_uri}|{round_}|{slot}")


def status_rkey(workload_uri: str, slot: int) -> str:
    """Deterministic rkey of our status record for (workload, slot)."""
    return _rkey("s", f"{workload_uri}|{slot}")


class _Entry:
    """What one meshlet knows about one workload."""

    __slots__ = ("bids", "done", "early", "owners", "small", "small_v", "statuses", "wl")

    def __init__(self, wl: Workload) -> None:
        self.wl = wl
        self.small = False  # _small(wl), cached for cluster version small_v
        self.small_v = -1
        self.bids: list[Bid] = []
        self.owners: tuple[Owner | None, ...] | None = None  # None: round 0 not closed yet
        self.statuses: dict[tuple[str, int], WorkloadStatus] | None = None
        self.done: dict[int, tuple[str, int, str]] | None = None  # slot -> (meshlet, round, state)
        self.early: set[tuple[int, int]] | None = None  # (slot, round) closed early here


class _Replica:
    __slots__ = (
        "exit_code",
        "lost_at",
        "restart_at",
        "restarts",
        "round",
        "since",
        "state",
        "written",
    )

    def __init__(self, round_: int) -> None:
        self.round = round_
        self.state = "starting"  # starting | running | exited | stopping
        self.since = 0
        self.restarts = 0
        self.exit_code: int | None = None
        self.restart_at: int | None = None
        self.lost_at: int | None = None
        self.written = ""  # last state written in our status record


class Scheduler:
    """One meshlet's scheduler core. Feed events to `handle`; perform the returned actions.

    Public read-only views: `placement()` (the slots of every known workload as this meshlet
    sees them), `replicas()` (local replicas), `decisions` (rounds resolved so far).
    """

    def __init__(self, me: MeshletIdentity, timing: Timing = DEFAULT_TIMING) -> None:
        self.me = me
        self.t = timing
        self.now = 0
        self.cluster = ClusterView()
        self.workloads: dict[str, _Entry] = {}
        self._won0: dict[str, Owner] = {}  # meshlet -> (0, meshlet), shared by all entries
        self._orphan_bids: dict[str, list[Bid]] = {}
        self._orphan_status: dict[str, list[WorkloadStatus]] = {}
        # status URI -> (workload URI, slot) of every non-terminal status kept (for deletions)
        self._status_keys: dict[str, tuple[str, int]] = {}
        self._replicas: dict[tuple[str, int], _Replica] = {}
        self._timed: dict[tuple[str, int], None] = {}  # replicas with restart_at or lost_at
        self._reserved: dict[tuple[str, int, int], tuple[int, int, int]] = {}  # -> cpu,mem,until
        self._held: dict[tuple[str, int], tuple[int, int]] = {}  # slots we own or still run
        self._my_rkeys: set[tuple[str, str]] = set()
        self._my_bids: dict[str, list[str]] = {}  # workload uri -> our bid rkeys
        self._closes: list[tuple[int, str]] = []  # heap of (close time, workload uri)
        self._lazy_closes: list[tuple[int, str]] = []  # closes that need no exact wake-up
        self._wakes: list[tuple[int, str]] = []  # heap of (time, workload uri) to re-evaluate
        self._bid_queue: set[str] = set()
        self._bid_batch_at: int | None = None
        self._dirty: dict[str, None] = {}  # workloads to re-resolve, in a deterministic order
        self._cand_cache: dict[tuple[object, ...], list[str]] = {}
        self._small_cache: dict[tuple[str, str], bool] = {}
        self._small_version = -1
        self._involved: set[str] = set()  # workloads where we own a slot or run a replica
        self.draining = False
        self.draining_since = 0
        # liveness
        self._watched: list[str] = []
        self._probes: list[ProbePeer] = []  # ProbePeer actions for _watched (immutable)
        self._watch_key: tuple[int, int, int] = (-1, -1, -1)
        self._suspect_changes = 0
        self._probed: dict[str, int] = {}  # peer -> when it last answered a probe
        self._ring_after: list[str] = []
        self._watch_version = -1
        self._fails: dict[str, int] = {}
        self.suspects: set[str] = set()
        self._next_probe = 0
        self._next_scan = 0
        # peers without endpoint are judged by their lease (docs/protocol.md, section 8)
        self._leases: dict[str, tuple[int, int]] = {}  # peer -> (renewedAt, fresh until)
        self._lease_news = 0  # when a lease renewal last reached us (anyone's, ours too)
        self._fail_since: dict[str, int] = {}  # peer -> first failure of its current streak
        self._next_lease: int | None = None  # when we renew ours (None: we have an endpoint)
        # (workload, slot) -> (when we last opened a round for it, the owner it replaced)
        self._reopened: dict[tuple[str, int], tuple[int, Owner]] = {}
        # fair share
        self._usages: dict[str, Usage] = {}
        self._period_start: int | None = None
        self._period_use: dict[str, list[int]] = {}
        self._balance_at = -1
        self._taken: dict[str, int] = {}
        self._given: dict[str, int] = {}
        self.decisions = 0
        self._out: list[Action] = []
        self._resched = True
        self._last_wake = -1

    # ==================================================================== public API
    def handle(self, event: Event) -> list[Action]:
        """Apply one event; return the actions to perform, in order (writes first)."""
        out: list[Action] = []
        self._out = out
        self._apply(event)
        self._flush()
        return out

    def handle_batch(self, events: list[Event]) -> list[Action]:
        """Apply several events (e.g. one firehose frame or a listRecords page) and decide
        once: the start-up snapshot MUST come this way, so that nothing is decided on a
        half-read state (docs/protocol.md, section 13)."""
        out: list[Action] = []
        self._out = out
        on_record = self._on_record
        on_bid = self._on_bid
        on_status = self._on_status
        for event in events:
            if type(event) is RecordSeen:
                rec = event.record
                kind = type(rec)
                # The two most frequent records, dispatched here (same as `_on_record`).
                if kind is Bid:
                    on_bid(rec)  # type: ignore[arg-type]
                elif kind is WorkloadStatus:
                    on_status(rec)  # type: ignore[arg-type]
                else:
                    on_record(rec)
            else:
                self._apply(event)
        self._flush()
        return out

    def _apply(self, event: Event) -> None:
        kind = type(event)
        if kind is RecordSeen:
            self._on_record(event.record)  # type: ignore[union-attr]
        elif kind is ProbeResult:
            self._on_probe(event)  # type: ignore[arg-type]
        elif kind is Tick:
            if event.now > self.now:  # type: ignore[union-attr]
                self.now = event.now  # type: ignore[union-attr]
            self._resched = True
            self._on_tick()
        elif isinstance(event, RecordSeen):
            self._on_record(event.record)
        elif isinstance(event, Tick):
            if event.now > self.now:
                self.now = event.now
            self._resched = True
            self._on_tick()
        elif isinstance(event, RecordDeleted):
            self._on_deleted(event.uri)
        elif isinstance(event, ProbeResult):
            self._on_probe(event)
        elif isinstance(event, ReplicaStateChanged):
            self._resched = True
            self._on_replica(event)
        elif isinstance(event, SetDraining):
            self._resched = True
            self._on_drain(event)

    def placement(self) -> dict[str, tuple[Owner | None, ...]]:
        """Slot owners of every workload whose round 0 has closed here."""
        return {u: e.owners for u, e in self.workloads.items() if e.owners is not None}

    def replicas(self) -> dict[tuple[str, int], str]:
        """Local replicas and their states."""
        return {k: r.state for k, r in self._replicas.items()}

    def free_capacity(self) -> tuple[int, int]:
        """(milli-CPU, MiB) not held by owned slots, running replicas or open bids."""
        cpu, mem = self.me.milli_cpu, self.me.memory_mib
        for c, m in self._held.values():
            cpu -= c
            mem -= m
        for c, m, _ in self._reserved.values():
            cpu -= c
            mem -= m
        return cpu, mem

    # ==================================================================== why pending
    def pending_reasons(self, workload_uri: str) -> dict[int, str]:
        """slot -> why that slot of the workload is not (or may soon not be) served, for every
        slot `pending_reason` has a reason for; {} when all are served or it is unknown."""
        e = self.workloads.get(workload_uri)
        if e is None:
            return {}
        out: dict[int, str] = {}
        for s in range(e.wl.replicas):
            why = self.pending_reason(workload_uri, s)
            if why is not None:
                out[s] = why
        return out

    def pending_reason(self, workload_uri: str, slot: int) -> str | None:
        """A human sentence saying why slot `slot` of the workload has no owner here (round 0
        still bidding, no eligible meshlet, the last round closed without a winner and why,
        judged from the bids and declines with their `free`), or why its owner is being
        replaced (suspected lost, draining). None when the slot is owned by a meshlet that is
        neither suspected nor draining, when it is a finished job, or when the workload is
        unknown. A pure query: reads what the core knows, changes nothing
        (docs/protocol.md, section 15)."""
        e = self.workloads.get(workload_uri)
        if e is None or not 0 <= slot < e.wl.replicas:
            return None
        if e.done and slot in e.done:
            return None
        wl = e.wl
        t = self.t
        now = self.now
        c0 = self._close0(wl)
        nobody = self._nobody_eligible(wl)
        if e.owners is None and now < c0:
            if nobody:
                return f"{nobody}; round 0 closes at {self._when(c0)}"
            if now < wl.created_at:
                return f"bidding: round 0 opens at {self._when(wl.created_at)}"
            b0 = [b for b in e.bids if b.round == 0]
            offers = sum(1 for b in b0 if b.slots >= 1)
            return (
                f"bidding: round 0 closes at {self._when(c0)} "
                f"({offers} offer(s), {len(b0) - offers} decline(s) so far)"
            )
        cur = e.owners[slot] if e.owners is not None else None
        rounds = self._slot_rounds(e, slot)
        if cur is not None:
            host = cur[1]
            if host in self.suspects:
                what = f"its host {host} is suspected lost (probes fail)"
            elif self.cluster.draining_since(host) is not None:
                what = f"its host {host} is draining"
            else:
                return None
            later = [x for x in rounds if x[0] > cur[0]]
            if not later:
                return f"{what}; no replacement round opened yet"
            r, start, deadline, close, bs = later[-1]
            if now < close:
                return f"{what}; replacement round {r} closes at {self._when(close)}"
            why = f"{what}; replacement round {r} closed without a winner: "
            why += self._why_no_winner(wl, bs, start, deadline)
            last = self._reopened.get((workload_uri, slot))
            if last is not None and last[1] == cur and now < last[0] + t.reopen_backoff_ms:
                why += f"; reopening after {self._when(last[0] + t.reopen_backoff_ms)}"
            return why
        if nobody:
            return nobody
        chained = [x for x in rounds if x[0] > 0]
        if chained and now < chained[-1][3]:
            r, _, _, close, bs = chained[-1]
            return f"bidding: round {r} of slot {slot} closes at {self._when(close)}"
        if chained:
            r, start, deadline, _, bs = chained[-1]
            why = f"round {r} of slot {slot} closed without a winner: "
            why += self._why_no_winner(wl, bs, start, deadline)
        else:
            b0 = [b for b in e.bids if b.round == 0]
            a0 = wl.created_at
            d0 = a0 + wl.bid_window_ms
            n = wl.replicas
            won = sum(
                (min(b.slots, n) if wl.allow_packing else 1)
                for b in b0
                if self._valid(wl, b, a0, d0)
            )
            if won:
                why = f"round 0 filled {min(won, n)} of {n} slot(s), not slot {slot}: "
            else:
                why = "round 0 closed without a winner: "
            why += self._why_no_winner(wl, b0, a0, d0)
        period = t.chained_period_ms
        r = max(now - c0, 0) // period + 1
        start = c0 + (r - 1) * period
        if now > start + t.replacement_window_ms:
            r, start = r + 1, start + period
            return f"{why}; offered again in round {r} at {self._when(start)}"
        until = self._when(start + t.replacement_window_ms)
        return f"{why}; offered again in round {r}, open until {until}"

    def _nobody_eligible(self, wl: Workload) -> str:
        """'' when some eligible meshlet is not draining; else a sentence saying why not."""
        if self.cluster.active_members(wl):
            return ""
        eligible = self.cluster.eligible_members(wl)
        if eligible:
            return f"every eligible meshlet ({len(eligible)}) is draining"
        cons = []
        if wl.arch:
            cons.append("arch=" + ",".join(wl.arch))
        if wl.labels:
            cons.append("labels=" + ",".join(wl.labels))
        if wl.avoid:
            cons.append("avoid=" + ",".join(sorted(wl.avoid)))
        got = f" (constraints {' '.join(cons)})" if cons else ""
        return f"no eligible meshlet in cluster {wl.cluster!r} of {wl.owner}{got}"

    def _when(self, at: int) -> str:
        d = at - self.now
        rel = f"in {d // 1000}.{d % 1000 // 100} s" if d >= 0 else f"{-d // 1000} s ago"
        return f"{format_datetime_ms(at)} ({rel})"

    def _slot_rounds(self, e: _Entry, slot: int) -> list[tuple[int, int, int, int, list[Bid]]]:
        """(round, start, deadline, close, bids) of every round >= 1 of `slot` that has a bid,
        as section 5 walks them (the same walk as `_resolve`, kept for queries)."""
        wl = e.wl
        t = self.t
        c0 = self._close0(wl)
        mine = [b for b in e.bids if b.round > 0 and b.slot == slot]
        owner: Owner | None = None
        if e.owners is not None and slot < len(e.owners):
            # Round 0's result: the owner before any later round, recomputed.
            owner = self._round0_owner(e, slot)
        out: list[tuple[int, int, int, int, list[Bid]]] = []
        for r in sorted({b.round for b in mine}):
            bs = [b for b in mine if b.round == r]
            if owner is None:
                start = c0 + (r - 1) * t.chained_period_ms
            else:
                start = min(b.created_at for b in bs)
            deadline = start + t.replacement_window_ms
            close = deadline + t.settle_ms
            out.append((r, start, deadline, close, bs))
            if self.now < close:
                break
            best: Bid | None = None
            best_key: tuple[int, int] | None = None
            for b in bs:
                if self._valid(wl, b, start, deadline):
                    k = (-b.priority, rendezvous_score(wl.uri, r, slot, b.meshlet))
                    if best_key is None or k < best_key:
                        best, best_key = b, k
            if best is not None:
                owner = (r, best.meshlet)
        return out

    def _round0_owner(self, e: _Entry, slot: int) -> Owner | None:
        wl = e.wl
        a0 = wl.created_at
        d0 = a0 + wl.bid_window_ms
        valid = [b for b in e.bids if b.round == 0 and self._valid(wl, b, a0, d0)]
        valid.sort(key=lambda b: (-b.priority, rendezvous_score(wl.uri, 0, -1, b.meshlet)))
        n = wl.replicas
        caps = [min(b.slots, n) if wl.allow_packing else 1 for b in valid]
        s = 0
        layer = 0
        while s < n:
            progressed = False
            for i, b in enumerate(valid):
                if caps[i] > layer and s < n:
                    if s == slot:
                        return (0, b.meshlet)
                    s += 1
                    progressed = True
            if not progressed:
                break
            layer += 1
        return None

    def _why_no_winner(self, wl: Workload, bids: list[Bid], start: int, deadline: int) -> str:
        """Why the bids of one round gave (this slot) no winner, in words."""
        if not bids:
            if self._small(wl):
                return "no bids"
            return "no bids (in a cluster this large, candidates without room stay silent)"
        counts: dict[str, int] = {}
        for b in bids:
            if b.slots < 1:
                kind = "declined"
            elif b.created_at < start or b.created_at > deadline:
                kind = "bid outside the window"
            elif b.free_milli_cpu < wl.milli_cpu or b.free_memory_mib < wl.memory_mib:
                kind = "offered too little"
            elif not self.cluster.eligible(wl, b.meshlet):
                kind = "not eligible"
            elif not self._valid(wl, b, start, deadline):
                kind = "draining"
            else:
                kind = "valid, taken by other slots"
            counts[kind] = counts.get(kind, 0) + 1
        answers = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        short = [
            b for b in bids if b.free_milli_cpu < wl.milli_cpu or b.free_memory_mib < wl.memory_mib
        ]
        if not short:
            return f"answers: {answers}"
        best = max(bids, key=lambda b: (b.free_milli_cpu, b.free_memory_mib, b.meshlet))
        return (
            f"not enough free capacity for {wl.milli_cpu} milli-CPU / {wl.memory_mib} MiB "
            f"(largest free seen: {best.free_milli_cpu} milli-CPU / {best.free_memory_mib} MiB "
            f"on {best.meshlet}); answers: {answers}"
        )

    # ==================================================================== records
    def _on_record(self, rec: object) -> None:
        kind = type(rec)
        if kind is Bid:
            self._on_bid(rec)  # type: ignore[arg-type]
        elif kind is WorkloadStatus:
            self._on_status(rec)  # type: ignore[arg-type]
        elif isinstance(rec, Bid):
            self._on_bid(rec)
        elif isinstance(rec, WorkloadStatus):
            self._on_status(rec)
        elif isinstance(rec, Workload):
            self._on_workload(rec)
        elif isinstance(rec, Usage):
            self._usages[rec.uri] = rec
            self._note_mine(rec.uri)
        elif isinstance(rec, MeshletOwner):
            old = self.cluster.owners.get(rec.meshlet)
            if old == rec:
                if rec.meshlet == self.me.did and old.extra != rec.extra:
                    # Only fields the core does not model changed (the daemon published a
                    # new version or key): keep them for our next rewrite, decide nothing.
                    self.cluster.owners[rec.meshlet] = rec
                return
            self.cluster.put_owner(rec)
            self._note_mine(rec.uri)
            if rec.meshlet == self.me.did:
                self.draining = rec.state == "draining"
                self.draining_since = rec.state_since
            self._cluster_changed()
        elif isinstance(rec, Lease):
            self._on_lease(rec)
        elif isinstance(rec, MeshletLink):
            self.cluster.put_link(rec)
            self._cluster_changed()
        elif isinstance(rec, Membership):
            self.cluster.put_membership(rec)
            self._cluster_changed()

    def _cluster_changed(self) -> None:
        """Eligibility is part of the placement function: re-resolve every placed workload."""
        for uri, e in self.workloads.items():
            if e.owners is not None:
                self._dirty[uri] = None

    def _note_mine(self, uri: str) -> None:
        repo, coll, rkey = split_at_uri(uri)
        if repo == self.me.did:
            self._my_rkeys.add((coll, rkey))

    def _on_workload(self, wl: Workload) -> None:
        e = self.workloads.get(wl.uri)
        if e is None:
            e = _Entry(wl)
            self.workloads[wl.uri] = e
            orphans = self._orphan_bids.pop(wl.uri, None)
            if orphans:
                e.bids.extend(orphans)
            for st in self._orphan_status.pop(wl.uri, ()):
                self._status_keys.pop(st.uri, None)
                self._store_status(e, st)
            uri = wl.uri
            small = self._esmall(e)
            # `_is_candidate(wl, -1, 0)`, inlined for a large cluster (this runs for every
            # workload on every meshlet)
            if small or is_candidate(
                own_score(uri, 0, -1, self.me.did),
                wl.replicas + ROUND0_SPARE + 2,
                self.cluster.member_estimate(wl),
            ):
                self._queue_bid(uri)
            c0 = wl.created_at + wl.bid_window_ms + self.t.settle_ms  # _close0
            if self.now < c0 and not e.bids:
                # Nothing to resolve before the close (or before a bid allows early close).
                # `_push_close(c0, uri)`, inlined
                if small or uri in self._involved or uri in self._my_bids:
                    heapq.heappush(self._closes, (c0, uri))
                    self._resched = True
                else:
                    heapq.heappush(self._lazy_closes, (c0, uri))
                return
        else:
            if e.wl == wl:
                return
            e.wl = wl
        self._dirty[wl.uri] = None

    def _push_close(self, at: int, uri: str) -> None:
        """Remember to resolve uri at `at`. Rounds we take part in (or any round in a small
        cluster) wake us exactly; the others are resolved at the next tick (<= 1 probe
        interval later), which keeps a large commune cheap."""
        e = self.workloads.get(uri)
        if e is None or self._esmall(e) or uri in self._involved or uri in self._my_bids:
            heapq.heappush(self._closes, (at, uri))
            self._resched = True
        else:
            heapq.heappush(self._lazy_closes, (at, uri))

    def _on_bid(self, b: Bid) -> None:
        if b.meshlet == self.me.did:
            self._my_rkeys.add((NSID_BID, split_at_uri(b.uri)[2]))
        e = self.workloads.get(b.workload_uri)
        if e is None:
            self._orphan_bids.setdefault(b.workload_uri, []).append(b)
            return
        bids = e.bids
        buri = b.uri
        i = 0
        for old in bids:
            if old.uri == buri:
                if old is b or old == b:
                    return
                bids[i] = b
                break
            i += 1
        else:
            bids.append(b)
        if e.owners is not None:
            # round 0 closed here: a late or a later-round bid may change the answer.
            self._dirty[b.workload_uri] = None
            if b.round > 0 and b.meshlet != self.me.did:
                self._queue_bid(b.workload_uri)
        elif e.small if e.small_v == self.cluster.version else self._esmall(e):
            self._dirty[b.workload_uri] = None  # early close may now hold

    def _on_status(self, st: WorkloadStatus) -> None:
        if st.meshlet == self.me.did:
            self._my_rkeys.add((NSID_STATUS, split_at_uri(st.uri)[2]))
        e = self.workloads.get(st.workload_uri)
        if e is None:
            if st.state in TERMINAL or st.state == "running":
                self._orphan_status.setdefault(st.workload_uri, []).append(st)
                self._status_keys[st.uri] = (st.workload_uri, st.slot)
            return
        if self._store_status(e, st):
            self._dirty[st.workload_uri] = None

    def _store_status(self, e: _Entry, st: WorkloadStatus) -> bool:
        """Keep statuses that matter here: terminal ones (a finished job is never re-placed)
        and, for workloads we bid on or run, the others' (make-before-break needs them)."""
        if st.state in TERMINAL:
            if e.done is None:
                e.done = {}
            e.done[st.slot] = (st.meshlet, st.round, st.state)
            return True
        uri = e.wl.uri
        if uri not in self._involved and uri not in self._my_bids and st.meshlet != self.me.did:
            return False
        if e.statuses is None:
            e.statuses = {}
        e.statuses[(st.meshlet, st.slot)] = st
        self._status_keys[st.uri] = (uri, st.slot)
        if e.done and st.slot in e.done and e.done[st.slot][0] == st.meshlet:
            if e.done[st.slot][1] <= st.round and st.state not in TERMINAL:
                del e.done[st.slot]
        return True

    def _on_deleted(self, uri: str) -> None:
        repo, coll, rkey = split_at_uri(uri)
        if repo == self.me.did:
            self._my_rkeys.discard((coll, rkey))
        if coll == NSID_WORKLOAD:
            e = self.workloads.pop(uri, None)
            self._orphan_bids.pop(uri, None)
            for st in self._orphan_status.pop(uri, ()):
                self._status_keys.pop(st.uri, None)
            if e is None:
                return
            for st in (e.statuses or {}).values():
                self._status_keys.pop(st.uri, None)
            for key in [k for k in self._replicas if k[0] == uri]:
                self._stop(key, "deleted")
            for key in [k for k in self._held if k[0] == uri]:
                del self._held[key]
            for rkey3 in [k for k in self._reserved if k[0] == uri]:
                del self._reserved[rkey3]
            for rk in self._my_bids.pop(uri, ()):
                self._delete(NSID_BID, rk)
            for s in range(e.wl.replicas):
                self._delete(NSID_STATUS, status_rkey(uri, s))
            return
        if coll == NSID_BID:
            # Bids are evidence for a placement and stay until their workload is deleted
            # (docs/protocol.md, "Records"); a bid deletion before that is ignored.
            return
        if coll == NSID_STATUS:
            self._on_status_deleted(uri, repo)
            return
        if coll == NSID_USAGE:
            self._usages.pop(uri, None)
            return
        if self.cluster.delete(uri, repo):
            self._cluster_changed()

    def _on_status_deleted(self, uri: str, meshlet: str) -> None:
        """Forget a deleted status: a host deletes it when it loses the slot, and a stale
        `running` kept here would pass for the new owner's make-before-break signal if the
        slot ever came back to that host at the same round (docs/protocol.md, section 9). A
        finished job stays finished (e.done is kept): it is never re-placed."""
        key = self._status_keys.pop(uri, None)
        if key is None:
            return
        wl_uri, slot = key
        e = self.workloads.get(wl_uri)
        if e is None:
            orphans = self._orphan_status.get(wl_uri)
            if orphans:
                orphans[:] = [st for st in orphans if st.uri != uri]
                if not orphans:
                    del self._orphan_status[wl_uri]
            return
        if e.statuses:
            st = e.statuses.get((meshlet, slot))
            if st is not None and st.uri == uri:
                del e.statuses[(meshlet, slot)]

    # ==================================================================== rounds
    def _close0(self, wl: Workload) -> int:
        return wl.created_at + wl.bid_window_ms + self.t.settle_ms

    def _esmall(self, e: _Entry) -> bool:
        """`_small(e.wl)`, cached on the entry."""
        if e.small_v != self.cluster.version:
            e.small = self._small(e.wl)
            e.small_v = self.cluster.version
        return e.small

    def _small(self, wl: Workload) -> bool:
        cv = self.cluster.version
        if cv != self._small_version:
            self._small_cache.clear()
            self._small_version = cv
        key = (wl.owner, wl.cluster)
        got = self._small_cache.get(key)
        if got is None:
            got = self.cluster.member_estimate(wl) <= EARLY_CLOSE_MAX_MEMBERS
            self._small_cache[key] = got
        return got

    def _valid(self, wl: Workload, b: Bid, start: int, deadline: int) -> bool:
        if b.slots < 1 or b.created_at < start or b.created_at > deadline:
            return False
        if b.free_milli_cpu < wl.milli_cpu or b.free_memory_mib < wl.memory_mib:
            return False
        if not self.cluster.eligible(wl, b.meshlet):
            return False
        # A meshlet draining when the round closed gets nothing from it; judged against the
        # drain intervals in its record, so a later undrain does not re-judge the round.
        return not self.cluster.drained_at(b.meshlet, deadline + self.t.settle_ms)

    def _candidates(
        self, wl: Workload, slot: int, round_: int, exclude: frozenset[str] = frozenset()
    ) -> list[str] | None:
        """In a small cluster (<= 64 members) the candidates of a round are exactly the
        `wanted` eligible, non-draining members with the lowest rendezvous scores; None in
        a large cluster, where each meshlet samples itself (see `_is_candidate`)."""
        if not self._small(wl):
            return None
        key = (wl.uri, slot, round_, exclude, self.cluster.version)
        got = self._cand_cache.get(key)
        if got is None:
            uri = wl.uri
            members = [m for m in self.cluster.active_members(wl) if m not in exclude]
            members.sort(key=lambda m: rendezvous_score(uri, round_, slot, m))
            got = members[: self._wanted(wl, slot, round_, chained=not exclude)]
            if len(self._cand_cache) > 4096:
                self._cand_cache.clear()
            self._cand_cache[key] = got
        return got

    def _is_candidate(
        self, wl: Workload, slot: int, round_: int, exclude: frozenset[str] = frozenset()
    ) -> bool:
        if self._small(wl):
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
        e: _Entry,
        slot: int,
        round_: int,
        bids: list[Bid],
        exclude: frozenset[str] = frozenset(),
    ) -> bool:
        """Early close: every candidate has answered (bid or declined). Only in small
        clusters, where every member can list the candidates."""
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

    def _wanted(self, wl: Workload, slot: int, round_: int, chained: bool = False) -> int:
        """How many candidates a round asks for: replicas + 1 in round 0, 3 in a
        replacement round, and 3 doubling each time in the chained rounds of a slot that
        no round has filled yet (so a short cluster is eventually asked in full)."""
        if round_ == 0:
            return wl.replicas + ROUND0_SPARE
        if chained:
            return REPLACEMENT_CANDIDATES << min(round_, 16)
        return REPLACEMENT_CANDIDATES

    def _resolve(self, e: _Entry) -> int | None:
        """Recompute e.owners from the bids (pure function of records + which rounds have
        closed here). Returns the next close time still pending, if any."""
        wl = e.wl
        now = self.now
        t = self.t
        n = wl.replicas
        a0 = wl.created_at
        d0 = a0 + wl.bid_window_ms
        c0 = d0 + t.settle_ms
        bids = e.bids
        if now < c0 and not self._early_closed(e, -1, 0, [b for b in bids if b.round == 0]):
            e.owners = None
            return c0
        self.decisions += 1
        uri = wl.uri
        # Round 0 (section 6): the counting bids, in (-priority, score) order. `_valid`,
        # inlined: this loop runs for every workload on every meshlet.
        cpu, mem = wl.milli_cpu, wl.memory_mib
        cluster = self.cluster
        eligible = cluster.eligible
        drained_at = cluster.drained_at
        drainy = cluster.drainy()
        table = cluster.host_table(wl)
        # no table (wl has constraints): every lookup misses and `eligible` decides
        hosts, cc = table if table is not None else ({}, frozenset())
        unknown = _UNKNOWN
        wowner = wl.owner
        cut = d0 + t.settle_ms
        ranked: list[tuple[int, int, Bid]] = []
        later: list[Bid] = []  # bids of later rounds for slots of wl
        for b in bids:
            if b.round != 0:
                if b.round > 0 and 0 <= b.slot < n:
                    later.append(b)
                continue
            if (
                b.slots < 1
                or b.created_at < a0
                or b.created_at > d0
                or b.free_milli_cpu < cpu
                or b.free_memory_mib < mem
            ):
                continue
            m = b.meshlet
            # `eligible(wl, m)`, inlined through the host table when wl has no constraints
            host: Any = hosts.get(m, unknown)
            if host is unknown:
                if not eligible(wl, m):
                    continue
            elif (
                host is None
                or wowner not in host[1]
                or (host[0].owner != wowner and host[0].owner not in cc)
            ):
                continue
            if drainy and m in drainy and drained_at(m, cut):
                continue
            ranked.append((-b.priority, rendezvous_score(uri, 0, -1, m), b))
        owners: list[Owner | None] = [None] * n
        if ranked:
            ranked.sort(key=_first_two)
            valid = [x[2] for x in ranked]
            if not wl.allow_packing:
                won = self._won0
                for s, b in enumerate(valid[:n]):
                    o = won.get(b.meshlet)
                    if o is None:
                        o = won[b.meshlet] = (0, b.meshlet)  # one tuple per meshlet: memory
                    owners[s] = o
            else:
                caps = [min(b.slots, n) for b in valid]
                s = 0
                layer = 0
                while s < n:
                    progressed = False
                    for i, b in enumerate(valid):
                        if caps[i] > layer and s < n:
                            owners[s] = (0, b.meshlet)
                            s += 1
                            progressed = True
                    if not progressed:
                        break
                    layer += 1
        pending: int | None = None
        if later:
            period = t.chained_period_ms
            w = t.replacement_window_ms
            for s in range(n):
                mine = [b for b in later if b.slot == s]
                if not mine:
                    continue
                rounds = sorted({b.round for b in mine})
                for r in rounds:
                    bs = [b for b in mine if b.round == r]
                    cur = owners[s]
                    if cur is None:
                        start = c0 + (r - 1) * period  # chained round of a never-filled slot
                    else:
                        start = min(b.created_at for b in bs)  # section 5: own bids only
                    deadline = start + w
                    close = deadline + t.settle_ms
                    if now < close:
                        excl = frozenset({cur[1]}) if cur else frozenset()
                        if not self._early_closed(e, s, r, bs, excl):
                            pending = close if pending is None else min(pending, close)
                            break
                    self.decisions += 1
                    best: Bid | None = None
                    best_key: tuple[int, int] | None = None
                    for b in bs:
                        if self._valid(wl, b, start, deadline):
                            k = (-b.priority, rendezvous_score(uri, r, s, b.meshlet))
                            if best_key is None or k < best_key:
                                best, best_key = b, k
                    if best is not None:
                        owners[s] = (r, best.meshlet)
        e.owners = tuple(owners)
        return pending

    # ==================================================================== bidding
    def _queue_bid(self, uri: str) -> None:
        self._bid_queue.add(uri)
        self._resched = True
        at = self.now + self.t.bid_batch_ms
        if self._bid_batch_at is None or at < self._bid_batch_at:
            self._bid_batch_at = at

    def _ledger(self) -> None:
        """Recompute taken/given once per usage period (a snapshot every member can redo)."""
        at = self.now - self.now % self.t.usage_period_ms
        if at != self._balance_at:
            owner_of = {m: mo.owner for m, mo in self.cluster.owners.items()}
            self._taken, self._given = balances(
                self._usages.values(), owner_of, at, self.t.half_life_ms
            )
            self._balance_at = at

    def _bid_batch(self) -> None:
        queue = self._bid_queue
        self._bid_queue = set()
        self._bid_batch_at = None
        if self.draining or not self.cluster.verified(self.me.did):
            return
        self._ledger()
        taken = self._taken
        entries = [self.workloads[u] for u in queue if u in self.workloads]
        # Capacity is short? Serve owners who used least first.
        entries.sort(key=lambda e: (taken.get(e.wl.owner, 0), e.wl.created_at, e.wl.uri))
        prio = meshlet_priority(self.me.owner, taken, self._given)
        for e in entries:
            self._consider(e, prio)

    def _holds_other(self, e: _Entry, slot: int) -> bool:
        uri = e.wl.uri
        if any(k[0] == uri and k[1] != slot for k in self._held):
            return True
        # The reservation of a round-0 bid outlives an early close; once round 0 has closed
        # here without giving us a slot it is not a slot we hold (we may bid for one).
        closed0 = e.owners is not None
        return any(
            k[0] == uri and k[1] != slot and not (closed0 and k[1] == -1) for k in self._reserved
        )

    def _consider(self, e: _Entry, prio: int) -> None:
        """Bid on whatever round of e is open and where this meshlet is a candidate."""
        wl = e.wl
        me = self.me.did
        now = self.now
        uri = wl.uri
        if not self.cluster.eligible(wl, me):
            return
        cpu, mem = self.free_capacity()
        fits = cpu >= wl.milli_cpu and mem >= wl.memory_mib
        if e.owners is None:
            # Round 0: bid once, as a candidate, inside [createdAt, createdAt + window].
            if (
                now < wl.created_at
                or now > wl.created_at + wl.bid_window_ms
                or (uri, -1, 0) in self._reserved
                or any(b.meshlet == me and b.round == 0 for b in e.bids)
            ):
                if now < wl.created_at:
                    self._wake(wl.created_at, uri)
                return
            if not self._is_candidate(wl, -1, 0):
                return
            slots = 0
            if fits:
                slots = 1
                if wl.allow_packing:
                    slots = min(
                        wl.replicas, cpu // max(wl.milli_cpu, 1), mem // max(wl.memory_mib, 1)
                    )
            if slots == 0 and not self._small(wl):
                return  # declines only help early close in small clusters
            self._bid(wl, 0, -1, prio, slots, cpu, mem, self._close0(wl))
            return
        # Later rounds, slot by slot.
        owners = e.owners
        t = self.t
        for s, cur in enumerate(owners):
            if e.done and s in e.done:
                continue
            if cur is not None and cur[1] == me:
                continue
            if not wl.allow_packing and self._holds_other(e, s):
                return
            slot_bids = [b for b in e.bids if b.slot == s and b.round > 0]
            if cur is None:
                # Chained round for a slot no round has filled.
                c0 = self._close0(wl)
                if now < c0:
                    self._wake(c0, uri)
                    continue
                period = t.chained_period_ms
                r = (now - c0) // period + 1
                start = c0 + (r - 1) * period
                if now > start + t.replacement_window_ms:
                    r += 1
                    start += period
                    self._wake(start, uri)
                    continue
                if any(b.meshlet == me and b.round == r for b in slot_bids):
                    continue
                if not fits or not self._is_candidate(wl, s, r):
                    nxt = start + period
                    self._wake(nxt, uri)
                    continue
                self._bid(
                    wl, r, s, prio, 1, cpu, mem, start + t.replacement_window_ms + t.settle_ms
                )
                return
            # Replacement round opened by someone else and still open here?
            last = max((b.round for b in slot_bids), default=0)
            if last <= cur[0]:
                continue
            bs = [b for b in slot_bids if b.round == last]
            if any(b.meshlet == me for b in bs):
                continue
            start = min(b.created_at for b in bs)
            if now > start + t.replacement_window_ms or now < start:
                continue
            if not fits:
                continue
            if not self._is_candidate(wl, s, last, frozenset({cur[1]})):
                continue
            self._bid(wl, last, s, prio, 1, cpu, mem, start + t.replacement_window_ms + t.settle_ms)
            return

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
        rkey = bid_rkey(wl.uri, round_, slot)
        bid = Bid(
            uri=at_uri(self.me.did, NSID_BID, rkey),
            meshlet=self.me.did,
            workload_uri=wl.uri,
            workload_cid=wl.cid,
            round=round_,
            slot=slot,
            priority=prio,
            slots=slots,
            free_milli_cpu=max(cpu, 0),
            free_memory_mib=max(mem, 0),
            created_at=self.now,
        )
        if slots:
            self._reserved[(wl.uri, slot, round_)] = (
                wl.milli_cpu * slots,
                wl.memory_mib * slots,
                until,
            )
        self._my_bids.setdefault(wl.uri, []).append(rkey)
        self._put(NSID_BID, rkey, bid)
        self._on_bid(bid)
        self._wake(until, wl.uri)

    def _open_replacement(self, e: _Entry, slot: int) -> None:
        """Open the next round for a slot whose owner is lost or draining."""
        wl = e.wl
        rounds = [b.round for b in e.bids if b.slot == slot]
        cur = e.owners[slot] if e.owners else None
        r = max([*rounds, cur[0] if cur else 0]) + 1
        cpu, mem = self.free_capacity()
        fits = (
            cpu >= wl.milli_cpu
            and mem >= wl.memory_mib
            and not self.draining
            and self.cluster.eligible(wl, self.me.did)
            and (cur is None or cur[1] != self.me.did)
            and (wl.allow_packing or not self._holds_other(e, slot))
        )
        self._ledger()
        prio = meshlet_priority(self.me.owner, self._taken, self._given)
        t = self.t
        if cur is not None:
            self._reopened[(wl.uri, slot)] = (self.now, cur)
        self._bid(
            wl,
            r,
            slot,
            prio,
            1 if fits else 0,
            cpu,
            mem,
            self.now + t.replacement_window_ms + t.settle_ms,
        )

    # ==================================================================== liveness
    def _watch_list(self) -> list[str]:
        """The peers we probe: our successors on the watch ring until `watchers` of them are
        not suspected (at most 3 x watchers). Skipping suspected peers keeps every live
        meshlet watched when neighbours die, and tells a cut-off meshlet from dead peers."""
        key = (self.cluster.version, len(self.suspects), self._suspect_changes)
        if key == self._watch_key:
            return self._watched
        if self._watch_version != self.cluster.version:
            ring = sorted(self.cluster.all_verified(), key=lambda m: watch_score(m, ""))
            self._ring_after = []
            if self.me.did in ring and len(ring) > 1:
                i = ring.index(self.me.did)
                k = min(3 * self.t.watchers, len(ring) - 1)
                self._ring_after = [ring[(i + j) % len(ring)] for j in range(1, k + 1)]
            self._watch_version = self.cluster.version
        out: list[str] = []
        live = 0
        for m in self._ring_after:
            out.append(m)
            if m not in self.suspects:
                live += 1
                if live >= self.t.watchers:
                    break
        self._watched = out
        self._probes = [ProbePeer(m) for m in out]
        self._watch_key = key
        return out

    def _probe_round(self) -> None:
        """Probe the watched peers; a peer that publishes no endpoint and has a lease cannot
        be probed, its lease answers for it (docs/protocol.md, section 8). A peer without
        either (an older meshletd) is probed, and fails, as before.

        An expired lease counts as a failure only when we know our own view is current: a
        peer we probe answered recently, or a lease renewal (anyone's, our own included)
        reached us after that lease expired. Otherwise its silence may be ours (we are cut
        off from the PDSes), and it counts as nothing."""
        self._watch_list()
        if not self._leases:
            self._out.extend(self._probes)
            return
        connected: bool | None = None
        for probe in self._probes:
            m = probe.meshlet
            if not self._lease_judged(m):
                self._out.append(probe)
                continue
            until = self._leases[m][1]
            if self.now <= until:
                self._on_probe(ProbeResult(m, True))
                continue
            if connected is None:
                connected = any(self._answered(p) for p in self._probed_peers())
            if connected or self._lease_news > until:
                self._on_probe(ProbeResult(m, False))

    def _lease_judged(self, meshlet: str) -> bool:
        """A peer that publishes no endpoint and has a lease: judged by it, never probed."""
        if meshlet not in self._leases:
            return False
        o = self.cluster.owners.get(meshlet)
        return o is not None and not o.endpoint

    def _probed_peers(self) -> list[str]:
        return [m for m in self._watch_list() if not self._lease_judged(m)]

    def _answered(self, meshlet: str) -> bool:
        """The peer answered its latest probe, within `probe_failures` probe intervals."""
        since = self.now - self.t.probe_failures * self.t.probe_interval_ms
        return self._probed.get(meshlet, since - 1) >= since and not self._fails.get(meshlet)

    def _on_lease(self, rec: Lease) -> None:
        """A peer's lease: fresh until min(renewedAt, when we first saw it) + validMs
        (capped). `seen` bounds a lease stamped by a clock running fast, `renewedAt` one we
        receive late (anti-entropy, our own start): neither is a sign of life now. A new
        renewal, ours included, also shows that what others write reaches us."""
        self._note_mine(rec.uri)
        old = self._leases.get(rec.meshlet)
        if old is not None and old[0] >= rec.renewed_at:
            return  # the same renewal again, or an older one
        seen = self.now if self.now > 0 else rec.renewed_at
        until = min(rec.renewed_at, seen) + min(rec.valid_ms, LEASE_MAX_VALID_MS)
        self._leases[rec.meshlet] = (rec.renewed_at, until)
        self._lease_news = self.now

    def _lease_fresh(self, meshlet: str) -> bool:
        got = self._leases.get(meshlet)
        return got is not None and self.now <= got[1]

    def _renew_lease(self) -> None:
        """Without an endpoint nobody can probe us: our lease says we are alive."""
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

    def _on_probe(self, p: ProbeResult) -> None:
        if p.ok:
            self._probed[p.meshlet] = self.now
            self._fails.pop(p.meshlet, None)
            if p.meshlet in self.suspects:
                self.suspects.discard(p.meshlet)
                self._suspect_changes += 1
            return
        n = self._fails.get(p.meshlet, 0) + 1
        self._fails[p.meshlet] = n
        if n == 1:
            self._fail_since[p.meshlet] = self.now
        if n >= self.t.probe_failures and p.meshlet not in self.suspects:
            self.suspects.add(p.meshlet)
            self._suspect_changes += 1
            if not self._isolated():
                self._scan_lost({p.meshlet}, force=True)
            # else: maybe we are the one cut off. Suspicions that outlive our isolation are
            # acted on by the periodic scan; those that were our own cut-off clear at the
            # first probe that answers (acting on them at once re-placed healthy slots).

    def _isolated(self) -> bool:
        """True when no peer we watch has answered recently: the latest probe of every one
        failed, or it has not answered for `probe_failures` probe intervals (it never did, or
        it was watched long ago). Then the fault is more likely ours (cut off) than theirs,
        and we open no replacement rounds. A peer added to the watch list because another
        became suspected has not answered yet, or answered when it was last watched, possibly
        long ago; counting it as alive let a cut-off meshlet open rounds (docs/protocol.md,
        section 8)."""
        watched = self._watch_list()
        answered = self._probed
        fails = self._fails
        since = self.now - self.t.probe_failures * self.t.probe_interval_ms
        if not self._leases:
            return len(watched) > 1 and not any(
                answered.get(m, since - 1) >= since and fails.get(m, 0) == 0 for m in watched
            )
        # A fresh lease shows its writer was alive up to validMs ago, not that we are
        # connected now: only probes answer that (chaos with half the hosts behind NAT: a
        # cut-off watcher whose leased peers still looked fresh suspected its probed peers
        # and opened rounds while cut off). With one probed peer only, its failures are its
        # fault, not ours, once a lease renewal reached us after they began; with none,
        # _probe_round already counts an expired lease only when our view is current.
        probed = self._probed_peers()
        if len(probed) >= 2:
            return not any(self._answered(m) for m in probed)
        if len(watched) < 2 or not probed or self._answered(probed[0]):
            return False
        return self._lease_news <= self._fail_since.get(probed[0], self.now)

    def _scan_lost(self, hosts: set[str], force: bool = False) -> None:
        """Open replacement rounds for slots owned by lost/draining hosts we answer for."""
        for e in self.workloads.values():
            if e.owners is None:
                continue
            for s, cur in enumerate(e.owners):
                if cur is None or cur[1] not in hosts:
                    continue
                self._reopen(e, s, cur, force)

    def _reopen(self, e: _Entry, s: int, cur: Owner, force: bool) -> None:
        """Open the next round of slot s, owned by `cur`, unless one is under way.

        Nothing is opened while a round above the owner's is still open (we bid in it as a
        candidate instead), nor when we opened a round against this same owner less than the
        backoff ago: the backoff is per owner, so a slot whose new owner is lost gets its
        round at once. Without `force` (the periodic re-scan) a round someone else opened
        against this owner is left to them; `force` (a fresh suspicion, a drain) opens
        anyway (docs/protocol.md, section 8)."""
        if e.done and s in e.done:
            return
        t = self.t
        now = self.now
        last = self._reopened.get((e.wl.uri, s))
        mine = last is not None and last[1] == cur
        if mine and now - last[0] < t.reopen_backoff_ms:  # type: ignore[index]
            return
        higher = [b for b in e.bids if b.slot == s and b.round > cur[0]]
        if higher:
            top = max(b.round for b in higher)
            start = min(b.created_at for b in higher if b.round == top)
            if now < start + t.replacement_window_ms + t.settle_ms:
                return
            if not mine and not force:
                return
        self._open_replacement(e, s)

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
        if self.me.lease and (self._next_lease is None or now >= self._next_lease):
            self._renew_lease()
        if now >= self._next_probe:
            self._next_probe = now + self.t.probe_interval_ms
            self._probe_round()
        if now >= self._next_scan:
            self._next_scan = now + self.t.reopen_backoff_ms // 2
            lost = set() if self._isolated() else set(self.suspects)
            if self.draining:
                lost.add(self.me.did)
            if lost:
                self._scan_lost(lost)
        if self._timed:
            for key, rep in self._timed_replicas():
                if rep.restart_at is not None and rep.restart_at <= now:
                    self._dirty[key[0]] = None
                if rep.lost_at is not None:
                    self._dirty[key[0]] = None
        self._usage_tick()

    def _timed_replicas(self) -> list[tuple[tuple[str, int], _Replica]]:
        """Local replicas waiting for a restart or a fence timeout (most wait for nothing:
        ticks and wake-ups look only at these)."""
        out = []
        timed = self._timed
        for key in list(timed):
            rep = self._replicas.get(key)
            if rep is None or (rep.restart_at is None and rep.lost_at is None):
                del timed[key]
            else:
                out.append((key, rep))
        return out

    def _wake(self, at: int, uri: str) -> None:
        heapq.heappush(self._wakes, (at, uri))
        self._resched = True

    # ==================================================================== reconcile
    def _flush(self) -> None:
        if self._dirty:
            self._resolve_dirty()
        if self._bid_batch_at is not None and self._bid_batch_at <= self.now:
            self._bid_batch()
            self._resolve_dirty()
        if self._resched or self._out:
            self._schedule()

    def _resolve_dirty(self) -> None:
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
        if not self._resched and not self._out:
            return
        self._resched = False
        nxt = [self._next_probe, self._next_scan]
        if self._next_lease is not None:
            nxt.append(self._next_lease)
        if self._closes:
            nxt.append(self._closes[0][0])
        if self._wakes:
            nxt.append(self._wakes[0][0])
        if self._bid_batch_at is not None:
            nxt.append(self._bid_batch_at)
        for _, rep in self._timed_replicas() if self._timed else ():
            if rep.restart_at is not None:
                nxt.append(rep.restart_at)
            if rep.lost_at is not None:
                nxt.append(rep.lost_at + self.t.fence_timeout_ms)
        if self._period_start is not None:
            nxt.append(self._period_start + self.t.usage_period_ms)
        at = max(min(nxt), self.now + 1)
        if at != self._last_wake or self.now >= at - 1:
            self._last_wake = at
            self._out.append(WakeAt(at))

    def _reconcile_gone(self, uri: str) -> None:
        self._involved.discard(uri)
        for key in [k for k in self._replicas if k[0] == uri]:
            self._stop(key, "deleted")

    def _reconcile(self, e: _Entry) -> None:
        """Make local replicas of e match the placement (make-before-break on moves)."""
        wl = e.wl
        uri = wl.uri
        me = self.me.did
        owners = e.owners or ()
        if uri not in self._involved:
            for c in owners:
                if c is not None and c[1] == me:
                    break
            else:
                return
        self._involved.add(uri)
        mine: set[int] = set()
        for s, cur in enumerate(owners):
            if cur is not None and cur[1] == me:
                mine.add(s)
        held = self._held
        for key in [
            k for k in held if k[0] == uri and k[1] not in mine and k not in self._replicas
        ]:
            del held[key]
        for s in mine:
            held[(uri, s)] = (wl.milli_cpu, wl.memory_mib)
            self._reserved.pop((uri, s, owners[s][0]), None)  # type: ignore[index]
            if s == 0 or owners[s][0] == 0:  # type: ignore[index]
                self._reserved.pop((uri, -1, 0), None)
        for s in sorted(mine):
            key = (uri, s)
            rep = self._replicas.get(key)
            rnd = owners[s][0]  # type: ignore[index]
            if e.done and s in e.done and e.done[s][0] == me:
                continue
            if rep is None and self.draining:
                # A draining meshlet starts nothing it does not already run. It can still
                # learn late that it won a round that closed before its drain (a bid seen
                # late moved the round's anchor): it re-offers the slot instead of starting
                # it, and the previous host keeps running it until the new owner runs
                # (docs/protocol.md, section 8).
                self._reopen(e, s, owners[s], force=True)  # type: ignore[arg-type]
                continue
            if rep is None:
                rep = _Replica(rnd)
                self._replicas[key] = rep
                self._out.append(StartReplica(wl, s, rnd))
                continue
            rep.lost_at = None
            if rep.round != rnd:
                rep.round = rnd
                if rep.state == "running":
                    self._write_status(wl, s, rep, "running", force=True)
            if rep.restart_at is not None and rep.restart_at <= self.now:
                rep.restart_at = None
                rep.restarts += 1
                rep.state = "starting"
                self._out.append(StartReplica(wl, s, rnd))
        for key in [k for k in self._replicas if k[0] == uri and k[1] not in mine]:
            rep = self._replicas[key]
            if rep.state == "stopping":
                continue
            s = key[1]
            if rep.state == "exited" or s >= wl.replicas or e.owners is None:
                if e.owners is None:
                    continue
                self._stop(key, "scaled-down" if s >= wl.replicas else "lost-slot")
                continue
            if rep.lost_at is None:
                rep.lost_at = self.now
                self._timed[key] = None
            new = owners[s] if s < len(owners) else None
            replaced = False
            if new is not None and e.statuses:
                st = e.statuses.get((new[1], s))
                replaced = (
                    st is not None and st.round >= new[0] and st.state in ("running", "succeeded")
                )
            if new is None and not self.draining and me not in self.suspects:
                replaced = True
            if replaced or self.now >= rep.lost_at + self.t.fence_timeout_ms:
                self._stop(key, "drained" if self.draining else "lost-slot")
        if not mine and not any(k[0] == uri for k in self._replicas):
            self._involved.discard(uri)

    def _stop(self, key: tuple[str, int], reason: str) -> None:
        rep = self._replicas.get(key)
        if rep is None or rep.state == "stopping":
            return
        self._account(key, rep)
        rep.state = "stopping"
        self._out.append(StopReplica(key[0], key[1], reason))
        if reason != "deleted" and rep.written:
            self._delete(NSID_STATUS, status_rkey(key[0], key[1]))
            rep.written = ""

    # ==================================================================== runtime
    def _on_replica(self, ev: ReplicaStateChanged) -> None:
        key = (ev.workload_uri, ev.slot)
        rep = self._replicas.get(key)
        if rep is None:
            if ev.state == "running":
                # Adopt a replica found at start-up; reconcile decides whether it stays.
                rep = _Replica(0)
                self._replicas[key] = rep
                self._involved.add(ev.workload_uri)
            else:
                return
        e = self.workloads.get(ev.workload_uri)
        if ev.state == "stopped":
            self._account(key, rep)
            del self._replicas[key]
            self._held.pop(key, None)
            if e is not None:
                self._dirty[ev.workload_uri] = None
                self._bid_queue.add(ev.workload_uri)
            return
        if ev.state == "running":
            if rep.state == "stopping":
                return  # started, then stopped before it ran: the stop wins, no status
            rep.state = "running"
            rep.since = self.now
            if e is not None:
                self._write_status(e.wl, ev.slot, rep, "running")
            self._dirty[ev.workload_uri] = None
            return
        # exited or failed to start
        self._account(key, rep)
        rep.state = "exited"
        rep.exit_code = ev.exit_code if ev.exit_code is not None else -1
        if e is None:
            self._stop(key, "deleted")
            return
        wl = e.wl
        ok = rep.exit_code == 0
        policy = wl.restart_policy
        if wl.kind == "job" and ok:
            restart = False
        elif policy == "always":
            restart = True
        elif policy == "on-failure":
            restart = not ok
        else:
            restart = False
        if wl.kind == "service" and ok and policy == "on-failure":
            restart = False
        if restart:
            rep.restart_at = self.now + min(1000 << min(rep.restarts, 6), 60_000)
            self._timed[key] = None
            return
        final = "succeeded" if ok else "failed"
        self._write_status(wl, ev.slot, rep, final, force=True)
        if e.done is None:
            e.done = {}
        e.done[ev.slot] = (self.me.did, rep.round, final)

    def _write_status(
        self, wl: Workload, slot: int, rep: _Replica, state: str, force: bool = False
    ) -> None:
        if rep.written == state and not force:
            return
        rkey = status_rkey(wl.uri, slot)
        st = WorkloadStatus(
            uri=at_uri(self.me.did, NSID_STATUS, rkey),
            meshlet=self.me.did,
            workload_uri=wl.uri,
            slot=slot,
            round=rep.round,
            state=state,
            updated_at=self.now,
            exit_code=rep.exit_code,
            restarts=rep.restarts,
        )
        rep.written = state
        self._put(NSID_STATUS, rkey, st)

    # ==================================================================== usage
    def _account(self, key: tuple[str, int], rep: _Replica) -> None:
        if rep.state != "running":
            return
        e = self.workloads.get(key[0])
        if e is None or self._period_start is None:
            rep.since = self.now
            return
        start = max(rep.since, self._period_start)
        secs = max(self.now - start, 0)
        use = self._period_use.setdefault(e.wl.owner, [0, 0])
        use[0] += e.wl.milli_cpu * secs // 1000
        use[1] += e.wl.memory_mib * secs // 1000
        rep.since = self.now

    def _usage_tick(self) -> None:
        period = self.t.usage_period_ms
        if self._period_start is None:
            self._period_start = self.now - self.now % period
            return
        end = self._period_start + period
        if self.now < end:
            return
        saved = self.now
        self.now = end
        for key, rep in self._replicas.items():
            self._account(key, rep)
        self.now = saved
        if self._period_use:
            entries = tuple(
                UsageEntry(o, v[0], v[1])
                for o, v in sorted(self._period_use.items())
                if v[0] or v[1]
            )
            if entries:
                rkey = f"u{self._period_start}"
                rec = Usage(
                    uri=at_uri(self.me.did, NSID_USAGE, rkey),
                    meshlet=self.me.did,
                    period_start=self._period_start,
                    period_end=end,
                    entries=entries,
                )
                self._usages[rec.uri] = rec
                self._put(NSID_USAGE, rkey, rec)
        self._period_use = {}
        self._period_start = self.now - self.now % period
        for rep in self._replicas.values():
            if rep.state == "running":
                rep.since = max(rep.since, self._period_start)

    # ==================================================================== writes
    def _put(self, coll: str, rkey: str, rec: object) -> None:
        create = (coll, rkey) not in self._my_rkeys
        self._my_rkeys.add((coll, rkey))
        self._out.insert(0, PutRecord(coll, rkey, rec, create))  # type: ignore[arg-type]

    def _delete(self, coll: str, rkey: str) -> None:
        if (coll, rkey) not in self._my_rkeys:
            return
        self._my_rkeys.discard((coll, rkey))
        self._out.insert(0, DeleteRecord(coll, rkey, at_uri(self.me.did, coll, rkey)))


__all__ = ["MeshletIdentity", "Scheduler", "bid_rkey", "status_rkey"]
