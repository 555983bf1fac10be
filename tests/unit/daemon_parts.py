"""The daemon's parts wired over fakes, as the composition root wires them over the real
adapters: a meshlet of alice's (`ME`), with peers in memory and records fed as events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshletd.atproto.cluster import ConfiguredClusters
from meshletd.atproto.firehose import RecordEvent
from meshletd.atproto.frames import Refusal
from meshletd.atproto.lexicon import default_lexicons
from meshletd.atproto.records import record_to_json
from meshletd.config import Cluster, Config
from meshletd.core.nsid import NSID_MESHLET_OWNER, NSID_WORKLOAD
from meshletd.core.records import MeshletOwner, at_uri
from meshletd.daemon.commands import OwnerCommands
from meshletd.daemon.fake_peers import FakePeers
from meshletd.daemon.followed import Followed
from meshletd.daemon.local import FakeScheduling, Local
from meshletd.daemon.publisher import FakePublisher, membership_lists
from meshletd.daemon.readmodel import ReadModel
from meshletd.daemon.repo import FakeRepo
from meshletd.daemon.secrets import EncryptionKey, SecretStore
from meshletd.store import MemoryStore

OWNER, ME = "did:plc:alice", "did:plc:alicemesh"
BOB, BOB_MESH = "did:plc:bob", "did:plc:bobmesh"
WORKLOAD = NSID_WORKLOAD


def config(**kw: Any) -> Config:
    return Config(
        did=ME,
        owner=OWNER,
        pds="http://127.0.0.1:1",
        clusters=[Cluster(name="home", members=[BOB])],
        **kw,
    )


STAMP = "2026-12-04T05:00:00.000Z"


def workload_value(**fields: Any) -> dict[str, Any]:
    """A valid workload record value (`fields` replace or add to a small web service)."""
    value: dict[str, Any] = {
        "name": "web",
        "image": "localhost/busybox",
        "replicas": 1,
        "kind": "service",
        "cluster": "home",
        "resources": {"milliCpu": 100, "memoryMiB": 64},
        "createdAt": STAMP,
    }
    return {**value, **fields}


def put(did: str, collection: str, rkey: str, record: dict[str, Any], cid: str = "") -> RecordEvent:
    """A record event as the firehose delivers it: of a record valid under its lexicon."""
    nsid = f"commune.scheduler.{collection}"
    default_lexicons().validate_record(nsid, record, rkey=rkey)
    return RecordEvent(did, nsid, rkey, "create", cid or f"bafy{rkey}", record, rev="r1")


def delete(did: str, collection: str, rkey: str) -> RecordEvent:
    return RecordEvent(did, f"commune.scheduler.{collection}", rkey, "delete", None, None, rev="r2")


def owner_record(
    meshlet: str, owner: str, key: str | None = None, endpoint: str | None = None
) -> dict[str, Any]:
    """The JSON value of `meshlet`'s meshletOwner record naming `owner`."""
    rec = MeshletOwner(
        uri=at_uri(meshlet, NSID_MESHLET_OWNER, "self"),
        meshlet=meshlet,
        owner=owner,
        milli_cpu=1000,
        memory_mib=1024,
        state_since=1_764_000_000_000,
        encryption_key=key or "",
        endpoint=endpoint or "",
    )
    return record_to_json(rec)


@dataclass
class Parts:
    local: Local
    view: ConfiguredClusters
    followed: Followed
    read: ReadModel
    publisher: FakePublisher
    peers: FakePeers
    secrets: SecretStore
    key: EncryptionKey
    commands: OwnerCommands
    refused: list[Refusal]  # what the firehose refused as invalid
    engine: FakeScheduling | None = None
    owner_repo: FakeRepo = field(default_factory=lambda: FakeRepo(OWNER))

    def feed(self, *events: RecordEvent) -> None:
        for ev in events:
            self.followed.apply(ev)

    def schedule(self) -> FakeScheduling:
        """This meshlet schedules (the engine runs), with placements set by the test."""
        self.engine = self.local.engine = FakeScheduling()
        return self.engine


def parts(*, logged_in: bool = True, **cfg: Any) -> Parts:
    c = config(**cfg)
    local = Local(c)
    view = ConfiguredClusters.create(c.did, c.owner, membership_lists(c))
    followed = Followed()
    refused: list[Refusal] = []
    read = ReadModel(local, view, followed, lambda: refused)
    publisher = FakePublisher(local, can_publish=logged_in)
    peers = FakePeers()
    secrets, key = SecretStore(MemoryStore()), EncryptionKey(MemoryStore())
    commands = OwnerCommands(local, view, followed, read, publisher, peers, secrets, key)
    p = Parts(local, view, followed, read, publisher, peers, secrets, key, commands, refused)
    if logged_in:
        local.owner_repo = p.owner_repo
        local.meshlet_repo = FakeRepo(ME)
    return p
