"""The firehose: `com.atproto.sync.subscribeRepos` of each member PDS, verified and filtered.

Layers, from pure to I/O:

- `FrameDecoder.process(raw) -> FrameOutcome` (pure): decodes one frame (two DAG-CBOR
  values, header and body, with libipld: the SDK's frame parser would import its whole
  generated client, tens of MB of idle memory), skips repos and collections nobody asked
  for before decoding any block, checks the commit signature against the repo DID's
  signing key and the MST proof of every op, validates each record against its lexicon and
  size limit, and turns ops into `RecordEvent`s. Everything it refuses is listed in
  `dropped` with the reason.
- `RepoMirror` (pure): last known (cid, rev) per record; keeps firehose and anti-entropy
  from contradicting each other (a change applies only if its commit rev is not older).
- `PdsSubscription` (trio): one websocket per PDS, resumes from the persisted cursor,
  reconnects with backoff; `Firehose` (trio) owns one subscription per PDS that hosts a
  watched DID and runs the anti-entropy pass (listRecords + signed sync.getRecord proofs).

The sink (an async callable) receives each change once per (record, cid); after a restart
events from the saved cursor on may be delivered again: consumers must be idempotent.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import libipld
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from meshletd.atproto.identity import IdentityError, IdentityResolverProtocol
from meshletd.atproto.lexicon import Lexicons, default_lexicons
from meshletd.atproto.reader import ReadError, RepoReader
from meshletd.atproto.verify import (
    Unverified,
    cid_str,
    decode_car,
    verified_record,
    verify_commit,
)
from meshletd.errors import InvalidRecord

log = logging.getLogger("meshletd.firehose")

COMMUNE_COLLECTIONS = frozenset(
    {
        "commune.scheduler.meshlet",
        "commune.scheduler.meshletOwner",
        "commune.scheduler.membership",
        "commune.scheduler.workload",
        "commune.scheduler.bid",
        "commune.scheduler.workloadStatus",
        "commune.scheduler.usage",
        "commune.scheduler.lease",
    }
)

Action = Literal["create", "update", "delete"]
MAX_HINTS_IN_FLIGHT = 64  # delivery hints read at once; more are ignored (the firehose has them)
# Hints are unauthenticated: reads they cause are rate-limited (a token bucket), so a flood
# cannot make us hammer the PDSes we follow (and get rate-limited by them).
HINT_READS_PER_S = 10.0
HINT_BURST = 50


@dataclass(frozen=True)
class RecordEvent:
    """A verified change of one record."""

    did: str
    collection: str
    rkey: str
    action: Action
    cid: str | None  # None for deletes
    record: dict[str, Any] | None  # the validated value; None for deletes
    rev: str  # repo revision of the commit that made the change
    seq: int | None = None  # firehose sequence number; None when found by anti-entropy
    source: Literal["firehose", "resync", "hint"] = "firehose"

    @property
    def uri(self) -> str:
        return f"at://{self.did}/{self.collection}/{self.rkey}"


@dataclass
class Interest:
    """Which repos and collections matter. Shared and mutable: membership changes it."""

    dids: set[str] = field(default_factory=set)
    collections: frozenset[str] = COMMUNE_COLLECTIONS


@dataclass
class FrameOutcome:
    seq: int | None = None
    kind: str = ""
    did: str | None = None
    events: list[RecordEvent] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    need_key: str | None = None  # resolve this DID's key, then process the frame again
    bad_signature: bool = False  # the key we had failed: re-resolve once, then retry
    resync: set[str] = field(default_factory=set)  # DIDs to heal with anti-entropy
    identity_changed: str | None = None
    commit_rev: str | None = None  # a verified commit's rev, and the rev it follows
    commit_since: str | None = None
    error: str | None = None  # an error frame (or #info) from the PDS


def decode_frame(raw: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, body) of one event-stream frame: `op` 1 is a message whose type is `t`
    (`#commit`, ...), `op` -1 an error (`error`, `message`). Raises ValueError otherwise."""
    parts = libipld.decode_dag_cbor_multi(raw)
    if len(parts) != 2:
        raise ValueError(f"a frame is a header and a body, not {len(parts)} value(s)")
    header, body = parts
    if not isinstance(header, dict) or not isinstance(body, dict):
        raise ValueError("frame header and body must be maps")
    op = header.get("op")
    if op == 1:
        if not isinstance(header.get("t"), str):
            raise ValueError("message frame without a type")
    elif op == -1:
        if not isinstance(body.get("error"), str):
            raise ValueError("error frame without an error name")
    else:
        raise ValueError(f"invalid frame op {op!r}")
    return header, body


