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
from typing import Any

import libipld

from meshletd.atproto.keys import verify_signature

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
        + bytes(h["digest"])
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


class HashedBlocks(dict[bytes, Any]):
    """Blocks of a CAR whose raw bytes were hashed against their CIDs as they were read;
    `forged` holds the CIDs whose bytes did not match (those blocks are left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.forged: set[bytes] = set()


def _uvarint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7


def decode_car(data: bytes) -> tuple[dict[str, Any], HashedBlocks]:
    """(header, blocks) of a CAR v1, keeping only blocks whose bytes hash to their CID.

    The hash is taken over the bytes received, never over a re-encoding: libipld's encoder
    turns any byte string that parses as a CID (a signature may) into a CID link, so a
    decode/encode round trip does not always give the original bytes back.
    """
    hlen, i = _uvarint(data, 0)
    header = libipld.decode_dag_cbor(data[i : i + hlen])
    i += hlen
    blocks = HashedBlocks()
    while i < len(data):
        n, i = _uvarint(data, i)
        section, i = data[i : i + n], i + n
        version, j = _uvarint(section, 0)
        codec, j = _uvarint(section, j)
        code, j = _uvarint(section, j)
        size, j = _uvarint(section, j)
        digest, j = section[j : j + size], j + size
        if version != 1 or code != 0x12 or size != 32:
            continue  # not a CIDv1 sha2-256: nothing we can check, nothing we trust
        raw = section[j:]
        if hashlib.sha256(raw).digest() != digest:
            blocks.forged.add(section[:j])  # left out: a proof through it fails
            continue
        blocks[section[:j]] = libipld.decode_dag_cbor(raw) if codec == 0x71 else raw
    return header, blocks


def block(blocks: Blocks, cid: bytes, what: str) -> Any:
    """A block whose content hashes to `cid` (raises Unverified if absent or forged)."""
    value = blocks.get(cid)
    if value is None:
        if isinstance(blocks, HashedBlocks) and cid in blocks.forged:
            raise Unverified(f"{what} block does not match its CID")
        raise Unverified(f"{what} block missing")
    # Blocks from decode_car were hashed as read; others (built in memory) are re-encoded.
    if not isinstance(blocks, HashedBlocks) and cid[:4] == _CID_PREFIX and cid_of(value) != cid:
        raise Unverified(f"{what} block does not match its CID")
    return value


def verify_commit(
    blocks: Blocks, commit_cid: bytes, did: str, did_key: str | None
) -> dict[str, Any]:
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
                value: bytes | None = e["v"]
                return value
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
