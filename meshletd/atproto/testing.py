"""Test helpers: a signing repo that emits real-format subscribeRepos frames.

`FakeRepo` keeps records in a (flat, single-node) MST, signs commits with a fresh
secp256k1 key and produces `#commit` frames exactly as a PDS encodes them, so the decoder,
the verifier and the benchmark run against the same bytes a PDS would send. Tamper hooks
make forged, unsigned and oversized variants.
"""

from __future__ import annotations

import itertools
from typing import Any

import libipld
from atproto_crypto.consts import BASE58_MULTIBASE_PREFIX, SECP256K1_DID_PREFIX
from atproto_crypto.multibase import bytes_to_multibase
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from meshletd.atproto.verify import cid_of

_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_B32 = "234567abcdefghijklmnopqrstuvwxyz"


class SigningKey:
    def __init__(self) -> None:
        self.priv = ec.generate_private_key(ec.SECP256K1())
        compressed = self.priv.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
        self.multikey = bytes_to_multibase(
            BASE58_MULTIBASE_PREFIX, SECP256K1_DID_PREFIX + compressed
        )
        self.did_key = "did:key:" + self.multikey

    def sign(self, data: bytes) -> bytes:
        r, s = decode_dss_signature(self.priv.sign(data, ec.ECDSA(hashes.SHA256())))
        if s > _SECP256K1_N // 2:
            s = _SECP256K1_N - s
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def encode_car(root: bytes, blocks: dict[bytes, Any]) -> bytes:
    header = libipld.encode_dag_cbor({"version": 1, "roots": [root]})
    out = bytearray(_varint(len(header)) + header)
    for cid, value in blocks.items():
        data = libipld.encode_dag_cbor(value)
        out += _varint(len(cid) + len(data)) + cid + data
    return bytes(out)


def did_doc(did: str, did_key_multikey: str, pds: str) -> dict[str, Any]:
    return {
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": did,
        "alsoKnownAs": [],
        "verificationMethod": [
            {
                "id": f"{did}#atproto",
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": did_key_multikey,
            }
        ],
        "service": [
            {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds}
        ],
    }


class FakeRepo:
    """A repo with a signing key that produces real-format commit frames."""

    _seq = itertools.count(1)

    def __init__(self, did: str, key: SigningKey | None = None) -> None:
        self.did = did
        self.key = key or SigningKey()
        self.records: dict[str, bytes] = {}  # path -> record cid
        self.values: dict[bytes, Any] = {}
        self._clock = itertools.count(1_700_000_000_000_000)
        self.rev = ""
        self.last_commit: tuple[bytes, dict[str, Any]] = (b"", {})

    def _tid(self) -> str:
        n = next(self._clock) << 10
        s = ""
        for _ in range(13):
            s = _B32[n & 31] + s
            n >>= 5
        return s

    def _mst(self) -> tuple[bytes, dict[bytes, Any]]:
        entries = []
        for path in sorted(self.records):
            entries.append({"p": 0, "k": path.encode(), "v": self.records[path], "t": None})
        node = {"l": None, "e": entries}
        cid = cid_of(node)
        return cid, {cid: node}

    def commit(
        self,
        writes: list[tuple[str, str, dict[str, Any] | None]],
        *,
        sign_with: SigningKey | None = None,
        unsigned: bool = False,
        tamper_record: dict[str, Any] | None = None,
        seq: int | None = None,
    ) -> bytes:
        """Apply (action, path, value) writes; return the `#commit` frame bytes."""
        ops: list[dict[str, Any]] = []
        blocks: dict[bytes, Any] = {}
        for action, path, value in writes:
            prev = self.records.get(path)
            if action == "delete":
                self.records.pop(path, None)
                ops.append({"action": "delete", "path": path, "cid": None, "prev": prev})
                continue
            assert value is not None
            cid = cid_of(value)
            self.records[path] = cid
            self.values[cid] = value
            blocks[cid] = tamper_record if tamper_record is not None else value
            op: dict[str, Any] = {"action": action, "path": path, "cid": cid}
            if prev is not None:
                op["prev"] = prev
            ops.append(op)
        data, mst_blocks = self._mst()
        blocks.update(mst_blocks)
        since = self.rev or None
        self.rev = self._tid()
        commit: dict[str, Any] = {
            "did": self.did,
            "version": 3,
            "data": data,
            "rev": self.rev,
            "prev": None,
        }
        if not unsigned:
            commit["sig"] = (sign_with or self.key).sign(libipld.encode_dag_cbor(commit))
        commit_cid = cid_of(commit)
        blocks[commit_cid] = commit
        self.last_commit = (commit_cid, commit)
        body = {
            "seq": seq if seq is not None else next(self._seq),
            "rebase": False,
            "tooBig": False,
            "repo": self.did,
            "commit": commit_cid,
            "rev": self.rev,
            "since": since,
            "blocks": encode_car(commit_cid, blocks),
            "ops": ops,
            "blobs": [],
            "time": "2026-11-27T00:00:00.000Z",
        }
        header = libipld.encode_dag_cbor({"op": 1, "t": "#commit"})
        return header + libipld.encode_dag_cbor(body)

    def proof(self, collection: str, rkey: str) -> bytes:
        """What `com.atproto.sync.getRecord` answers for the record now: a CAR of the last
        signed commit, the MST path to it and the record (none when it is absent)."""
        commit_cid, commit = self.last_commit
        data, blocks = self._mst()
        assert data == commit["data"], "the repo changed after its last commit"
        out: dict[bytes, Any] = {commit_cid: commit, **blocks}
        cid = self.records.get(f"{collection}/{rkey}")
        if cid is not None:
            out[cid] = self.values[cid]
        return encode_car(commit_cid, out)

    def put(self, collection: str, rkey: str, value: dict[str, Any], **kw: Any) -> bytes:
        path = f"{collection}/{rkey}"
        action = "update" if path in self.records else "create"
        return self.commit([(action, path, value)], **kw)

    def delete(self, collection: str, rkey: str, **kw: Any) -> bytes:
        return self.commit([("delete", f"{collection}/{rkey}", None)], **kw)


