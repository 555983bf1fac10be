"""Test helpers: an issuer of service-auth JWTs with a key made on the spot, and a check
that every answer has the shape its lexicon promises.

`TokenIssuer` is used by unit tests (with `StaticKeys`) to produce valid, expired,
mis-addressed and mis-signed tokens without a PDS.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

_SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """A DID with an ES256K key that signs service-auth tokens like a PDS would."""

    def __init__(self, did: str) -> None:
        from atproto_crypto.consts import SECP256K1_JWT_ALG
        from atproto_crypto.did import format_did_key

        self.did = did
        self._key = ec.generate_private_key(ec.SECP256K1())
        public = self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self.did_key = format_did_key(SECP256K1_JWT_ALG, public)

    def sign(self, signing_input: bytes) -> bytes:
        der = self._key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        if s > _SECP256K1_ORDER // 2:  # atproto requires low-S signatures
            s = _SECP256K1_ORDER - s
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def token(
        self,
        aud: str,
        lxm: str | None,
        *,
        exp: int | None = None,
        ttl: int = 60,
        jti: str | None = None,
        iss: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": iss or self.did,
            "aud": aud,
            "iat": now,
            "exp": exp if exp is not None else now + ttl,
        }
        # jti=None: a fresh random one; jti="": none at all (to test its absence).
        if jti is None:
            payload["jti"] = secrets.token_hex(16)
        elif jti:
            payload["jti"] = jti
        if lxm is not None:
            payload["lxm"] = lxm
        payload.update(extra or {})
        header = {"typ": "JWT", "alg": "ES256K"}
        signing_input = (
            _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
        ).encode()
        return signing_input.decode() + "." + _b64(self.sign(signing_input))


async def check_output_against_lexicon(response: Any) -> None:
    """An httpx response hook: a successful `/xrpc/<nsid>` answer must validate against the
    output schema of `<nsid>`'s lexicon (raises `InvalidRecord` naming the field if not).

    `httpx.AsyncClient(..., event_hooks={"response": [check_output_against_lexicon]})`.
    """
    from meshletd.atproto.lexicon import default_lexicons
    from meshletd.xrpc.app import from_json

    path = response.request.url.path
    nsid = path.rsplit("/xrpc/", 1)[-1] if "/xrpc/" in path else ""
    lexicons = default_lexicons()
    if response.status_code != 200 or nsid not in lexicons.docs:
        return
    await response.aread()
    lexicons.validate_output(nsid, from_json(response.json()))