class FrameDecoder:
    """Pure decoder/verifier of subscribeRepos frames for one `Interest`."""

    def __init__(
        self,
        interest: Interest,
        keys: dict[str, str | None] | None = None,
        lexicons: Lexicons | None = None,
    ) -> None:
        self.interest = interest
        self.keys: dict[str, str | None] = keys if keys is not None else {}
        self.lexicons = lexicons or default_lexicons()
        self.last_rev: dict[str, str] = {}
        self.frames = 0
        self.commits = 0

    def process(self, raw: bytes) -> FrameOutcome:
        self.frames += 1
        try:
            header, body = decode_frame(raw)
        except Exception as e:
            return FrameOutcome(dropped=[f"undecodable frame ({type(e).__name__}: {e})"])
        if header["op"] == -1:
            return FrameOutcome(kind="error", error=f"{body.get('error')}: {body.get('message')}")
        t = header.get("t")
        out = FrameOutcome(seq=body.get("seq"), kind=t)
        if t == "#commit":
            self.commits += 1
            self._commit(body, out)
        elif t == "#identity":
            did = body.get("did")
            out.did = did
            if did in self.interest.dids:
                out.identity_changed = did
        elif t in ("#sync", "#account"):
            did = body.get("did")
            out.did = did
            if did in self.interest.dids and (t == "#sync" or body.get("active")):
                out.resync.add(did)
        elif t == "#info":
            out.error = f"{body.get('name')}: {body.get('message')}"
            if body.get("name") == "OutdatedCursor":
                out.resync |= set(self.interest.dids)
        return out

    def _commit(self, body: dict[str, Any], out: FrameOutcome) -> None:
        did = body.get("repo")
        out.did = did
        if did not in self.interest.dids:
            return
        wanted = self.interest.collections
        ops = [op for op in body.get("ops") or () if op["path"].split("/", 1)[0] in wanted]
        if body.get("tooBig"):
            out.resync.add(did)
            return
        if not ops:
            return
        if did not in self.keys:
            out.need_key = did
            return
        seq = body.get("seq")
        rev = body.get("rev", "")
        last = self.last_rev.get(did)
        if last is not None and rev <= last:
            return  # a replay of something already applied
        try:
            _header, blocks = decode_car(body["blocks"])
            commit = verify_commit(blocks, body["commit"], did, self.keys[did])
        except Unverified as e:
            out.bad_signature = "signature" in str(e)
            out.dropped.append(f"commit seq={seq} repo={did}: {e}")
            return
        except Exception as e:
            out.dropped.append(f"commit seq={seq} repo={did}: undecodable blocks ({e})")
            return
        if commit.get("rev") != rev:
            out.dropped.append(f"commit seq={seq} repo={did}: rev differs from the signed commit")
            return
        self.last_rev[did] = rev
        out.commit_rev, out.commit_since = rev, body.get("since")
        data_root = commit["data"]
        for op in ops:
            path = op["path"]
            collection, _, rkey = path.partition("/")
            action = op["action"]
            uri = f"at://{did}/{path}"
            try:
                cid, value = verified_record(blocks, data_root, path, op.get("cid"))
            except Unverified as e:
                out.dropped.append(f"record {uri} seq={seq}: {e}")
                continue
            if action == "delete":
                out.events.append(
                    RecordEvent(did, collection, rkey, "delete", None, None, rev, seq)
                )
                continue
            try:
                self.lexicons.validate_record(collection, value, rkey=rkey)
                self.lexicons.validate_size(collection, value)
            except InvalidRecord as e:
                out.dropped.append(f"record {uri} seq={seq}: invalid ({e.message})")
                continue
            assert cid is not None
            out.events.append(
                RecordEvent(did, collection, rkey, action, cid_str(cid), value, rev, seq)
            )


