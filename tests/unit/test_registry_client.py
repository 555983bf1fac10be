"""The registry client against a stand-in registry (httpx MockTransport): tag → digest,
size from the manifest, token and basic auth, refusals named, a lying registry refused.
(The real registry is tested on booted hosts: tests/system/test_registry_pulls.py.)"""

from __future__ import annotations

import base64
import hashlib
import json

import httpx
import pytest

from meshletd.runtime.reference import parse_image
from meshletd.runtime.registry import RegistryClient, RegistryError, auth_file

MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"digest": "sha256:" + "c" * 64, "size": 100},
        "layers": [{"digest": "sha256:" + "1" * 64, "size": 1000}, {"size": 23, "digest": "x"}],
    }
).encode()
DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
INDEX = json.dumps(
    {
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"digest": "sha256:" + "9" * 64, "platform": {"os": "linux", "architecture": "s390x"}},
            {"digest": DIGEST, "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    }
).encode()
INDEX_DIGEST = "sha256:" + hashlib.sha256(INDEX).hexdigest()


def registry(*, token: bool = False, lie: bool = False) -> httpx.MockTransport:
    def handle(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/token":
            if req.headers.get("Authorization") != "Basic " + base64.b64encode(b"al:pw").decode():
                return httpx.Response(401)
            assert req.url.params["scope"] == "repository:team/app:pull"
            return httpx.Response(200, json={"token": "T"})
        if token and req.headers.get("Authorization") != "Bearer T":
            realm = 'Bearer realm="https://r.test/token",service="r.test"'
            return httpx.Response(401, headers={"WWW-Authenticate": realm})
        ref = req.url.path.rsplit("/", 1)[1]
        if ref in ("v1", DIGEST):
            body = MANIFEST + (b" " if lie else b"")
            return httpx.Response(
                200,
                content=body,
                headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            )
        if ref in ("multi", INDEX_DIGEST):
            return httpx.Response(
                200,
                content=INDEX,
                headers={"Content-Type": "application/vnd.oci.image.index.v1+json"},
            )
        return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})

    return httpx.MockTransport(handle)


async def inspect(image: str, transport: httpx.MockTransport, **kw: object):  # type: ignore[no-untyped-def]
    client = RegistryClient(insecure=frozenset(), transport=transport)
    try:
        return await client.inspect(parse_image(image), **kw)  # type: ignore[arg-type]
    finally:
        await client.aclose()


async def test_a_tag_resolves_to_the_digest_of_its_manifest_with_its_size() -> None:
    got = await inspect("r.test/team/app:v1", registry())
    assert (got.digest, got.size_bytes, got.layers) == (DIGEST, 1123, 2)


async def test_a_multi_platform_tag_pins_the_index_and_sizes_this_platform() -> None:
    got = await inspect("r.test/team/app:multi", registry(), arch="amd64")
    assert (got.digest, got.size_bytes) == (INDEX_DIGEST, 1123)
    with pytest.raises(RegistryError) as err:
        await inspect("r.test/team/app:multi", registry(), arch="riscv64")
    assert err.value.problem == "not-found"


async def test_token_auth_uses_the_pull_secret_and_refuses_without_it() -> None:
    auth = auth_file(b"al:pw", "r.test")
    got = await inspect("r.test/team/app:v1", registry(token=True), auth=auth)
    assert got.digest == DIGEST
    with pytest.raises(RegistryError) as err:
        await inspect("r.test/team/app:v1", registry(token=True))
    assert err.value.problem == "unauthorized"


async def test_a_missing_tag_is_not_found_and_a_lying_registry_is_refused() -> None:
    with pytest.raises(RegistryError) as err:
        await inspect("r.test/team/app:v9", registry())
    assert err.value.problem == "not-found"
    with pytest.raises(RegistryError) as err:
        await inspect(f"r.test/team/app@{DIGEST}", registry(lie=True))
    assert err.value.problem == "invalid"
