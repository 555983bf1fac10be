"""Signing keys and signatures are judged exactly as the SDK's atproto_crypto judges them
(meshletd.atproto.keys re-implements them without `cryptography` in the idle daemon)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from atproto_core.did_doc import DidDocument, is_valid_did_doc
from atproto_crypto.did import get_did_key
from atproto_crypto.verify import verify_signature as sdk_verify
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from meshletd.atproto import keys
from meshletd.atproto.identity import IdentityError, identity_from_doc
from meshletd.atproto.testing import did_doc

CURVES = {keys.ES256K: ec.SECP256K1(), keys.ES256: ec.SECP256R1()}


class Key:
    def __init__(self, alg: str) -> None:
        self.alg = alg
        self.n = keys.ORDER[alg]
        self.priv = ec.generate_private_key(CURVES[alg])
        pub = self.priv.public_key()
        self.compressed = pub.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
        self.uncompressed = pub.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self.did_key = keys.format_did_key(alg, self.compressed)

    def sign(self, data: bytes, high_s: bool = False) -> bytes:
        r, s = decode_dss_signature(self.priv.sign(data, ec.ECDSA(hashes.SHA256())))
        if (s > self.n // 2) != high_s:
            s = self.n - s
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@pytest.fixture(params=[keys.ES256K, keys.ES256])
def key(request) -> Key:
    return Key(request.param)


def both(did_key: str, data: bytes, sig) -> bool:
    ours = keys.verify_signature(did_key, data, sig)
    try:
        theirs = sdk_verify(did_key, data, sig)
    except Exception:
        theirs = False
    assert ours == theirs, (did_key, sig)
    return ours


def test_a_good_low_s_signature_verifies_on_both_curves(key: Key) -> None:
    data = os.urandom(100)
    assert both(key.did_key, data, key.sign(data))


def test_the_high_s_twin_of_a_good_signature_is_refused(key: Key) -> None:
    data = os.urandom(100)
    assert not both(key.did_key, data, key.sign(data, high_s=True))


def test_other_data_other_keys_and_bit_flips_are_refused(key: Key) -> None:
    data = os.urandom(100)
    sig = key.sign(data)
    assert not both(key.did_key, data + b"x", sig)
    assert not both(Key(key.alg).did_key, data, sig)
    for i in (0, 31, 32, 63):
        flipped = bytearray(sig)
        flipped[i] ^= 1
        assert not keys.verify_signature(key.did_key, data, bytes(flipped))


def test_without_coincurve_secp256k1_is_checked_by_openssl_just_as_strictly(monkeypatch) -> None:
    key = Key(keys.ES256K)
    data = os.urandom(50)
    monkeypatch.setattr(keys, "_coincurve_check", lambda _key: None)
    keys._verifier.cache_clear()
    try:
        assert keys.verify_signature(key.did_key, data, key.sign(data))
        assert not keys.verify_signature(key.did_key, data, key.sign(data, high_s=True))
        assert not keys.verify_signature(key.did_key, data + b"!", key.sign(data))
    finally:
        keys._verifier.cache_clear()


def test_malformed_signatures_are_refused_without_raising(key: Key) -> None:
    data = b"data"
    n = key.n.to_bytes(32, "big")
    for sig in (b"", b"\x00" * 64, key.sign(data)[:63], key.sign(data) + b"\x00", None, "x" * 64):
        assert keys.verify_signature(key.did_key, data, sig) is False
    assert keys.verify_signature(key.did_key, data, n + key.sign(data)[32:]) is False  # r = n


def test_did_keys_round_trip_with_the_sdk(key: Key) -> None:
    from atproto_crypto.did import format_did_key, parse_did_key

    assert key.did_key == format_did_key(key.alg, key.uncompressed)
    parsed = keys.parse_did_key(key.did_key)
    assert parsed.alg == parse_did_key(key.did_key).jwt_alg == key.alg
    assert parsed.point == key.compressed


def test_legacy_key_types_in_did_documents_give_the_sdks_did_key(key: Key) -> None:
    legacy = {
        keys.ES256K: "EcdsaSecp256k1VerificationKey2019",
        keys.ES256: "EcdsaSecp256r1VerificationKey2019",
    }[key.alg]
    for raw in (key.uncompressed, key.compressed):
        multibase = "z" + _b58(raw)
        assert keys.did_key_from_method(legacy, multibase) == get_did_key(legacy, multibase)
    assert keys.did_key_from_method("JsonWebKey2020", "zabc") is None


def test_keys_off_the_curve_or_of_other_types_are_unusable() -> None:
    import libipld

    off_curve = "did:key:" + libipld.encode_multibase("z", b"\xe7\x01\x02" + b"\x00" * 32)
    ed25519 = "did:key:" + libipld.encode_multibase("z", b"\xed\x01" + b"\x01" * 32)
    for bad in (off_curve, ed25519, "did:key:zzz", "did:web:example.com", "did:key:abc"):
        assert keys.verify_signature(bad, b"d", b"\x01" * 64) is False
        with pytest.raises(keys.BadKey):
            keys.check_point(bad)


def _b58(data: bytes) -> str:
    import libipld

    return libipld.encode_multibase("z", data)[1:]


DOCS = [
    did_doc("did:plc:abc", "zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme", "http://pds/"),
    {"id": "did:plc:abc"},
    {"id": 5},
    {"id": "did:plc:abc", "alsoKnownAs": "at://x"},
    {"id": "did:plc:abc", "alsoKnownAs": ["at://alice.test", "https://x"]},
    {"id": "did:plc:abc", "verificationMethod": [{"id": "#atproto", "type": "Multikey"}]},
    {"id": "did:plc:abc", "verificationMethod": {"id": "#atproto"}},
    {"id": "did:plc:abc", "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer"}]},
    {
        "id": "did:plc:abc",
        "service": [
            {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": 7}
        ],
    },
    {
        "id": "did:plc:abc",
        "service": [
            {
                "id": "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": "ftp://x",
            }
        ],
    },
    {
        "id": "did:plc:abc",
        "service": [
            {
                "id": "did:plc:abc#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": "https://pds.example/",
            }
        ],
    },
    {"id": "did:plc:abc", "service": ["x"]},
]


@pytest.mark.parametrize("doc", DOCS)
def test_did_documents_are_read_as_the_sdk_reads_them(doc) -> None:
    if not is_valid_did_doc(doc):
        with pytest.raises(IdentityError, match="malformed"):
            identity_from_doc("did:plc:abc", doc)
        return
    sdk = DidDocument.from_dict(doc)
    ours = identity_from_doc("did:plc:abc", doc)
    assert ours.signing_key == sdk.get_did_key()
    assert ours.handle == sdk.get_handle()
    assert ours.pds == ((sdk.get_pds_endpoint() or "").rstrip("/") or None)


def test_a_document_whose_key_is_off_the_curve_is_unusable() -> None:
    import libipld

    bad = libipld.encode_multibase("z", b"\xe7\x01\x02" + b"\x00" * 32)
    with pytest.raises(IdentityError, match="unusable signing key"):
        identity_from_doc("did:plc:abc", did_doc("did:plc:abc", bad, "http://pds"))


def test_the_daemon_idles_without_the_sdk_client_cryptography_rich_or_jinja2() -> None:
    # What a meshletd with the atproto backend imports to run (the footprint's bulk).
    code = (
        "import sys\n"
        "from meshletd.daemon.lean import skip_optional_imports\n"
        "skip_optional_imports()\n"
        "import meshletd.daemon.service, meshletd.daemon.atproto_node, meshletd.atproto.cluster\n"
        "import meshletd.atproto.firehose, meshletd.atproto.identity, meshletd.atproto.pds\n"
        "import meshletd.daemon.engine, meshletd.runtime, meshletd.daemon.secrets\n"
        "import meshletd.web.app\n"
        "heavy = ('atproto_client', 'atproto', 'cryptography', 'rich', 'click', 'pygments',\n"
        "         'jinja2')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
