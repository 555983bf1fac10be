"""atproto signing keys (pure): `did:key` parsing and ECDSA signature checks.

atproto signs with ECDSA over SHA-256 on secp256k1 (`ES256K`, what PDSes use by default) or
P-256 (`ES256`); a signature is 64 bytes `r || s` and must be *low-S* (s <= n/2), so that no
second valid signature can be made from a first one. Keys travel as `did:key:z…` (multibase
base58btc of a multicodec prefix + the 33-byte compressed point).

This is the SDK's `atproto_crypto` check, written against smaller libraries so the daemon
does not carry `cryptography` (~7 MB resident) while it idles: secp256k1 goes through
libsecp256k1 (coincurve, ~15x faster than OpenSSL's generic code too), and `cryptography` is
imported only the first time a P-256 key is used (or if coincurve is missing).
`tests/unit/test_atproto_keys.py` checks this module against the SDK on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import libipld

ES256K = "ES256K"  # secp256k1
ES256 = "ES256"  # P-256 (secp256r1)
_PREFIXES = {b"\xe7\x01": ES256K, b"\x80\x24": ES256}
_PREFIX_OF = {alg: prefix for prefix, alg in _PREFIXES.items()}
ORDER = {
    ES256K: 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    ES256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
}
DID_KEY_PREFIX = "did:key:"
# DID-document key types (verificationMethod.type) that carry the raw key, by algorithm.
_LEGACY_TYPES = {
    "EcdsaSecp256k1VerificationKey2019": ES256K,
    "EcdsaSecp256r1VerificationKey2019": ES256,
}


class BadKey(ValueError):
    """A key that is malformed, of an unsupported type, or not a point of its curve."""


@dataclass(frozen=True)
class PublicKey:
    alg: str  # ES256K | ES256
    point: bytes  # SEC1 compressed point, 33 bytes


def parse_multikey(multikey: str) -> PublicKey:
    """A multikey (`z…`, base58btc of prefix + compressed point), shape-checked."""
    if not multikey.startswith("z"):
        raise BadKey(f"not a base58btc multikey: {multikey[:16]!r}")
    try:
        _, raw = libipld.decode_multibase(multikey)
    except Exception as e:
        raise BadKey(f"bad multibase ({e})") from None
    alg = _PREFIXES.get(bytes(raw[:2]))
    if alg is None:
        raise BadKey("unsupported key type")
    point = bytes(raw[2:])
    if len(point) != 33 or point[0] not in (2, 3):
        raise BadKey("expected a 33-byte compressed public key")
    return PublicKey(alg, point)


def parse_did_key(did_key: str) -> PublicKey:
    if not did_key.startswith(DID_KEY_PREFIX):
        raise BadKey(f"not a did:key: {did_key[:24]!r}")
    return parse_multikey(did_key[len(DID_KEY_PREFIX) :])


def format_did_key(alg: str, point: bytes) -> str:
    """`did:key:` of a public key given compressed (33 bytes) or uncompressed (65 bytes)."""
    if len(point) == 65 and point[0] == 4:
        x, y = point[1:33], point[33:]
        point = bytes([2 + (y[-1] & 1)]) + x
    if len(point) != 33 or point[0] not in (2, 3):
        raise BadKey("expected a SEC1 public key")
    return DID_KEY_PREFIX + libipld.encode_multibase("z", _PREFIX_OF[alg] + point)


def did_key_from_method(key_type: str, public_key_multibase: str) -> str | None:
    """The `did:key` of a DID document's verification method (None: unsupported type).
    `Multikey` is taken as written; the 2019 types carry a raw (often uncompressed) key."""
    if key_type == "Multikey":
        return DID_KEY_PREFIX + public_key_multibase
    alg = _LEGACY_TYPES.get(key_type)
    if alg is None:
        return None
    try:
        _, raw = libipld.decode_multibase(public_key_multibase)
    except Exception as e:
        raise BadKey(f"bad multibase ({e})") from None
    return format_did_key(alg, bytes(raw))


def check_point(did_key: str) -> None:
    """Raise `BadKey` unless `did_key` is a supported key on its curve."""
    _verifier(did_key)


def _der(r: int, s: int) -> bytes:
    def integer(n: int) -> bytes:
        b = n.to_bytes((n.bit_length() + 8) // 8, "big")  # a leading 0 keeps it positive
        return b"\x02" + bytes([len(b)]) + b

    body = integer(r) + integer(s)
    return b"\x30" + bytes([len(body)]) + body


class _Verifier:
    __slots__ = ("alg", "check")

    def __init__(self, key: PublicKey) -> None:
        self.alg = key.alg
        check = _coincurve_check(key) if key.alg == ES256K else None
        self.check: Callable[[bytes, bytes], bool] = check or _openssl_check(key)


def _coincurve_check(key: PublicKey) -> Callable[[bytes, bytes], bool] | None:
    try:
        import coincurve
    except ImportError:  # pragma: no cover - coincurve is a dependency; fall back anyway
        return None
    try:
        pub = coincurve.PublicKey(key.point)
    except Exception:
        raise BadKey("not a point on secp256k1") from None

    def check(der: bytes, data: bytes) -> bool:
        # libsecp256k1 itself also refuses high-S signatures: two locks on the same door.
        return bool(pub.verify(der, data))  # hashes with SHA-256

    return check


def _openssl_check(key: PublicKey) -> Callable[[bytes, bytes], bool]:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.hashes import SHA256

    curve = ec.SECP256K1() if key.alg == ES256K else ec.SECP256R1()
    try:
        pub = ec.EllipticCurvePublicKey.from_encoded_point(curve, key.point)
    except ValueError:
        raise BadKey(f"not a point on the {key.alg} curve") from None

    def check(der: bytes, data: bytes) -> bool:
        try:
            pub.verify(der, data, ec.ECDSA(SHA256()))
        except InvalidSignature:
            return False
        return True

    return check


@lru_cache(maxsize=4096)
def _verifier(did_key: str) -> _Verifier:
    return _Verifier(parse_did_key(did_key))


def verify_signature(did_key: str, data: bytes, sig: Any) -> bool:
    """Whether `sig` (64 bytes r||s, low-S) signs sha256(`data`) under `did_key`.
    A malformed or unsupported key is False, like a wrong signature."""
    if not isinstance(sig, bytes | bytearray) or len(sig) != 64:
        return False
    try:
        v = _verifier(did_key)
    except BadKey:
        return False
    n = ORDER[v.alg]
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    if not (0 < r < n and 0 < s <= n // 2):  # s > n/2: the malleable high-S twin
        return False
    return bool(v.check(_der(r, s), data))


__all__ = [
    "ES256",
    "ES256K",
    "BadKey",
    "PublicKey",
    "check_point",
    "did_key_from_method",
    "format_did_key",
    "parse_did_key",
    "parse_multikey",
    "verify_signature",
]
