"""Service auth and DID resolution do not work for strangers first (issue #15, point 8):
no resolution fetches a loopback or private address unless allowed, the caches are bounded,
and one issuer cannot fill the replay cache. Each test failed on db8aa19."""

from __future__ import annotations

import httpx
import pytest

from meshletd.atproto.identity import IdentityError, IdentityResolver
from meshletd.atproto.testing import SigningKey, did_doc
from meshletd.errors import Forbidden
from meshletd.xrpc.auth import ReplayCache, ServiceAuthVerifier, StaticKeys
from meshletd.xrpc.testing import TokenIssuer


def _resolver(hits, **kw):
    key = SigningKey()

    def handler(request: httpx.Request) -> httpx.Response:
        hits.append(str(request.url))
        did = "did:web:" + request.url.netloc.decode().replace(":", "%3A")
        return httpx.Response(200, json=did_doc(did, key.multikey, "https://pds.example"))

    async def lookup(host, port):
        return {"public.example": ["93.184.215.14"], "sneaky.example": ["10.1.2.3"]}[host]

    return IdentityResolver(
        "http://127.0.0.1:2582",
        http=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        lookup=lookup,
        **kw,
    )


@pytest.mark.parametrize(
    "did",
    [
        "did:web:localhost%3A8080",
        "did:web:127.0.0.1%3A22",
        "did:web:10.0.0.1",
        "did:web:192.168.1.1%3A80",
        "did:web:169.254.169.254",
        "did:web:%5B%3A%3A1%5D%3A80",
        "did:web:sneaky.example",  # a public-looking name that resolves to a private address
    ],
)
async def test_a_did_web_on_a_private_address_is_never_fetched(did):
    hits: list[str] = []
    with pytest.raises(IdentityError):
        await _resolver(hits).resolve(did)
    assert hits == []


async def test_an_allowed_test_host_and_public_hosts_are_fetched():
    hits: list[str] = []
    r = _resolver(hits, allow_hosts={"localhost:8080"})
    await r.resolve("did:web:localhost%3A8080")
    await r.resolve("did:web:public.example")
    assert hits == [
        "http://localhost:8080/.well-known/did.json",
        "https://public.example/.well-known/did.json",
    ]


async def test_the_identity_cache_is_bounded():
    hits: list[str] = []
    r = _resolver(hits, allow_hosts={f"localhost:{p}" for p in range(8000, 8100)}, max_entries=10)
    for p in range(8000, 8100):
        await r.resolve(f"did:web:localhost%3A{p}")
    assert len(r._cache) == 10
    await r.resolve("did:web:localhost%3A8099")  # the newest are kept
    assert len(hits) == 100


def test_one_issuer_cannot_fill_the_replay_cache():
    cache = ReplayCache(max_entries=100, per_issuer=10)
    now = 1000.0
    for i in range(50):
        cache.check_and_add("did:plc:mallory", f"j{i}", now + 60, now)
    assert len(cache) == 10
    # Everyone else still gets in.
    assert all(cache.check_and_add(f"did:plc:m{i}", "j", now + 60, now) for i in range(50))
    # Replays are still refused, and expired tokens make room again.
    assert not cache.check_and_add("did:plc:m1", "j", now + 60, now)
    assert cache.check_and_add("did:plc:mallory", "later", now + 200, now + 100)


async def test_a_stranger_is_refused_before_resolution_and_learns_nothing():
    keys = StaticKeys({})
    me = "did:plc:me"
    verifier = ServiceAuthVerifier(me, keys, is_known=lambda did: did == "did:plc:bob")
    token = TokenIssuer("did:web:127.0.0.1%3A22").token(me, "farm.meshlet.getCapacity")
    with pytest.raises(Forbidden):
        await verifier.verify(token, "farm.meshlet.getCapacity")
    assert keys.lookups == 0


async def test_resolution_errors_are_not_sent_to_the_caller():
    class Leaky:
        async def signing_key(self, did, force_refresh):
            raise IdentityError("GET http://10.0.0.7:8080/secret-admin failed: 500")

    me = "did:plc:me"
    verifier = ServiceAuthVerifier(me, Leaky(), is_known=lambda did: True)
    token = TokenIssuer("did:plc:bob").token(me, "farm.meshlet.getCapacity")
    with pytest.raises(Exception) as err:
        await verifier.verify(token, "farm.meshlet.getCapacity")
    assert "10.0.0.7" not in str(err.value) and "secret-admin" not in str(err.value)
