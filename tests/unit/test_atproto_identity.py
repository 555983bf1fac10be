"""DID documents are parsed into what meshlet needs; did:web works for localhost ports."""

from __future__ import annotations

import httpx
import pytest

from meshletd.atproto.identity import (
    IdentityError,
    IdentityResolver,
    StaticIdentityResolver,
    did_web_url,
    identity_from_doc,
)
from meshletd.atproto.testing import SigningKey, did_doc


def test_did_web_urls_decode_the_port_and_use_http_only_for_localhost():
    assert did_web_url("did:web:localhost%3A8080") == "http://localhost:8080/.well-known/did.json"
    assert did_web_url("did:web:mesh.alice.com") == "https://mesh.alice.com/.well-known/did.json"
    assert did_web_url("did:web:example.com:u:bob") == "https://example.com/u/bob/did.json"
    with pytest.raises(IdentityError):
        did_web_url("did:plc:abc")


def test_a_did_document_yields_pds_signing_key_and_meshlet_endpoint():
    key = SigningKey()
    doc = did_doc("did:plc:abc", key.multikey, "http://localhost:2583/")
    doc["service"].append(
        {"id": "#meshlet", "type": "MeshletXrpc", "serviceEndpoint": "http://127.0.0.1:7000"}
    )
    ident = identity_from_doc("did:plc:abc", doc)
    assert ident.pds == "http://localhost:2583"
    assert ident.signing_key == key.did_key
    assert ident.meshlet_endpoint == "http://127.0.0.1:7000"


def test_a_document_for_another_did_is_refused():
    doc = did_doc("did:plc:other", SigningKey().multikey, "http://x")
    with pytest.raises(IdentityError, match="is for did:plc:other"):
        identity_from_doc("did:plc:abc", doc)


async def test_did_web_resolution_is_cached_until_it_expires():
    did = "did:web:localhost%3A9999"
    key = SigningKey()
    hits = []

    def handler(request: httpx.Request) -> httpx.Response:
        hits.append(str(request.url))
        return httpx.Response(200, json=did_doc(did, key.multikey, "http://localhost:1"))

    now = [0.0]
    r = IdentityResolver(
        "http://plc.invalid",
        ttl_s=60,
        clock=lambda: now[0],
        http=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        allow_hosts={"localhost:9999"},  # a test server: loopback is refused otherwise
    )
    assert (await r.resolve(did)).signing_key == key.did_key
    await r.resolve(did)
    assert hits == ["http://localhost:9999/.well-known/did.json"]
    now[0] = 61
    await r.resolve(did)
    await r.resolve(did, fresh=True)
    assert len(hits) == 3


async def test_unresolvable_dids_raise_identity_error():
    def handler(request):
        return httpx.Response(404)

    r = IdentityResolver(
        "http://plc.invalid", http=httpx.AsyncClient(transport=httpx.MockTransport(handler))
    )
    with pytest.raises(IdentityError):
        await r.resolve("did:web:localhost%3A1")
    with pytest.raises(IdentityError, match="unsupported DID method"):
        await r.resolve("did:key:zQ3abc")
    with pytest.raises(IdentityError):
        await StaticIdentityResolver().resolve("did:plc:nobody")
