"""A large commune's view for the page without a network: the real read model
(`ReadModel` over a `ClusterView` and `Followed`) filled with generated records, behind the
read-only face the page uses. For `dev/bench appview` and tests."""

from __future__ import annotations

from typing import Any

from meshletd.atproto.cluster import ConfiguredClusters
from meshletd.atproto.records import record_to_json
from meshletd.config import Cluster, Config, Contribution
from meshletd.core.nsid import NSID_MEMBERSHIP, NSID_MESHLET, NSID_MESHLET_OWNER
from meshletd.core.records import Membership, MeshletLink, MeshletOwner, at_uri
from meshletd.daemon.followed import Followed
from meshletd.daemon.local import Local
from meshletd.daemon.readmodel import ReadModel

NSID = "commune.scheduler"
STAMP = "2026-12-04T06:00:02.000Z"


class _Ev:
    """A verified record change as `Followed.apply` reads it."""

    __slots__ = ("action", "cid", "collection", "did", "record", "rkey")

    def __init__(self, did: str, collection: str, rkey: str, record: dict[str, Any]) -> None:
        self.did, self.collection, self.rkey = did, f"{NSID}.{collection}", rkey
        self.action, self.cid, self.record = "create", f"bafy{rkey}", record

    @property
    def uri(self) -> str:
        return f"at://{self.did}/{self.collection}/{self.rkey}"


class ViewNode:
    """The page's `Source` over a bare read model (no scheduler: placements are the hosts'
    reported statuses, as on a meshlet with `runtime = "none"`)."""

    def __init__(self, read: ReadModel, now_ms: int = 1_800_000_000_000) -> None:
        self.read = read
        self.now_ms = now_ms
        self.did = read.local.did
        self.owner = read.local.owner

    def summary(self) -> dict[str, Any]:
        return self.read.summary()

    def state(self) -> str:
        return self.read.local.state

    def members(self) -> list[dict[str, Any]]:
        return self.read.members()

    def workloads(self, owner: str | None = None, everything: bool = True) -> list[dict[str, Any]]:
        return self.read.workloads(owner, everything)

    def workload(self, uri: str) -> dict[str, Any]:
        return self.read.workload(uri)

    def balance(self) -> dict[str, Any]:
        return self.read.balance(self.now_ms)

    def meshlets(self) -> list[dict[str, Any]]:
        return self.read.meshlets()

    def rounds(self, uri: str) -> dict[str, Any]:
        return self.read.rounds(uri)

    def workload_record(self, uri: str) -> dict[str, Any]:
        return self.read.workload_record(uri)


def big_commune(meshlets: int = 50, workloads: int = 1000, replicas: int = 2) -> ViewNode:
    """`meshlets` meshlets of as many owners, all mutually consenting; `workloads`
    workloads spread over the owners, each with `replicas` running slots (one status per
    slot) and a round 0 of 4 bids (3 offers, 1 decline)."""
    owners = [f"did:plc:owner{i:03d}" for i in range(meshlets)]
    mesh = [f"did:plc:mesh{i:03d}" for i in range(meshlets)]
    cfg = Config(
        did=mesh[0],
        owner=owners[0],
        pds="http://127.0.0.1:1",
        clusters=[Cluster(name="commune", members=owners[1:])],
        contribution=Contribution(milli_cpu=64_000, memory_mib=131_072),
        runtime="none",
    )
    view = ConfiguredClusters.create(cfg.did, cfg.owner, {"commune": owners})
    everyone = frozenset(owners)
    for i, (o, m) in enumerate(zip(owners, mesh, strict=True)):
        records = (
            (o, "meshlet", "self", MeshletLink(at_uri(o, NSID_MESHLET, "self"), o, m)),
            (
                m,
                "meshletOwner",
                "self",
                MeshletOwner(
                    uri=at_uri(m, NSID_MESHLET_OWNER, "self"),
                    meshlet=m,
                    owner=o,
                    milli_cpu=64_000,
                    memory_mib=131_072,
                    state_since=1_764_000_000_000,
                    endpoint=f"http://10.0.0.{i + 1}:2585",
                ),
            ),
            (
                m,
                "membership",
                "commune",
                Membership(at_uri(m, NSID_MEMBERSHIP, "commune"), m, "commune", everyone),
            ),
        )
        for repo, coll, rkey, rec in records:
            view.apply(_Ev(repo, coll, rkey, record_to_json(rec)))  # type: ignore[arg-type]
    followed = Followed()
    for w in range(workloads):
        owner = owners[w % meshlets]
        rkey = f"3w{w:08d}"
        uri = f"at://{owner}/{NSID}.workload/{rkey}"
        followed.apply(
            _Ev(
                owner,
                "workload",
                rkey,
                {
                    "name": f"job-{w}",
                    "image": "localhost/busybox:latest",
                    "resources": {"milliCpu": 100, "memoryMiB": 64},
                    "replicas": replicas,
                    "kind": "service",
                    "cluster": "commune",
                    "createdAt": "2026-12-04T06:00:00.000Z",
                },
            )
        )
        ref = {"uri": uri, "cid": f"bafy{rkey}"}
        for b in range(4):
            host = mesh[(w + b) % meshlets]
            followed.apply(
                _Ev(
                    host,
                    "bid",
                    f"b{w:08d}",
                    {
                        "workload": ref,
                        "round": 0,
                        "priority": (w * 7 + b * 13) % 200 - 100,
                        "slots": 0 if b == 3 else 1,
                        "free": {"milliCpu": 32_000, "memoryMiB": 65_536},
                        "createdAt": "2026-12-04T06:00:01.000Z",
                    },
                )
            )
        for s in range(replicas):
            host = mesh[(w + s) % meshlets]
            followed.apply(
                _Ev(
                    host,
                    "workloadStatus",
                    f"s{w:08d}x{s}",
                    {
                        "workload": ref,
                        "round": 0,
                        "slot": s,
                        "state": "running",
                        "restarts": 0,
                        "updatedAt": STAMP,
                    },
                )
            )
    return ViewNode(ReadModel(Local(cfg), view, followed))


def add_status(node: ViewNode, w: int, slot: int, state: str, round_: int = 1) -> None:
    """One more status record reaching the meshlet (a change the page must announce)."""
    f = node.read.followed
    uri = sorted(f.workloads)[w]
    owner_mesh = node.read.local.did
    ref = {"uri": uri, "cid": "bafyx"}
    f.apply(
        _Ev(
            owner_mesh,
            "workloadStatus",
            f"t{w:08d}x{slot}r{round_}",
            {
                "workload": ref,
                "round": round_,
                "slot": slot,
                "state": state,
                "restarts": 0,
                "updatedAt": STAMP,
            },
        )
    )
