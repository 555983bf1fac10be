"""Cluster formation: which meshlets are mutually verified members of our clusters.

The sketch's five steps, kept:

1. For each member owner DID of a configured cluster, its repo's `commune.scheduler.meshlet`
   records name its meshlets.
2. Each such meshlet must consent to us: one of its `commune.scheduler.membership` records
   lists our owner DID (cluster names are local labels; meshlets of our own owner consent
   implicitly).
3. Ownership both ways: the meshlet's `commune.scheduler.meshletOwner` (rkey `self`) must
   name that owner back.
4. Only meshlets passing 1-3 (plus ourselves) form the active cluster.
5. A meshlet may be in several clusters; each configured cluster has its own view.

`ConfiguredClusters` is pure: feed it `RecordEvent`s (from the firehose or anti-entropy), ask
it for `clusters()`; it keeps the records in the core's `ClusterView`, the one index of
cluster records, so the scheduler and this view judge from the same rules.
`ClusterFormation` (trio) publishes our own records idempotently, watches the right repos on
the firehose and keeps the view live; `changed` fires on every change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import trio

from meshletd.atproto.firehose import Firehose
from meshletd.atproto.frames import RecordEvent
from meshletd.atproto.identity import IdentityError, IdentityUnreachable
from meshletd.atproto.pds import PdsClient, Write
from meshletd.atproto.records import record_from_json, record_to_json
from meshletd.core.cluster import MAX_MESHLETS_PER_OWNER, MAX_STORED_CLAIMS, ClusterView
from meshletd.core.nsid import NSID_MEMBERSHIP, NSID_MESHLET, NSID_MESHLET_OWNER
from meshletd.core.records import (
    Membership,
    MeshletLink,
    MeshletOwner,
    at_uri,
    rkey_for_did,
    with_state_history,
)
from meshletd.errors import InvalidRecord

log = logging.getLogger("meshletd.cluster")

_CLUSTER_NSIDS = frozenset({NSID_MESHLET, NSID_MESHLET_OWNER, NSID_MEMBERSHIP})


@dataclass(frozen=True)
class Member:
    """A verified meshlet of a cluster."""

    meshlet_did: str
    owner_did: str
    owner_record: MeshletOwner | None  # None only for ourselves before our record is seen

    @property
    def endpoint(self) -> str | None:
        return (self.owner_record.endpoint or None) if self.owner_record else None

    @property
    def state(self) -> str:
        return self.owner_record.state if self.owner_record else "active"


@dataclass(frozen=True)
class ClusterSnapshot:
    name: str
    member_owners: frozenset[str]  # as configured (plus our own owner)
    members: Mapping[str, Member]  # meshlet DID -> Member, ourselves included

    @property
    def meshlet_dids(self) -> frozenset[str]:
        return frozenset(self.members)


class ConfiguredClusters:
    """Pure: the clusters this meshlet is configured with, judged over the one
    `ClusterView` (meshletd.core.cluster) that the scheduler judges eligibility with: record
    events in, verified membership of each configured cluster out."""

    def __init__(
        self,
        meshlet_did: str,
        owner_did: str,
        clusters: Mapping[str, Iterable[str]] | None = None,
        records: ClusterView | None = None,
    ) -> None:
        self.meshlet_did = meshlet_did
        self.owner_did = owner_did
        self.records = records if records is not None else ClusterView()
        self.config: dict[str, frozenset[str]] = {}
        self._snapshot: dict[str, ClusterSnapshot] | None = None
        self.set_config(clusters or {})

    @classmethod
    def create(
        cls, meshlet_did: str, owner_did: str, clusters: Mapping[str, Iterable[str]]
    ) -> ConfiguredClusters:
        return cls(meshlet_did, owner_did, clusters)

    def set_config(self, clusters: Mapping[str, Iterable[str]]) -> None:
        self.config = {name: frozenset(m) | {self.owner_did} for name, m in clusters.items()}
        self._snapshot = None

    @property
    def owners(self) -> dict[str, MeshletOwner]:
        """meshlet DID -> its meshletOwner record (read-only)."""
        return self.records.owners

    # -- inputs ---------------------------------------------------------------------------
    def apply(self, ev: RecordEvent) -> bool:
        """Take one record change; True if any cluster's membership may have changed."""
        if ev.collection not in _CLUSTER_NSIDS:
            return False
        before = self.clusters()
        if ev.action == "delete" or ev.record is None:
            self.records.delete(ev.uri, ev.did)
        else:
            try:
                rec = record_from_json(ev.uri, ev.cid or "", ev.record)
            except (KeyError, ValueError, TypeError) as e:  # the firehose validated it
                log.warning("cluster: ignored %s: %s", ev.uri, e)
                return False
            if isinstance(rec, MeshletOwner | MeshletLink | Membership):
                self.records.put(rec)
        self._snapshot = None
        return self.clusters() != before

    def forget_repo(self, did: str) -> None:
        """Drop everything known from one repo (it is no longer watched)."""
        self.records.forget_repo(did)
        self._snapshot = None

    # -- outputs --------------------------------------------------------------------------
    def watched_dids(self) -> set[str]:
        """Repos whose records decide the view: member owners, their meshlets, ourselves."""
        out = {self.meshlet_did, self.owner_did}
        for members in self.config.values():
            out |= members
        for owner in list(out):
            out |= self.records.claimed(owner)
        return out

    def claimed_meshlets(self, owner: str) -> set[str]:
        return set(self.records.claimed(owner))

    def consented_owners(self, meshlet: str) -> frozenset[str]:
        """Owner DIDs a meshlet consents to (union of its membership records)."""
        return self.records.consent_of(meshlet)

    def membership_of(self, meshlet: str, cluster: str) -> frozenset[str] | None:
        """One named membership record of a meshlet."""
        rec = self.records.membership(meshlet, cluster)
        return None if rec is None else rec.members

    def why_not(self, meshlet: str, owner: str) -> str | None:
        """None if `meshlet` of `owner` is verified for us; otherwise the reason."""
        if meshlet == self.meshlet_did:
            return None
        if meshlet not in self.records.claimed(owner):
            return f"{owner} has no {NSID_MESHLET} record naming {meshlet}"
        rec = self.records.owners.get(meshlet)
        if rec is None:
            return f"{meshlet} has no meshletOwner record"
        if rec.owner != owner:
            return f"{meshlet} names {rec.owner} as owner, not {owner} (one-way link)"
        if owner != self.owner_did and self.owner_did not in self.consented_owners(meshlet):
            return f"{meshlet} does not list {self.owner_did} in any membership record"
        return None

    def clusters(self) -> dict[str, ClusterSnapshot]:
        if self._snapshot is not None:
            return self._snapshot
        out: dict[str, ClusterSnapshot] = {}
        owners_of = self.records.owners
        for name, owners in sorted(self.config.items()):
            members: dict[str, Member] = {
                self.meshlet_did: Member(
                    self.meshlet_did, self.owner_did, owners_of.get(self.meshlet_did)
                )
            }
            for owner in sorted(owners):
                for meshlet in sorted(self.records.claimed(owner)):
                    if meshlet != self.meshlet_did and self.why_not(meshlet, owner) is None:
                        members[meshlet] = Member(meshlet, owner, owners_of[meshlet])
            out[name] = ClusterSnapshot(name, owners, members)
        self._snapshot = out
        return out

    def all_members(self) -> dict[str, Member]:
        """Union of every cluster's members."""
        out: dict[str, Member] = {}
        for snap in self.clusters().values():
            out.update(snap.members)
        return out


