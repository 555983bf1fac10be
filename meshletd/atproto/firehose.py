"""The firehose: `com.atproto.sync.subscribeRepos` of each member PDS, verified and filtered.

The pure parts (`FrameDecoder`, `RepoMirror`, `RecordEvent`, ...) are in
`meshletd.atproto.frames` and re-exported here. This module is the trio side:

- `PdsSubscription` (in `meshletd.atproto.subscription`, re-exported here): one websocket
  per PDS, resumes from the persisted cursor, reconnects with backoff; each frame is handled
  in a scope that turns any failure into a logged refusal of that one frame.
- `Firehose`: owns one subscription per PDS that hosts a watched DID (each supervised: a
  subscription that fails is restarted with backoff) and runs the anti-entropy pass
  (listRecords + signed sync.getRecord proofs).

The sink (an async callable) receives each change once per (record, cid); after a restart
events from the saved cursor on may be delivered again: consumers must be idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

import trio

from meshletd.atproto.frames import (
    COMMUNE_COLLECTIONS,
    Action,
    FrameDecoder,
    FrameOutcome,
    Interest,
    RecordEvent,
    Refusal,
    RepoMirror,
    decode_frame,
)
from meshletd.atproto.identity import IdentityError, IdentityResolverProtocol
from meshletd.atproto.lexicon import Lexicons, default_lexicons
from meshletd.atproto.reader import (
    ProvenRecord,
    ReadError,
    RepoAbsent,
    RepoReader,
    verify_record_proof,
)
from meshletd.atproto.subscription import (
    Backoff,
    CursorStore,
    EventSink,
    FileCursorStore,
    MemoryCursorStore,
    PdsSubscription,
)
from meshletd.atproto.verify import Unverified
from meshletd.core.timing import FEED_QUIET_MS
from meshletd.errors import InvalidRecord
from meshletd.trace import enabled as trace_enabled
from meshletd.trace import trace

__all__ = [
    "COMMUNE_COLLECTIONS",
    "Action",
    "Backoff",
    "CursorStore",
    "EventSink",
    "FileCursorStore",
    "Firehose",
    "FrameDecoder",
    "FrameOutcome",
    "Interest",
    "MemoryCursorStore",
    "PdsSubscription",
    "RecordEvent",
    "Refusal",
    "RepoMirror",
    "decode_frame",
]

log = logging.getLogger("meshletd.firehose")

# The "cid" of a read asked for by `refresh` (any version will do) in the in-flight set.
REFRESH = "refresh"
MAX_HINTS_IN_FLIGHT = 64  # delivery hints read at once; more are ignored (the firehose has them)
# Hints are unauthenticated: reads they cause are rate-limited (a token bucket), so a flood
# cannot make us hammer the PDSes we follow (and get rate-limited by them).
HINT_READS_PER_S = 10.0
HINT_BURST = 50
# Anti-entropy: one repo's pass may take at most this long (a slow or hostile PDS cannot stall
# healing for the others), and this many repos are read at once.
REPO_RESYNC_TIMEOUT_S = 60.0
RESYNC_CONCURRENCY = 4
# A PDS's stream silent this long (pings every 5 s: two lost pongs and a margin) counts as
# behind: `Firehose.behind`. Leases must outlast their renewal by more (`LEASE_SLACK_MS`).
FEED_QUIET_S = FEED_QUIET_MS / 1000
# Records refused by validation, remembered (newest first out) so their owners can be shown
# why: at most this many in all, and at most MAX_REFUSED_PER_REPO of one repo.
MAX_REFUSED = 2000
MAX_REFUSED_PER_REPO = 200


class Firehose:
    """Verified record changes of the watched DIDs, from every PDS that hosts one of them.

    `watch(did)` adds a repo (resolving its PDS and opening that PDS's subscription if none is
    open yet) and heals it with anti-entropy; `unwatch(did)` stops delivering it. `run()`
    starts the machinery and the periodic anti-entropy pass.
    """

    def __init__(
        self,
        resolver: IdentityResolverProtocol,
        cursors: CursorStore,
        sink: EventSink,
        *,
        collections: Iterable[str] = COMMUNE_COLLECTIONS,
        reader: RepoReader | None = None,
        lexicons: Lexicons | None = None,
        anti_entropy_every_s: float = 30.0,
        backoff: Backoff | None = None,
        connect: Callable[[str], Any] | None = None,
    ) -> None:
        self.connect = connect
        self.resolver = resolver
        self.cursors = cursors
        self.sink = sink
        self.interest = Interest(collections=frozenset(collections))
        self.reader = reader or RepoReader()
        self.lexicons = lexicons or default_lexicons()
        self.anti_entropy_every_s = anti_entropy_every_s
        self.backoff = backoff
        self.keys: dict[str, str | None] = {}
        self.mirror = RepoMirror()
        self.synced_rev: dict[str, str] = {}  # repo rev whose state we are known to hold
        # Repos listed in full at least once since start (docs/protocol.md section 13: the
        # view is complete once every watched repo is here).
        self.read_once: set[str] = set()
        self.skipped_passes = 0
        self.pds_of: dict[str, str] = {}
        self.subscriptions: dict[str, PdsSubscription] = {}
        self.dropped: list[str] = []  # recent reasons, for tests and status
        self.refused: dict[str, Refusal] = {}  # uri -> why its current version is refused
        self.repo_timeout_s = REPO_RESYNC_TIMEOUT_S
        self.resync_limiter = trio.CapacityLimiter(RESYNC_CONCURRENCY)
        self.delivered = 0
        self.hinted = 0  # records read because of a delivery hint
        self.refreshed = 0  # records read again on request that the stream had not brought
        self.hint_proofs_used = 0  # ... of which the hint carried a proof we could use
        self._hints: set[tuple[str, str, str, str | None]] = set()  # being read now
        self._hint_tokens = float(HINT_BURST)
        self._hint_at: float | None = None
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()  # one delivery at a time: mirror + sink stay in order

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await trio.sleep(self.anti_entropy_every_s)
                    await self.resync_all()
            finally:
                self._nursery = None

    async def resync_all(self) -> None:
        """One anti-entropy pass over every watched repo: RESYNC_CONCURRENCY repos at a
        time, each bounded by `repo_timeout_s`; a repo that fails is logged and skipped."""
        async with trio.open_nursery() as nursery:
            for did in sorted(self.interest.dids):
                nursery.start_soon(self._resync_logged, did)

    async def watch(self, did: str, *, resync: bool = True) -> None:
        """Start delivering `did`'s records (idempotent)."""
        if did not in self.interest.dids:
            ident = await self.resolver.resolve(did)
            if ident.pds is None:
                raise IdentityError(f"{did}: DID document names no PDS")
            self.keys[did] = ident.signing_key
            self.pds_of[did] = ident.pds
            self.interest.dids.add(did)
            await self._ensure_subscription(ident.pds)
        if resync:
            await self._resync_logged(did, force=True)

    def behind(self, quiet_s: float = FEED_QUIET_S) -> frozenset[str]:
        """The watched repos whose PDS's stream we have not heard for `quiet_s` (no frame,
        no pong), or that is down: what we see of them may be stale (docs/protocol.md,
        section 8: their leases prove nothing meanwhile)."""
        now = trio.current_time()
        stale = {
            pds
            for pds, sub in self.subscriptions.items()
            if sub.heard_at is None or now - sub.heard_at > quiet_s
        }
        if not stale:
            return frozenset()
        return frozenset(did for did, pds in self.pds_of.items() if pds in stale)

    def unwatch(self, did: str) -> None:
        self.interest.dids.discard(did)
        self.mirror.forget(did)
        self.synced_rev.pop(did, None)
        self.read_once.discard(did)

    async def _ensure_subscription(self, pds: str) -> None:
        if pds in self.subscriptions:
            # Another task is opening it: wait for its first connection attempt, so that a
            # resync that follows cannot fall in a gap before the stream starts.
            await self.subscriptions[pds].started.wait()
            return
        assert self._nursery is not None, "Firehose.run() must be running"
        decoder = FrameDecoder(self.interest, self.keys, self.lexicons)
        sub = PdsSubscription(
            pds,
            decoder,
            self.resolver,
            self.cursors,
            self._deliver,
            backoff=Backoff() if self.backoff is None else Backoff(**self.backoff.__dict__),
            connect=self.connect,
        )
        self.subscriptions[pds] = sub
        await self._nursery.start(sub.run)

    async def _deliver(self, outcome: FrameOutcome) -> None:
        if (
            outcome.kind == "#commit"
            and outcome.did not in self.interest.dids
            and log.isEnabledFor(logging.DEBUG)
        ):
            log.debug(
                "firehose: skipped commit seq=%s from non-member repo %s", outcome.seq, outcome.did
            )
        for reason in outcome.dropped:
            log.warning("firehose: ignored %s", reason)
            self._note_drop(reason)
        if outcome.error:
            log.warning("firehose: PDS says %s", outcome.error)
        # Shielded: a dropped connection must not cut a frame's delivery in half (the mirror
        # would then suppress the replay of what the sink never saw).
        with trio.CancelScope(shield=bool(outcome.events)):
            async with self._lock:
                for refusal in outcome.refused:
                    self._refuse(refusal)
                for ev in outcome.events:
                    out = self._mirror_apply(ev)
                    if out is not None:
                        self.delivered += 1
                        await self._sink_one(out)
                did = outcome.did
                if outcome.commit_rev and did and self.synced_rev.get(did) == outcome.commit_since:
                    self.synced_rev[did] = outcome.commit_rev  # still no gap since last pass
        if outcome.identity_changed is not None:
            assert self._nursery is not None
            self._nursery.start_soon(self._identity_changed, outcome.identity_changed)
        for did in sorted(outcome.resync):
            assert self._nursery is not None
            self._nursery.start_soon(self._resync_forced, did)

    def hint(
        self, did: str, collection: str, rkey: str, cid: str | None, proof: bytes | None = None
    ) -> bool:
        """A peer says it just wrote this record (or deleted it: `cid` None). If we follow
        it and do not hold that version, read it now from its PDS with a signed proof (as
        anti-entropy does) instead of waiting for the PDS's firehose, whose sequencer may
        poll its outbox only once a second when idle. Never blocks; False if ignored.

        `proof`: the PDS's `sync.getRecord` answer for it, read by the writer. Used instead
        of our own read when it checks out exactly as our read would (the repo's signed
        commit, the MST path, the hinted CID) and its commit is no older than any we hold
        of that repo; otherwise we read as without it.

        A hint is not evidence: what is delivered is what the repo's signed commit says.
        The firehose's later copy of the same change is a no-op (same CID, older rev)."""
        if (reads := self._reads_of(did, collection)) is None:
            return False
        known = self.mirror.records.get((did, collection, rkey))
        if known is not None and known[0] == cid:
            return False
        key = (did, collection, rkey, cid)
        if key in self._hints or len(self._hints) >= MAX_HINTS_IN_FLIGHT:
            return False
        now = trio.current_time()
        if self._hint_at is not None:
            refill = (now - self._hint_at) * HINT_READS_PER_S
            self._hint_tokens = min(float(HINT_BURST), self._hint_tokens + refill)
        self._hint_at = now
        if self._hint_tokens < 1:
            return False
        self._hint_tokens -= 1
        self._hints.add(key)
        if trace_enabled():
            trace("hinted", uri=f"at://{did}/{collection}/{rkey}")
        reads.start_soon(self._read_hinted, key, proof)
        return True

    def refresh(self, did: str, collection: str, rkey: str) -> bool:
        """Read this record again from its PDS now, with its proof (as a hint is read), and
        deliver it if it is newer than ours: the core asks when a peer's lease looks
        expired (the firehose may be the one late). One read per record at a time; never
        blocks; False if ignored (not followed, or a read of it is in flight)."""
        if (reads := self._reads_of(did, collection)) is None:
            return False
        key = (did, collection, rkey, REFRESH)
        if key in self._hints:
            return False
        self._hints.add(key)
        reads.start_soon(self._read_hinted, key, None)
        return True

    def _reads_of(self, did: str, collection: str) -> trio.Nursery | None:
        """Where a read of a record of this repo and collection on request (a hint, a
        refresh) runs: None unless we run, follow the repo and the collection, and know the
        repo's PDS."""
        if did in self.interest.dids and collection in self.interest.collections:
            if did in self.pds_of:
                return self._nursery
        return None

    def _forwarded_proof(
        self, key: tuple[str, str, str, str | None], proof: bytes
    ) -> ProvenRecord | None:
        """The record a hint's forwarded proof proves, or None (then we read it ourselves)."""
        did, collection, rkey, cid = key
        try:
            proved = verify_record_proof(proof, did, self.keys.get(did), collection, rkey)
        except Exception as e:
            log.debug("hint at://%s/%s/%s: its proof is refused: %s", did, collection, rkey, e)
            return None
        if proved.cid != cid or proved.rev < self.mirror.newest_rev.get(did, ""):
            log.debug("hint at://%s/%s/%s: its proof is of another version", did, collection, rkey)
            return None
        return proved

    def _proved_event(
        self, did: str, collection: str, rkey: str, proof: Any, source: Literal["hint", "resync"]
    ) -> RecordEvent:
        """The event for a record read from its PDS with a proof (signed commit + MST path);
        raises InvalidRecord when the lexicon refuses it."""
        if proof.value is not None:
            self.lexicons.validate_record(collection, proof.value, rkey=rkey)
            self.lexicons.validate_size(collection, proof.value)
        action: Action = "create" if proof.value is not None else "delete"
        return RecordEvent(
            did, collection, rkey, action, proof.cid, proof.value, proof.rev, None, source
        )

    async def _read_hinted(
        self, key: tuple[str, str, str, str | None], forwarded: bytes | None
    ) -> None:
        did, collection, rkey = key[:3]
        try:
            proof = None if forwarded is None else self._forwarded_proof(key, forwarded)
            via = "forwarded" if proof is not None else "read"
            if proof is not None:
                self.hint_proofs_used += 1
            else:
                proof = await self.reader.prove_record(
                    self.pds_of[did], did, self.keys.get(did), collection, rkey
                )
            if trace_enabled():
                trace("proved", uri=f"at://{did}/{collection}/{rkey}", via=via)
            ev = self._proved_event(did, collection, rkey, proof, "hint")
            with trio.CancelScope(shield=True):
                async with self._lock:
                    out = self._mirror_apply(ev)
                    if out is not None:
                        self.hinted += 1
                        self.delivered += 1
                        if key[3] == REFRESH:
                            self.refreshed += 1
                            log.info(
                                "firehose: %s read from its PDS is newer than the stream's "
                                "copy (the stream is late)",
                                ev.uri,
                            )
                        await self._sink_one(out)
        except Exception as e:
            # The firehose (or anti-entropy) will bring it; nothing is lost.
            log.debug("hint at://%s/%s/%s not read: %s", did, collection, rkey, e)
        finally:
            self._hints.discard(key)

    async def _identity_changed(self, did: str) -> None:
        """A watched repo's DID document changed: new key (already re-read by the
        subscription) and maybe a new PDS (account migration): follow it there."""
        try:
            ident = await self.resolver.resolve(did, fresh=True)
            self.keys[did] = ident.signing_key
            if ident.pds and ident.pds != self.pds_of.get(did) and did in self.interest.dids:
                log.info("firehose: %s moved from %s to %s", did, self.pds_of.get(did), ident.pds)
                self.pds_of[did] = ident.pds
                await self._ensure_subscription(ident.pds)
                await self._resync_logged(did, force=True)
        except Exception as e:
            log.warning("firehose: %s changed identity and cannot be followed: %s", did, e)

    def _note_drop(self, reason: str) -> None:
        self.dropped.append(reason)
        del self.dropped[:-200]

    async def resync_logged(self, did: str) -> None:
        """`resync(did)`, forced, with a failure logged instead of raised."""
        await self._resync_logged(did, force=True)

    def _mirror_apply(self, ev: RecordEvent) -> RecordEvent | None:
        before = self.mirror.over_bound
        out = self.mirror.apply(ev)
        if self.mirror.over_bound != before:
            reason = (
                f"record {ev.uri}: its repo holds over {self.mirror.max_per_collection} "
                f"{ev.collection} records"
            )
            log.warning("firehose: ignored %s", reason)
            self._note_drop(reason)
        return out

    async def _sink_one(self, ev: RecordEvent) -> None:
        """Hand one event on; whatever the consumer raises costs that event only."""
        if not ev.refused and ev.uri in self.refused:
            del self.refused[ev.uri]  # a valid version (or a delete) replaces the refused one
        try:
            await self.sink(ev)
        except Exception as e:
            log.warning("firehose: consumer failed on %s %s", ev.action, ev.uri, exc_info=True)
            self._note_drop(f"record {ev.uri}: consumer failed ({type(e).__name__})")

    def _refuse(self, refusal: Refusal) -> None:
        """Remember why a record version was refused (bounded: oldest out first, and one
        repo may hold at most MAX_REFUSED_PER_REPO of the entries)."""
        self.refused.pop(refusal.uri, None)
        repo = refusal.uri[len("at://") :].split("/", 1)[0]
        mine = [u for u in self.refused if u[len("at://") :].split("/", 1)[0] == repo]
        if len(mine) >= MAX_REFUSED_PER_REPO:
            del self.refused[mine[0]]
        while len(self.refused) >= MAX_REFUSED:
            del self.refused[next(iter(self.refused))]
        self.refused[refusal.uri] = refusal

    def refusals(self, did: str | None = None) -> list[Refusal]:
        """Records whose current version validation refused (of one repo, or all)."""
        prefix = f"at://{did}/" if did is not None else "at://"
        return [r for u, r in self.refused.items() if u.startswith(prefix)]

    async def _resync_forced(self, did: str) -> None:
        await self._resync_logged(did, force=True)

    async def _resync_logged(self, did: str, *, force: bool = False) -> None:
        """Anti-entropy for one repo in a scope of its own: bounded in time, sharing the
        concurrency limit, and whatever it raises is logged (the repo is tried again at the
        next pass)."""
        try:
            async with self.resync_limiter:
                with trio.move_on_after(self.repo_timeout_s) as scope:
                    await self.resync(did, force=force)
            if scope.cancelled_caught:
                log.warning("anti-entropy %s: gave up after %.0fs", did, self.repo_timeout_s)
        except RepoAbsent as e:
            # The PDS answered that it holds no such repo: there is nothing to wait for
            # (docs/protocol.md, section 13); it is read again at the next pass.
            log.warning("anti-entropy %s: %s (counted as read: empty)", did, e)
            self.read_once.add(did)
        except (ReadError, IdentityError, Unverified) as e:
            log.warning("anti-entropy %s: %s", did, e)
        except Exception as e:
            log.warning("anti-entropy %s: failed (%s: %s)", did, type(e).__name__, e)

    async def resync(self, did: str, *, force: bool = True) -> int:
        """Anti-entropy for one repo: heal anything the firehose missed. Returns changes.

        Unless forced, a repo whose latest rev is the one we are known to be in sync with
        (no gap in verified commits since the last pass) costs one request and no listing.
        """
        pds = self.pds_of.get(did)
        if pds is None or did not in self.interest.dids:
            return 0
        latest = await self.reader.latest_rev(pds, did)
        if not force and latest is not None and self.synced_rev.get(did) == latest:
            self.skipped_passes += 1
            return 0
        key = self.keys.get(did)
        changes = 0
        present = await self.reader.collections(pds, did)
        wanted = set(self.interest.collections)
        if present is not None:  # skip empty collections we hold nothing of
            wanted = {c for c in wanted if c in present or self.mirror.known(did, c)}
        for collection in sorted(wanted):
            listed = await self.reader.list_records(pds, did, collection)
            known = self.mirror.known(did, collection)
            suspects = {rk for rk, cid in listed.items() if known.get(rk) != cid}
            suspects |= set(known) - set(listed)
            for rkey in sorted(suspects):
                try:
                    proof = await self.reader.prove_record(pds, did, key, collection, rkey)
                except Unverified as e:
                    if "signature" in str(e):
                        key = (await self.resolver.resolve(did, fresh=True)).signing_key
                        self.keys[did] = key
                        proof = await self.reader.prove_record(pds, did, key, collection, rkey)
                    else:
                        raise
                uri = f"at://{did}/{collection}/{rkey}"
                try:
                    ev = self._proved_event(did, collection, rkey, proof, "resync")
                except InvalidRecord as e:
                    reason = f"record {uri}: invalid ({e.message})"
                    log.warning("anti-entropy: ignored %s", reason)
                    self._note_drop(reason)
                    name = Refusal.name_of(proof.value)
                    self._refuse(Refusal(uri, proof.cid, e.field, e.reason, name))
                    # An invalid record counts as absent (docs/protocol.md section 19.1).
                    ev = RecordEvent(
                        did,
                        collection,
                        rkey,
                        "delete",
                        None,
                        None,
                        proof.rev,
                        None,
                        "resync",
                        refused=True,
                    )
                except Exception as e:  # never expected: still costs this record only
                    reason = f"record {uri}: unreadable ({type(e).__name__})"
                    log.warning("anti-entropy: ignored %s", reason)
                    self._note_drop(reason)
                    continue
                async with self._lock:
                    out = self._mirror_apply(ev)
                    if out is not None:
                        changes += 1
                        self.delivered += 1
                        await self._sink_one(out)
        if latest is not None:
            synced = self.synced_rev.get(did)
            if synced is None or synced < latest:
                self.synced_rev[did] = latest
        self.read_once.add(did)
        return changes