def frame(t: str, body: dict[str, Any]) -> bytes:
    """A non-commit message frame (#identity, #account, #sync, #info)."""
    return libipld.encode_dag_cbor({"op": 1, "t": t}) + libipld.encode_dag_cbor(body)


def error_frame(error: str, message: str = "") -> bytes:
    return libipld.encode_dag_cbor({"op": -1}) + libipld.encode_dag_cbor(
        {"error": error, "message": message}
    )


class MeshletNode:
    """One meshlet's atproto side (publish + live cluster view), for integration tests.

    `async with MeshletNode.running(...) as node:` publishes the records, starts the
    firehose and waits until the watches are in place.
    """

    def __init__(
        self,
        *,
        plc_url: str,
        meshlet: Any,  # devnet Account of the meshlet
        owner: Any,  # devnet Account of the owner
        clusters: dict[str, list[str]],
        cursors: Any = None,
        anti_entropy_every_s: float = 30.0,
    ) -> None:
        from meshletd.atproto.firehose import Backoff, Firehose, MemoryCursorStore
        from meshletd.atproto.identity import IdentityResolver

        self.meshlet_account = meshlet
        self.owner_account = owner
        self.clusters = clusters
        self.resolver = IdentityResolver(plc_url, ttl_s=60)
        self.cursors = cursors or MemoryCursorStore()
        self.events: list[Any] = []
        self._anti_entropy_every_s = anti_entropy_every_s
        self._backoff = Backoff(initial_s=0.1, max_s=1.0)
        self._firehose_cls = Firehose

    def _firehose(self, sink: Any) -> Any:
        return self._firehose_cls(
            self.resolver,
            self.cursors,
            sink,
            anti_entropy_every_s=self._anti_entropy_every_s,
            backoff=self._backoff,
        )

    async def publish(self, *, state: str = "active") -> int:
        from meshletd.atproto.cluster import publish_own_records
        from meshletd.atproto.pds import PdsClient
        from meshletd.core.records import MeshletOwner

        self.meshlet_pds = PdsClient(
            self.meshlet_account.pds_url,
            self.meshlet_account.did,
            self.meshlet_account.app_password,
        )
        self.owner_pds = PdsClient(
            self.owner_account.pds_url, self.owner_account.did, self.owner_account.app_password
        )
        await self.meshlet_pds.login()
        await self.owner_pds.login()
        record = MeshletOwner(
            uri="",  # publish_own_records addresses it
            meshlet=self.meshlet_account.did,
            owner=self.owner_account.did,
            milli_cpu=2000,
            memory_mib=2048,
            storage_mib=4096,
            state=state,
            arch="amd64",
            endpoint="http://127.0.0.1:1",
        )
        return await publish_own_records(self.meshlet_pds, self.owner_pds, record, self.clusters)

    def members(self, cluster: str) -> set[str]:
        snap = self.formation.view.clusters().get(cluster)
        return set(snap.members) if snap else set()

    async def start(self, nursery: Any) -> None:
        from meshletd.atproto.cluster import ClusterFormation, ConfiguredClusters

        view = ConfiguredClusters.create(
            self.meshlet_account.did, self.owner_account.did, self.clusters
        )
        self.formation = ClusterFormation(view, self._firehose)
        self.formation.add_listener(self.events.append)
        self.startup_batch = await nursery.start(self.formation.run)

    async def wait_members(self, cluster: str, expected: set[str], timeout_s: float = 10) -> bool:
        def formed(v: Any) -> bool:
            snap = v.clusters().get(cluster)
            return snap is not None and set(snap.members) == expected

        return bool(await self.formation.wait_for(formed, timeout_s))
