"""Pure verification of signed repo data: commit signatures, block hashes and MST proofs.

A commit (from a firehose `#commit` frame or a `com.atproto.sync.getRecord` CAR) is trusted
only when (1) its block hashes to the CID that names it, (2) it is signed by the repo DID's
current signing key, and (3) every record we take from it is proven by a path of MST nodes,
each hashing to the CID its parent names, from the commit's `data` root. Blocks are the
decoded DAG-CBOR values of a CAR (CID links are bytes, as libipld gives them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import libipld
from atproto_crypto.algs import ALGORITHM_TO_CLASS
from atproto_crypto.did import parse_did_key
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ec import ECDSA
from cryptography.hazmat.primitives.hashes import SHA256

_CID_PREFIX = b"\x01\x71\x12\x20"  # CIDv1, dag-cbor, sha2-256, 32 bytes

Blocks = Mapping[bytes, Any]


class Unverified(Exception):
    """Repo data that is not proven by a valid signed commit; the message says why."""


def cid_of(obj: Any) -> bytes:
    """The (binary) CID a DAG-CBOR value has: CIDv1 dag-cbor sha2-256 of its encoding."""
    return _CID_PREFIX + hashlib.sha256(libipld.encode_dag_cbor(obj)).digest()


def cid_str(cid: bytes) -> str:
    return libipld.encode_cid(cid)


def cid_bytes(cid: str) -> bytes:
    d = libipld.decode_cid(cid)
    h = d["hash"]
    return (
        bytes([d["version"]])
        + _varint(d["codec"])
        + _varint(h["code"])
        + _varint(h["size"])
        + h["digest"]
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def block(blocks: Blocks, cid: bytes, what: str) -> Any:
    """A block whose content hashes to `cid` (raises Unverified if absent or forged)."""
    value = blocks.get(cid)
    if value is None:
        raise Unverified(f"{what} block missing")
    if cid[:4] == _CID_PREFIX and cid_of(value) != cid:
        raise Unverified(f"{what} block does not match its CID")
    return value


try:  # libsecp256k1 verifies ~15x faster than OpenSSL's generic secp256k1 (optional)
    import coincurve as _coincurve
except ImportError:  # pragma: no cover - depends on the environment
    _coincurve = None


class _Key:
    __slots__ = ("alg", "fast", "pub")

    def __init__(self, did_key: str) -> None:
        parsed = parse_did_key(did_key)
        self.alg = ALGORITHM_TO_CLASS[parsed.jwt_alg]()
        self.pub = self.alg.get_elliptic_curve_public_key(parsed.key_bytes)
        self.fast = (
            _coincurve.PublicKey(parsed.key_bytes)
            if _coincurve is not None and parsed.jwt_alg == "ES256K"
            else None
        )


@lru_cache(maxsize=4096)
def _key(did_key: str) -> _Key:
    return _Key(did_key)


def verify_signature(did_key: str, data: bytes, sig: bytes) -> bool:
    """ECDSA (P-256 or secp256k1, low-S, 64-byte r||s) over sha256(data), via the SDK's algs
    (and libsecp256k1 through coincurve for secp256k1 when it is installed)."""
    if not isinstance(sig, bytes | bytearray) or len(sig) != 64:
        return False
    try:
        k = _key(did_key)
        der = k.alg._encode_signature(bytes(sig))  # rejects high-S (malleable) signatures
    except Exception:
        return False
    if k.fast is not None:
        return bool(k.fast.verify(der, data))
    try:
        k.pub.verify(der, data, ECDSA(SHA256()))
    except InvalidSignature:
        return False
    return True


def verify_commit(blocks: Blocks, commit_cid: bytes, did: str, did_key: str | None) -> dict:
    """The signed commit object named by `commit_cid`, checked against `did` and its key."""
    commit = block(blocks, commit_cid, "commit")
    if not isinstance(commit, dict):
        raise Unverified("commit is not an object")
    if commit.get("did") != did:
        raise Unverified(f"commit is for {commit.get('did')}, not {did}")
    if commit.get("version") != 3:
        raise Unverified(f"unsupported commit version {commit.get('version')}")
    sig = commit.get("sig")
    if sig is None:
        raise Unverified("commit is unsigned")
    if did_key is None:
        raise Unverified("repo DID has no signing key")
    unsigned = {k: v for k, v in commit.items() if k != "sig"}
    if not verify_signature(did_key, libipld.encode_dag_cbor(unsigned), sig):
        raise Unverified("bad commit signature")
    return commit


def mst_lookup(blocks: Blocks, root: bytes, key: str) -> bytes | None:
    """CID stored under `key` ("collection/rkey") in the MST rooted at `root`, or None.

    Raises Unverified if the proof needs a node that is missing or does not hash right.
    """
    target = key.encode()
    node_cid: bytes | None = root
    depth = 0
    while node_cid is not None:
        depth += 1
        if depth > 64:
            raise Unverified("MST too deep")
        node = block(blocks, node_cid, "MST node")
        entries = node.get("e") or []
        prev = b""
        next_cid: bytes | None = node.get("l")
        for e in entries:
            k = prev[: e["p"]] + e["k"]
            prev = k
            if k == target:
                return e["v"]
            if target < k:
                break
            next_cid = e.get("t")
        else:
            pass
        node_cid = next_cid
    return None


def verified_record(
    blocks: Blocks, data_root: bytes, path: str, expect_cid: bytes | None
) -> tuple[bytes | None, Any]:
    """(cid, record) proven under `path`; (None, None) when the MST proves it absent.

    `expect_cid` is what the frame claims (None for a delete); a mismatch raises.
    """
    found = mst_lookup(blocks, data_root, path)
    if found != expect_cid:
        raise Unverified(f"{path}: MST proof does not match the op")
    if found is None:
        return None, None
    return found, block(blocks, found, "record")
