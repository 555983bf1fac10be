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

`ClusterView` is pure: feed it `RecordEvent`s (from the firehose or anti-entropy), ask it for
`clusters()`. `ClusterFormation` (trio) publishes our own records idempotently, watches the
right repos on the firehose and keeps the view live; `changed` fires on every change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from meshletd.atproto.firehose import Firehose
from meshletd.atproto.frames import RecordEvent
from meshletd.atproto.identity import IdentityError
from meshletd.atproto.pds import PdsClient, Write
from meshletd.atproto.records import (
    MEMBERSHIP,
    MESHLET,
    MESHLET_OWNER,
    Membership,
    Meshlet,
    MeshletOwner,
    rkey_for_did,
)
from meshletd.core.records import MAX_DRAINS
from meshletd.errors import InvalidRecord

log = logging.getLogger("meshletd.cluster")

# docs/protocol.md section 19.4: an owner's meshlet claims that count are the
# MAX_MESHLETS_PER_OWNER with the smallest record keys (every observer picks the same ones);
# at most MAX_STORED_CLAIMS per owner are kept (the smallest keys), so a member writing
# claims without end costs a bounded map.
MAX_MESHLETS_PER_OWNER = 64
MAX_STORED_CLAIMS = 1024


@dataclass(frozen=True)
class Member:
    """A verified meshlet of a cluster."""

    meshlet_did: str
    owner_did: str
    owner_record: MeshletOwner | None  # None only for ourselves before our record is seen

    @property
    def endpoint(self) -> str | None:
        return self.owner_record.endpoint if self.owner_record else None

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


@dataclass
class ClusterView:
    """Pure: records in, verified cluster membership out."""

    meshlet_did: str
    owner_did: str
    config: dict[str, frozenset[str]] = field(default_factory=dict)
    # Raw state, from records:
    claims: dict[str, dict[str, str]] = field(default_factory=dict)  # owner -> rkey -> meshlet
    owners: dict[str, MeshletOwner] = field(default_factory=dict)  # meshlet -> its self record
    consents: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)  # meshlet->rkey->
    _snapshot: dict[str, ClusterSnapshot] | None = None
    _claimed: dict[str, frozenset[str]] = field(default_factory=dict)  # owner -> counted claims

    @classmethod
    def create(
        cls, meshlet_did: str, owner_did: str, clusters: Mapping[str, Iterable[str]]
    ) -> ClusterView:
        view = cls(meshlet_did, owner_did)
        view.set_config(clusters)
        return view

    def set_config(self, clusters: Mapping[str, Iterable[str]]) -> None:
        self.config = {name: frozenset(m) | {self.owner_did} for name, m in clusters.items()}
        self._snapshot = None

    # -- inputs ---------------------------------------------------------------------------
    def apply(self, ev: RecordEvent) -> bool:
        """Take one record change; True if any cluster's membership may have changed."""
        before = self.clusters()
        self._apply(ev)
        self._snapshot = None
        return self.clusters() != before

    def _apply(self, ev: RecordEvent) -> None:
        deleted = ev.action == "delete" or ev.record is None
        try:
            if ev.collection == MESHLET:
                self._claimed.pop(ev.did, None)
                claims = self.claims.setdefault(ev.did, {})
                if deleted:
                    claims.pop(ev.rkey, None)
                else:
                    claims[ev.rkey] = Meshlet.model_validate(ev.record).meshlet_did
                    if len(claims) > MAX_STORED_CLAIMS:
                        del claims[max(claims)]
            elif ev.collection == MESHLET_OWNER and ev.rkey == "self":
                if deleted:
                    self.owners.pop(ev.did, None)
                else:
                    self.owners[ev.did] = MeshletOwner.model_validate(ev.record)
            elif ev.collection == MEMBERSHIP:
                consents = self.consents.setdefault(ev.did, {})
                if deleted:
                    consents.pop(ev.rkey, None)
                else:
                    consents[ev.rkey] = frozenset(Membership.model_validate(ev.record).members)
        except ValueError as e:  # pydantic: the firehose already validated, so unlikely
            log.warning("cluster: ignored %s: %s", ev.uri, e)

    def forget_repo(self, did: str) -> None:
        """Drop everything known from one repo (it is no longer watched)."""
        self.claims.pop(did, None)
        self._claimed.pop(did, None)
        self.owners.pop(did, None)
        self.consents.pop(did, None)
        self._snapshot = None

    # -- outputs --------------------------------------------------------------------------
    def watched_dids(self) -> set[str]:
        """Repos whose records decide the view: member owners, their meshlets, ourselves."""
        out = {self.meshlet_did, self.owner_did}
        for members in self.config.values():
            out |= members
        for owner in list(out):
            out |= self.claimed_meshlets(owner)
        return out

    def claimed_meshlets(self, owner: str) -> frozenset[str]:
        """Meshlets an owner claims: those of its MAX_MESHLETS_PER_OWNER claim records
        with the smallest record keys (a protocol bound: everyone counts the same ones)."""
        got = self._claimed.get(owner)
        if got is None:
            claims = self.claims.get(owner, {})
            if len(claims) <= MAX_MESHLETS_PER_OWNER:
                got = frozenset(claims.values())
            else:
                got = frozenset(claims[k] for k in sorted(claims)[:MAX_MESHLETS_PER_OWNER])
            self._claimed[owner] = got
        return got

    def consented_owners(self, meshlet: str) -> frozenset[str]:
        """Owner DIDs a meshlet consents to (union of its membership records)."""
        out: frozenset[str] = frozenset()
        for members in self.consents.get(meshlet, {}).values():
            out |= members
        return out

    def membership_of(self, meshlet: str, cluster: str) -> frozenset[str] | None:
        """One named membership record of a meshlet (the scheduler judges bids by the
        workload owner's cluster)."""
        return self.consents.get(meshlet, {}).get(cluster)

    def why_not(self, meshlet: str, owner: str) -> str | None:
        """None if `meshlet` of `owner` is verified for us; otherwise the reason."""
        if meshlet == self.meshlet_did:
            return None
        if meshlet not in self.claimed_meshlets(owner):
            return f"{owner} has no commune.scheduler.meshlet record naming {meshlet}"
        rec = self.owners.get(meshlet)
        if rec is None:
            return f"{meshlet} has no meshletOwner record"
        if rec.owner_did != owner:
            return f"{meshlet} names {rec.owner_did} as owner, not {owner} (one-way link)"
        if owner != self.owner_did and self.owner_did not in self.consented_owners(meshlet):
            return f"{meshlet} does not list {self.owner_did} in any membership record"
        return None

    def clusters(self) -> dict[str, ClusterSnapshot]:
        if self._snapshot is not None:
            return self._snapshot
        out: dict[str, ClusterSnapshot] = {}
        for name, owners in sorted(self.config.items()):
            members: dict[str, Member] = {
                self.meshlet_did: Member(
                    self.meshlet_did, self.owner_did, self.owners.get(self.meshlet_did)
                )
            }
            for owner in sorted(owners):
                for meshlet in sorted(self.claimed_meshlets(owner)):
                    if meshlet != self.meshlet_did and self.why_not(meshlet, owner) is None:
                        members[meshlet] = Member(meshlet, owner, self.owners[meshlet])
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