class RepoMirror:
    """Last known state of every watched record, ordered by commit rev."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str, str], tuple[str | None, str]] = {}

    def apply(self, ev: RecordEvent) -> RecordEvent | None:
        """The event to deliver (with a corrected action), or None if stale or no change."""
        key = (ev.did, ev.collection, ev.rkey)
        known = self.records.get(key)
        if known is not None:
            cid, rev = known
            if ev.rev < rev or (ev.rev == rev and cid == ev.cid):
                return None
            if cid == ev.cid:
                self.records[key] = (cid, ev.rev)
                return None
        elif ev.action == "delete":
            # Unknown to us but maybe not to the consumer (state kept across a restart):
            # pass it on; deletes of unknown records are no-ops for an idempotent consumer.
            self.records[key] = (None, ev.rev)
            return ev
        self.records[key] = (ev.cid, ev.rev)
        if ev.action != "delete":
            existed = known is not None and known[0] is not None
            action: Action = "update" if existed else "create"
            if action != ev.action:
                ev = RecordEvent(**{**ev.__dict__, "action": action})
        elif known is not None and known[0] is None:
            return None
        return ev

    def known(self, did: str, collection: str) -> dict[str, str]:
        """rkey -> cid of the records we believe exist."""
        return {
            k[2]: v[0]
            for k, v in self.records.items()
            if k[0] == did and k[1] == collection and v[0] is not None
        }

    def forget(self, did: str) -> None:
        for k in [k for k in self.records if k[0] == did]:
            del self.records[k]


class CursorStore(Protocol):
    """Where each PDS's firehose cursor survives restarts (the daemon's state dir)."""

    def load(self, pds_url: str) -> int | None: ...
    def save(self, pds_url: str, seq: int) -> None: ...


class MemoryCursorStore:
    def __init__(self) -> None:
        self.cursors: dict[str, int] = {}

    def load(self, pds_url: str) -> int | None:
        return self.cursors.get(pds_url)

    def save(self, pds_url: str, seq: int) -> None:
        self.cursors[pds_url] = seq


class FileCursorStore:
    """Cursors in one small JSON file, replaced atomically."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.cursors: dict[str, int] = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            self.cursors = {}

    def load(self, pds_url: str) -> int | None:
        return self.cursors.get(pds_url)

    def save(self, pds_url: str, seq: int) -> None:
        self.cursors[pds_url] = seq
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cursors))
        os.replace(tmp, self.path)


EventSink = Callable[[RecordEvent], Awaitable[None]]


@dataclass
class Backoff:
    initial_s: float = 0.2
    max_s: float = 30.0
    current_s: float = 0.0

    def next(self) -> float:
        self.current_s = min(self.max_s, self.current_s * 2 if self.current_s else self.initial_s)
        return self.current_s

    def reset(self) -> None:
        self.current_s = 0.0