async def _maybe_await(result: Any) -> None:
    if hasattr(result, "__await__"):
        await result


def _same(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    """Equal apart from timestamps (so a restart does not rewrite unchanged records)."""
    if a is None:
        return False
    skip = {"createdAt", "updatedAt"}
    return {k: v for k, v in a.items() if k not in skip} == {
        k: v for k, v in b.items() if k not in skip
    }


def _now_ms() -> int:
    return int(time.time() * 1000)


async def publish_own_records(
    meshlet: PdsClient,
    owner: PdsClient | None,
    owner_record: MeshletOwner,
    clusters: Mapping[str, Iterable[str]],
    *,
    meshlet_name: str | None = None,
    now_ms: int | None = None,
) -> int:
    """Publish the owner link, meshletOwner and one membership per cluster, idempotently.

    `owner_record` is the self-description wanted; its stateSince and past drains follow
    the one rule of `with_state_history` from the record published before. Membership
    records of clusters no longer configured are deleted. Returns the number of writes
    made (0 when everything was already in place).
    """
    now = _now_ms() if now_ms is None else now_ms
    writes = 0
    meshlet_did = meshlet.did
    if owner is not None:
        rkey = rkey_for_did(meshlet_did)
        link = record_to_json(
            MeshletLink(
                at_uri(owner.did, NSID_MESHLET, rkey), owner.did, meshlet_did, meshlet_name, now
            )
        )
        got = await owner.get_record(NSID_MESHLET, rkey)
        if not _same(got[1] if got else None, link):
            await owner.put_record(NSID_MESHLET, rkey, link)
            writes += 1
    batch: list[Write] = []
    uri = at_uri(meshlet_did, NSID_MESHLET_OWNER, "self")
    got = await meshlet.get_record(NSID_MESHLET_OWNER, "self")
    last = None
    if got is not None:
        try:
            old = record_from_json(uri, got[0], got[1])
            last = old if isinstance(old, MeshletOwner) else None
        except (KeyError, ValueError, TypeError) as e:
            log.warning("our published meshletOwner record is unreadable (%s): rewriting it", e)
    wanted = replace(owner_record, uri=uri, meshlet=meshlet_did, extra=last.extra if last else "")
    value = record_to_json(with_state_history(wanted, last, now))
    if not _same(got[1] if got else None, value):
        batch.append(Write("put", NSID_MESHLET_OWNER, "self", value))
    existing = {rkey: v for rkey, _cid, v in await meshlet.list_records(NSID_MEMBERSHIP)}
    for name, members in sorted(clusters.items()):
        value = record_to_json(
            Membership(
                at_uri(meshlet_did, NSID_MEMBERSHIP, name),
                meshlet_did,
                name,
                frozenset(members),
                now,
            )
        )
        if not _same(existing.get(name), value):
            batch.append(Write("put", NSID_MEMBERSHIP, name, value))
    for stale in sorted(set(existing) - set(clusters)):
        batch.append(Write("delete", NSID_MEMBERSHIP, stale))
    if batch:
        await meshlet.apply_writes(batch)
        writes += len(batch)
    return writes


class ClusterFormation:
    """Keeps a `ConfiguredClusters` view live from the firehose (trio)."""

    def __init__(
        self,
        view: ConfiguredClusters,
        firehose_factory: Callable[[Callable[[RecordEvent], Any]], Firehose],
    ) -> None:
        self.view = view
        self.firehose = firehose_factory(self._on_event)
        self.changed = trio.Event()  # replaced after each change: wait on the current one
        self.version = 0
        self._nursery: trio.Nursery | None = None
        self._listeners: list[Callable[[RecordEvent], Any]] = []
        self._batch_listeners: list[Callable[[list[RecordEvent]], Any]] = []
        # Until the first full read of every watched repo is done, events are held and then
        # handed over as one batch (docs/protocol.md section 13: no decision on half a state).
        self._starting = True
        self._startup: list[RecordEvent] = []
        # Repos whose start-up read is still missing, and how often it is tried again.
        self.waiting_for: set[str] = set()
        self.absent: set[str] = set()  # watched DIDs that resolve to no repo
        self.retry_initial_s = 1.0
        self.retry_max_s = 10.0
        self._deliver_lock = trio.Lock()

    def add_listener(self, fn: Callable[[RecordEvent], Any]) -> None:
        """Also pass every record event on (e.g. workloads and bids to the scheduler).

        Events of the start-up read reach `fn` one by one after it is complete, unless a
        batch listener is registered too (then `fn` sees only later events)."""
        self._listeners.append(fn)

    def add_batch_listener(self, fn: Callable[[list[RecordEvent]], Any]) -> None:
        """Receive the start-up read (every record of every watched repo) as one list."""
        self._batch_listeners.append(fn)

    async def run(
        self, *, task_status: trio.TaskStatus[list[RecordEvent]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the firehose, read every watched repo, hand over the start-up batch;
        `started` (with that batch) once the view is complete. Runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.firehose.run)
            await self.sync_watches()
            await self._until_complete()
            async with self._deliver_lock:
                self._starting = False
                batch, self._startup = self._startup, []
                for bfn in self._batch_listeners:
                    await _maybe_await(bfn(batch))
                if not self._batch_listeners:
                    for ev in batch:
                        for fn in self._listeners:
                            await _maybe_await(fn(ev))
            if self.view.watched_dids() != self.firehose.interest.dids:
                nursery.start_soon(self.sync_watches)  # changed while we handed over
            task_status.started(batch)
            # Follow-up watches (new meshlets claimed by owners) are started by _on_event.

    def unread(self) -> set[str]:
        """Watched repos not yet listed in full since start (empty: the view is complete).
        A DID that resolves to no repo, or a repo its PDS says it does not hold, has
        nothing to list: it does not hold the view back."""
        done = self.firehose.read_once | self.absent
        return {d for d in self.view.watched_dids() if d not in done}

    async def _until_complete(self) -> None:
        """Read again, with backoff, every watched repo whose first read failed (its PDS or
        the PLC down): the start-up batch must hold every member's records, ours included
        (docs/protocol.md section 13), so nothing is decided on half a view."""
        delay = self.retry_initial_s
        while unread := self.unread():
            self.waiting_for = unread
            log.warning(
                "cluster: view incomplete, %d repo(s) not read yet (%s); reading again in %.0f s",
                len(unread),
                ", ".join(sorted(unread)),
                delay,
            )
            await trio.sleep(delay)
            delay = min(delay * 2, self.retry_max_s)
            await self.sync_watches()
            async with trio.open_nursery() as nursery:
                for did in sorted(self.unread() & self.firehose.interest.dids):
                    nursery.start_soon(self.firehose.resync_logged, did)
        self.waiting_for = set()

    async def sync_watches(self) -> None:
        """Watch every repo the view needs; stop watching the ones it no longer needs."""
        for _ in range(4):  # owners first, then the meshlets they claim
            wanted = self.view.watched_dids()
            async with trio.open_nursery() as nursery:  # resolve + heal repos in parallel
                for did in sorted(wanted - self.firehose.interest.dids):
                    nursery.start_soon(self._watch, did)
            if self.view.watched_dids() == wanted:
                break
        for did in sorted(self.firehose.interest.dids - self.view.watched_dids()):
            self.firehose.unwatch(did)
            self.view.forget_repo(did)
            self._bump()

    async def _watch(self, did: str) -> None:
        try:
            await self.firehose.watch(did)
            self.absent.discard(did)
        except IdentityUnreachable as e:
            log.warning("cluster: cannot watch %s now: %s", did, e)
        except IdentityError as e:
            # The DID does not resolve to a repo (unknown, no PDS, unusable document): it has
            # no records to wait for (docs/protocol.md, section 13).
            self.absent.add(did)
            log.warning("cluster: cannot watch %s: %s", did, e)
        except Exception as e:  # one repo's failure never ends the formation
            log.warning("cluster: cannot watch %s: %s: %s", did, type(e).__name__, e)

    async def _on_event(self, ev: RecordEvent) -> None:
        before = self.view.watched_dids()
        if self.view.apply(ev):
            self._bump()
            log.info("cluster: view changed after %s %s: %s", ev.action, ev.uri, self.describe())
        async with self._deliver_lock:
            if self._starting:
                self._startup.append(ev)
            else:
                for fn in self._listeners:
                    await _maybe_await(fn(ev))
        # (While starting, run() itself loops until every needed repo is read.)
        if self.view.watched_dids() != before and self._nursery is not None and not self._starting:
            self._nursery.start_soon(self.sync_watches)

    def _bump(self) -> None:
        self.version += 1
        old, self.changed = self.changed, trio.Event()
        old.set()

    def describe(self) -> str:
        return "; ".join(
            f"{name}=[{', '.join(sorted(s.members))}]" for name, s in self.view.clusters().items()
        )

    async def wait_for(
        self, predicate: Callable[[ConfiguredClusters], bool], timeout_s: float
    ) -> bool:
        """Wait until `predicate(view)` holds (tests, startup)."""
        with trio.move_on_after(timeout_s):
            while not predicate(self.view):
                await self.changed.wait()
            return True
        return False


__all__ = [
    "MAX_MESHLETS_PER_OWNER",
    "MAX_STORED_CLAIMS",
    "ClusterFormation",
    "ClusterSnapshot",
    "ConfiguredClusters",
    "InvalidRecord",
    "Member",
    "publish_own_records",
]
