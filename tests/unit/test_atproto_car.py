"""CAR blocks are checked against their CIDs by hashing the bytes received."""

from __future__ import annotations

import hashlib

import libipld
import pytest

from meshletd.atproto.verify import Unverified, block, decode_car


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _car(
    blocks: list[bytes], root: bytes | None = None, forge: bool = False
) -> tuple[bytes, list[bytes]]:
    cids = [b"\x01\x71\x12\x20" + hashlib.sha256(raw).digest() for raw in blocks]
    header = libipld.encode_dag_cbor({"version": 1, "roots": [root or cids[0]]})
    out = _varint(len(header)) + header
    for cid, raw in zip(cids, blocks, strict=True):
        body = raw + (b"x" if forge else b"")
        out += _varint(len(cid) + len(body)) + cid + body
    return out, cids


def test_a_block_holding_bytes_that_parse_as_a_cid_is_still_accepted() -> None:
    # A signature may begin like a CIDv1; libipld's encoder would turn it into a CID link,
    # so re-encoding the decoded commit would not hash to its CID. Hashing raw bytes does.
    cid_like = b"\x01\x71\x12\x20" + bytes(32)
    raw = bytes.fromhex("a1") + b"\x63sig" + b"\x58\x24" + cid_like  # {"sig": h'01711220…'}
    car, cids = _car([raw])
    _header, blocks = decode_car(car)
    assert block(blocks, cids[0], "commit") == libipld.decode_dag_cbor(raw)


def test_a_block_whose_bytes_do_not_hash_to_its_cid_is_absent() -> None:
    raw = libipld.encode_dag_cbor({"did": "did:plc:x", "version": 3})
    car, cids = _car([raw], forge=True)
    _header, blocks = decode_car(car)
    with pytest.raises(Unverified, match="commit block does not match its CID"):
        block(blocks, cids[0], "commit")


def test_the_header_names_the_root() -> None:
    raw = libipld.encode_dag_cbor({"a": 1})
    car, cids = _car([raw])
    header, _ = decode_car(car)
    assert header["roots"] == [cids[0]]