def _same(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    """Equal apart from timestamps (so a restart does not rewrite unchanged records)."""
    if a is None:
        return False
    skip = {"createdAt", "updatedAt"}
    return {k: v for k, v in a.items() if k not in skip} == {
        k: v for k, v in b.items() if k not in skip
    }


def keep_state_history(old: Mapping[str, Any] | None, value: dict[str, Any]) -> None:
    """Fill `stateSince` and `drains` of the meshletOwner value about to replace `old`
    (docs/protocol.md, sections 2 and 4): stateSince says when `state` last changed (kept
    while the state stays, stamped when it changes); past drain intervals are kept, and
    leaving a drain appends the interval it ends, so that the rounds that closed during the
    drain keep their judgement (the newest MAX_DRAINS are kept)."""
    old = old or {}
    if "stateSince" not in value:
        if old.get("state") == value["state"] and old.get("stateSince"):
            value["stateSince"] = old["stateSince"]
        else:
            value["stateSince"] = value["createdAt"]
    if "drains" not in value:
        drains = list(old.get("drains") or ())
        since = old.get("stateSince")
        if old.get("state") == "draining" and value["state"] != "draining" and since:
            drains.append({"since": since, "until": value["stateSince"]})
        if drains:
            value["drains"] = drains[-MAX_DRAINS:]


async def publish_own_records(
    meshlet: PdsClient,
    owner: PdsClient | None,
    owner_record: MeshletOwner,
    clusters: Mapping[str, Iterable[str]],
    *,
    meshlet_name: str | None = None,
) -> int:
    """Publish the owner link, meshletOwner and one membership per cluster, idempotently.

    Membership records of clusters no longer configured are deleted. Returns the number of
    writes made (0 when everything was already in place).
    """
    writes = 0
    meshlet_did = meshlet.did
    if owner is not None:
        link = Meshlet(meshlet_did=meshlet_did, name=meshlet_name).to_record()
        rkey = rkey_for_did(meshlet_did)
        got = await owner.get_record(MESHLET, rkey)
        if not _same(got[1] if got else None, link):
            await owner.put_record(MESHLET, rkey, link)
            writes += 1
    batch: list[Write] = []
    value = owner_record.to_record(rkey="self")
    got = await meshlet.get_record(MESHLET_OWNER, "self")
    keep_state_history(got[1] if got else None, value)
    if not _same(got[1] if got else None, value):
        batch.append(Write("put", MESHLET_OWNER, "self", value))
    existing = {rkey: v for rkey, _cid, v in await meshlet.list_records(MEMBERSHIP)}
    for name, members in sorted(clusters.items()):
        value = Membership(cluster=name, members=tuple(sorted(set(members)))).to_record(rkey=name)
        if not _same(existing.get(name), value):
            batch.append(Write("put", MEMBERSHIP, name, value))
    for stale in sorted(set(existing) - set(clusters)):
        batch.append(Write("delete", MEMBERSHIP, stale))
    if batch:
        await meshlet.apply_writes(batch)
        writes += len(batch)
    return writes


class ClusterFormation:
    """Keeps a `ClusterView` live from the firehose (trio)."""

    def __init__(
        self,
        view: ClusterView,
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
        except IdentityError as e:
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

    async def wait_for(self, predicate: Callable[[ClusterView], bool], timeout_s: float) -> bool:
        """Wait until `predicate(view)` holds (tests, startup)."""
        with trio.move_on_after(timeout_s):
            while not predicate(self.view):
                await self.changed.wait()
            return True
        return False


__all__ = [
    "ClusterFormation",
    "ClusterSnapshot",
    "ClusterView",
    "InvalidRecord",
    "Member",
    "publish_own_records",
]
