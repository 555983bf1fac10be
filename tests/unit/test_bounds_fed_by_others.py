"""Nothing fed by others grows without bound, and one slow PDS does not stall healing for
everyone (issue #15, point 10, outside the core). Each test failed on db8aa19."""

from __future__ import annotations

import trio

from meshletd.atproto.cluster import MAX_MESHLETS_PER_OWNER
from meshletd.atproto.cluster import ConfiguredClusters as ClusterView
from meshletd.atproto.firehose import Firehose, MemoryCursorStore
from meshletd.atproto.frames import RecordEvent, RepoMirror
from meshletd.atproto.identity import Identity, StaticIdentityResolver
from meshletd.atproto.reader import ProvenRecord

MESHLET = "commune.scheduler.meshlet"
NOW = "2026-11-27T06:00:00.000Z"


def claim(owner, rkey, meshlet):
    value = {"$type": MESHLET, "meshletDid": meshlet, "createdAt": NOW}
    return RecordEvent(owner, MESHLET, rkey, "create", "bafy" + rkey, value, "rev1")


def test_an_owner_claiming_thousands_of_meshlets_is_bounded_the_same_way_everywhere():
    owner = "did:plc:mallory"
    a = ClusterView.create("did:plc:me", "did:plc:myowner", {"home": [owner]})
    b = ClusterView.create("did:plc:me2", "did:plc:myowner", {"home": [owner]})
    events = [claim(owner, f"k{i:05d}", f"did:plc:m{i}") for i in range(1100)]
    for ev in events:
        a.apply(ev)
    for ev in reversed(events):  # another observer, another arrival order
        b.apply(ev)
    assert len(a.claimed_meshlets(owner)) == MAX_MESHLETS_PER_OWNER
    assert a.claimed_meshlets(owner) == b.claimed_meshlets(owner)
    assert len(a.records.claims(owner)) <= 1024
    assert len(a.watched_dids()) <= MAX_MESHLETS_PER_OWNER + 3


def test_the_scheduler_counts_the_same_claims_as_the_cluster_view():
    # One ClusterView (meshletd.core.cluster): eligibility is judged from the claims that
    # count, so a meshlet named by an owner's 65th claim is not verified anywhere.
    owner = "did:plc:mallory"
    view = ClusterView.create("did:plc:me", "did:plc:myowner", {"home": [owner]})
    for i in range(MAX_MESHLETS_PER_OWNER + 1):
        meshlet = f"did:plc:m{i}"
        view.apply(claim(owner, f"k{i:05d}", meshlet))
        self_record = {
            "$type": "commune.scheduler.meshletOwner",
            "ownerDid": owner,
            "state": "active",
            "capacity": {"milliCpu": 1000, "memoryMiB": 1024},
            "arch": "amd64",
            "createdAt": NOW,
        }
        view.apply(
            RecordEvent(meshlet, self_record["$type"], "self", "create", "bafy", self_record, "r")
        )
    core = view.records  # the scheduler's kind of view, fed the same records
    assert core.verified("did:plc:m0")
    assert not core.verified(f"did:plc:m{MAX_MESHLETS_PER_OWNER}")


def test_the_mirror_holds_a_bounded_number_of_records_per_repo_and_collection():
    mirror = RepoMirror(max_per_collection=100)
    for i in range(500):
        mirror.apply(RecordEvent("did:plc:x", "c.o.l", f"r{i}", "create", f"c{i}", {}, "rev"))
    for i in range(500):  # deletes of unknown records leave no tombstone beyond the bound
        mirror.apply(RecordEvent("did:plc:x", "c.o.l", f"d{i}", "delete", None, None, "rev"))
    assert len(mirror.records) == 100
    assert mirror.over_bound == 400
    # another repo still has its own room
    out = mirror.apply(RecordEvent("did:plc:y", "c.o.l", "r", "create", "c", {}, "rev"))
    assert out is not None


class SlowAndFast:
    """did:plc:slow's PDS never answers; every other repo answers at once."""

    def __init__(self):
        self.healed: list[str] = []

    async def latest_rev(self, pds, did):
        if did == "did:plc:slow":
            await trio.sleep_forever()
        return "rev1"

    async def collections(self, pds, did):
        return {"commune.scheduler.membership"}

    async def list_records(self, pds, did, collection):
        return {"home": "bafyhome"}

    async def prove_record(self, pds, did, key, collection, rkey):
        self.healed.append(did)
        value = {
            "$type": "commune.scheduler.membership",
            "cluster": "home",
            "members": [],
            "createdAt": NOW,
        }
        return ProvenRecord(did, collection, rkey, "rev1", "bafyhome", value)


async def test_one_slow_pds_does_not_stall_healing_for_the_others():
    dids = ["did:plc:slow"] + [f"did:plc:fast{i}" for i in range(6)]
    resolver = StaticIdentityResolver({d: Identity(d, f"http://{d[8:]}.pds", None) for d in dids})
    reader = SlowAndFast()

    async def sink(ev):
        pass

    class Quiet:
        async def get_message(self):
            await trio.sleep_forever()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def connect(url):
        yield Quiet()

    fh = Firehose(
        resolver,
        MemoryCursorStore(),
        sink,
        reader=reader,
        connect=connect,
        anti_entropy_every_s=3600,
    )
    fh.repo_timeout_s = 0.5
    async with trio.open_nursery() as nursery:
        await nursery.start(fh.run)
        for d in dids:
            await fh.watch(d, resync=False)
        t0 = trio.current_time()
        with trio.fail_after(5):
            await fh.resync_all()
        took = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert sorted(reader.healed) == sorted(dids[1:])
    assert took < 2.0  # bounded by the per-repo limit, not by the slow PDS