class PdsSubscription:
    """One subscribeRepos connection to one PDS, kept alive for as long as `run` runs."""

    def __init__(
        self,
        pds_url: str,
        decoder: FrameDecoder,
        resolver: IdentityResolverProtocol,
        cursors: CursorStore,
        deliver: Callable[[FrameOutcome], Awaitable[None]],
        *,
        backoff: Backoff | None = None,
        save_every_s: float = 1.0,
        connect: Callable[[str], Any] | None = None,
    ) -> None:
        self.pds_url = pds_url.rstrip("/")
        self.connect = connect or (
            lambda url: open_websocket_url(
                url, max_message_size=8 * 2**20, connect_timeout=10, disconnect_timeout=1
            )
        )
        self.decoder = decoder
        self.resolver = resolver
        self.cursors = cursors
        self.deliver = deliver
        self.backoff = backoff or Backoff()
        self.save_every_s = save_every_s
        self.cursor: int | None = cursors.load(self.pds_url)
        self.connected = trio.Event()
        self.started = trio.Event()  # set after the first connection attempt
        self.ping_every_s = 30.0
        self.ping_timeout_s = 15.0
        self.connections = 0
        self._unsaved = False
        self._ws: Any = None
        self._scope: trio.CancelScope | None = None

    def url(self) -> str:
        base = self.pds_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        url = f"{base}/xrpc/com.atproto.sync.subscribeRepos"
        return url if self.cursor is None else f"{url}?cursor={self.cursor}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        try:
            while True:
                reason = "closed"
                self._scope = trio.CancelScope()
                with self._scope:
                    try:
                        async with self.connect(self.url()) as ws:
                            self._ws = ws
                            self.connections += 1
                            self.connected.set()
                            log.info(
                                "firehose %s: connected (cursor %s)", self.pds_url, self.cursor
                            )
                            if not started:
                                started = True
                                self.started.set()
                                task_status.started()
                            async with trio.open_nursery() as conn:
                                if hasattr(ws, "ping"):
                                    conn.start_soon(self._heartbeat, ws)
                                await self._read(ws)
                                conn.cancel_scope.cancel()
                    except* (
                        ConnectionClosed,
                        HandshakeError,
                        OSError,
                        trio.BrokenResourceError,
                    ) as group:
                        e = group.exceptions[0]
                        reason = f"{type(e).__name__}: {e}"
                    finally:
                        self._ws = None
                        self._save(force=True)
                if self._scope.cancelled_caught:
                    reason = "connection dropped"
                self.connected = trio.Event()
                if not started:
                    started = True
                    self.started.set()
                    task_status.started()
                delay = self.backoff.next()
                log.warning(
                    "firehose %s: disconnected (%s); retry in %.1fs", self.pds_url, reason, delay
                )
                await trio.sleep(delay)
        finally:
            self._save(force=True)

    async def _heartbeat(self, ws: Any) -> None:
        """A quiet PDS sends nothing for minutes; a dead TCP path looks the same. Ping it."""
        while True:
            await trio.sleep(self.ping_every_s)
            with trio.move_on_after(self.ping_timeout_s) as timeout:
                await ws.ping()
            if timeout.cancelled_caught:
                log.warning("firehose %s: no pong in %.0fs", self.pds_url, self.ping_timeout_s)
                await self.kick()
                return

    async def kick(self) -> None:
        """Drop the current connection abruptly (tests; a stall): `run` reconnects."""
        if self._scope is not None:
            self._scope.cancel()

    async def _read(self, ws: Any) -> None:
        last_save = trio.current_time()
        while True:
            raw = await ws.get_message()
            if not isinstance(raw, bytes | bytearray):
                continue
            outcome = await self._process(bytes(raw))
            self.backoff.reset()
            await self.deliver(outcome)
            if outcome.seq is not None:
                self.cursor = outcome.seq
                self._unsaved = True
            now = trio.current_time()
            if now - last_save >= self.save_every_s:
                self._save()
                last_save = now

    async def _process(self, raw: bytes) -> FrameOutcome:
        outcome = self.decoder.process(raw)
        if outcome.need_key is not None:
            await self._learn_key(outcome.need_key, fresh=False)
            outcome = self.decoder.process(raw)
        if outcome.bad_signature and outcome.did is not None:
            old = self.decoder.keys.get(outcome.did)
            if await self._learn_key(outcome.did, fresh=True) != old:
                outcome = self.decoder.process(raw)  # the key had rotated
        if outcome.identity_changed is not None:
            await self._learn_key(outcome.identity_changed, fresh=True)
        return outcome

    async def _learn_key(self, did: str, *, fresh: bool) -> str | None:
        try:
            ident = await self.resolver.resolve(did, fresh=fresh)
            key = ident.signing_key
        except IdentityError as e:
            log.warning("firehose %s: cannot resolve %s: %s", self.pds_url, did, e)
            key = None
        self.decoder.keys[did] = key
        return key

    def _save(self, force: bool = False) -> None:
        if self._unsaved and self.cursor is not None:
            self.cursors.save(self.pds_url, self.cursor)
            self._unsaved = False


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
        self.skipped_passes = 0
        self.pds_of: dict[str, str] = {}
        self.subscriptions: dict[str, PdsSubscription] = {}
        self.dropped: list[str] = []  # recent reasons, for tests and status
        self.delivered = 0
        self.hinted = 0  # records read because of a delivery hint
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
                    for did in sorted(self.interest.dids):
                        await self._resync_logged(did)
            finally:
                self._nursery = None

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

    def unwatch(self, did: str) -> None:
        self.interest.dids.discard(did)
        self.mirror.forget(did)
        self.synced_rev.pop(did, None)

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
                for ev in outcome.events:
                    out = self.mirror.apply(ev)
                    if out is not None:
                        self.delivered += 1
                        await self.sink(out)
                did = outcome.did
                if outcome.commit_rev and did and self.synced_rev.get(did) == outcome.commit_since:
                    self.synced_rev[did] = outcome.commit_rev  # still no gap since last pass
        if outcome.identity_changed is not None:
            assert self._nursery is not None
            self._nursery.start_soon(self._identity_changed, outcome.identity_changed)
        for did in sorted(outcome.resync):
            assert self._nursery is not None
            self._nursery.start_soon(self._resync_forced, did)

    def hint(self, did: str, collection: str, rkey: str, cid: str | None) -> bool:
        """A peer says it just wrote this record (or deleted it: `cid` None). If we follow
        it and do not hold that version, read it now from its PDS with a signed proof (as
        anti-entropy does) instead of waiting for the PDS's firehose, whose sequencer may
        poll its outbox only once a second when idle. Never blocks; False if ignored.

        A hint is not evidence: what is delivered is what the repo's signed commit says.
        The firehose's later copy of the same change is a no-op (same CID, older rev)."""
        if self._nursery is None or did not in self.interest.dids:
            return False
        if collection not in self.interest.collections or did not in self.pds_of:
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
        self._nursery.start_soon(self._read_hinted, key)
        return True

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

    async def _read_hinted(self, key: tuple[str, str, str, str | None]) -> None:
        did, collection, rkey = key[:3]
        try:
            proof = await self.reader.prove_record(
                self.pds_of[did], did, self.keys.get(did), collection, rkey
            )
            ev = self._proved_event(did, collection, rkey, proof, "hint")
            with trio.CancelScope(shield=True):
                async with self._lock:
                    out = self.mirror.apply(ev)
                    if out is not None:
                        self.hinted += 1
                        self.delivered += 1
                        await self.sink(out)
        except (ReadError, Unverified, InvalidRecord, KeyError) as e:
            # The firehose (or anti-entropy) will bring it; nothing is lost.
            log.debug("hint at://%s/%s/%s not read: %s", did, collection, rkey, e)
        finally:
            self._hints.discard(key)

    async def _identity_changed(self, did: str) -> None:
        """A watched repo's DID document changed: new key (already re-read by the
        subscription) and maybe a new PDS (account migration): follow it there."""
        try:
            ident = await self.resolver.resolve(did, fresh=True)
        except IdentityError as e:
            log.warning("firehose: %s changed identity and cannot be resolved: %s", did, e)
            return
        self.keys[did] = ident.signing_key
        if ident.pds and ident.pds != self.pds_of.get(did) and did in self.interest.dids:
            log.info("firehose: %s moved from %s to %s", did, self.pds_of.get(did), ident.pds)
            self.pds_of[did] = ident.pds
            await self._ensure_subscription(ident.pds)
            await self._resync_logged(did, force=True)

    def _note_drop(self, reason: str) -> None:
        self.dropped.append(reason)
        del self.dropped[:-200]

    async def _resync_forced(self, did: str) -> None:
        await self._resync_logged(did, force=True)

    async def _resync_logged(self, did: str, *, force: bool = False) -> None:
        try:
            await self.resync(did, force=force)
        except (ReadError, IdentityError, Unverified) as e:
            log.warning("anti-entropy %s: %s", did, e)

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
                try:
                    ev = self._proved_event(did, collection, rkey, proof, "resync")
                except InvalidRecord as e:
                    reason = f"record at://{did}/{collection}/{rkey}: invalid ({e.message})"
                    log.warning("anti-entropy: ignored %s", reason)
                    self._note_drop(reason)
                    continue
                async with self._lock:
                    out = self.mirror.apply(ev)
                    if out is not None:
                        changes += 1
                        self.delivered += 1
                        await self.sink(out)
        if latest is not None:
            known = self.synced_rev.get(did)
            if known is None or known < latest:
                self.synced_rev[did] = latest
        return changes
