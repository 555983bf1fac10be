"""DID resolution: did:plc through a configurable PLC directory and did:web (the SDK's
resolver always uses https and does not decode `%3A`, so it cannot resolve
`did:web:localhost%3A8080`). Documents are read the way the SDK's `DidDocument` reads them
(same shape checks, same `#atproto` key and `#atproto_pds` service rules), without its
pydantic models and `cryptography`, which the idle daemon need not carry.

`IdentityResolver.resolve(did)` returns an `Identity` (PDS endpoint, signing key as a
`did:key`, handle, the meshlet XRPC endpoint if the document names one), cached with an
expiry. `resolve(did, fresh=True)` bypasses the cache (after a signature failure, the key
may have rotated).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import httpx

from meshletd.atproto.keys import BadKey, check_point, did_key_from_method
from meshletd.errors import NotFound

log = logging.getLogger(__name__)

MESHLET_SERVICE_ID = "#meshlet"
MESHLET_SERVICE_TYPE = "MeshletXrpc"


class IdentityError(NotFound):
    name = "IdentityError"


@dataclass(frozen=True)
class Identity:
    did: str
    pds: str | None
    signing_key: str | None  # did:key:…
    handle: str | None = None
    meshlet_endpoint: str | None = None


class IdentityResolverProtocol(Protocol):
    async def resolve(self, did: str, *, fresh: bool = False) -> Identity: ...


def _malformed(doc: Any) -> str | None:
    """Why `doc` is not a DID document (the SDK's DidDocument shape), or None."""
    if not isinstance(doc, dict):
        return "not an object"
    if not isinstance(doc.get("id"), str):
        return "id must be a string"
    aka = doc.get("alsoKnownAs")
    if aka is not None and not (isinstance(aka, list) and all(isinstance(a, str) for a in aka)):
        return "alsoKnownAs must be a list of strings"
    shapes = {
        "verificationMethod": {"id": str, "type": str, "controller": str},
        "service": {"id": str, "type": str},
    }
    for name, fields in shapes.items():
        items = doc.get(name)
        if items is None:
            continue
        if not isinstance(items, list):
            return f"{name} must be a list"
        for item in items:
            if not isinstance(item, dict):
                return f"{name} entries must be objects"
            for field, kind in fields.items():
                if not isinstance(item.get(field), kind):
                    return f"{name}[].{field} must be a string"
            if name == "service" and "serviceEndpoint" not in item:
                return "service[].serviceEndpoint is required"
            pkm = item.get("publicKeyMultibase")
            if name == "verificationMethod" and pkm is not None and not isinstance(pkm, str):
                return "verificationMethod[].publicKeyMultibase must be a string"
    return None


def _http_url(url: Any) -> str | None:
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError:
        return None
    return url if parts.scheme in ("http", "https") and host is not None else None


def _service(doc: dict[str, Any], did: str, id_: str, type_: str) -> str | None:
    for s in doc.get("service") or ():
        if s["id"] in (id_, did + id_) and s["type"] == type_:
            return _http_url(s["serviceEndpoint"])
    return None


def _signing_key(doc: dict[str, Any], did: str) -> str | None:
    for m in doc.get("verificationMethod") or ():
        if m["id"] in ("#atproto", did + "#atproto") and m.get("publicKeyMultibase"):
            key = did_key_from_method(m["type"], m["publicKeyMultibase"])
            if key is not None:
                check_point(key)
            return key
    return None


def identity_from_doc(did: str, doc: dict[str, Any]) -> Identity:
    """Parse a DID document (pure) and check it is the document of `did`."""
    why = _malformed(doc)
    if why is not None:
        raise IdentityError(f"{did}: malformed DID document ({why})")
    if doc["id"] != did:
        raise IdentityError(f"{did}: DID document is for {doc['id']}")
    try:
        key = _signing_key(doc, did)
    except BadKey as e:  # unsupported key type, or not a point of its curve
        raise IdentityError(f"{did}: unusable signing key ({e})") from e
    handle = next(
        (a[len("at://") :] for a in doc.get("alsoKnownAs") or () if a.startswith("at://")), None
    )
    return Identity(
        did=did,
        pds=(_service(doc, did, "#atproto_pds", "AtprotoPersonalDataServer") or "").rstrip("/")
        or None,
        signing_key=key,
        handle=handle,
        meshlet_endpoint=_service(doc, did, MESHLET_SERVICE_ID, MESHLET_SERVICE_TYPE),
    )


def did_web_url(did: str) -> str:
    """The URL of a did:web document. `localhost`/`127.0.0.1` hosts (tests) use http."""
    if not did.startswith("did:web:"):
        raise IdentityError(f"{did}: not a did:web")
    parts = [unquote(p) for p in did[len("did:web:") :].split(":")]
    host = parts[0]
    if not host or "/" in host:
        raise IdentityError(f"{did}: bad did:web host")
    hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    scheme = "http" if hostname in ("localhost", "127.0.0.1", "[::1]") else "https"
    path = "/".join(parts[1:]) + "/did.json" if len(parts) > 1 else ".well-known/did.json"
    return f"{scheme}://{host}/{path}"


class IdentityResolver:
    """Resolves DIDs over HTTP, caching each answer for `ttl_s` seconds."""

    def __init__(
        self,
        plc_url: str = "https://plc.directory",
        *,
        ttl_s: float = 600.0,
        timeout_s: float = 10.0,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plc_url = plc_url.rstrip("/")
        self.ttl_s = ttl_s
        self._clock = clock
        self._http = http or httpx.AsyncClient(timeout=timeout_s)
        self._cache: dict[str, tuple[float, Identity]] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    async def resolve(self, did: str, *, fresh: bool = False) -> Identity:
        now = self._clock()
        hit = self._cache.get(did)
        if hit is not None and not fresh and hit[0] > now:
            return hit[1]
        doc = await self.fetch_doc(did)
        ident = identity_from_doc(did, doc)
        self._cache[did] = (now + self.ttl_s, ident)
        return ident

    def forget(self, did: str) -> None:
        self._cache.pop(did, None)

    async def fetch_doc(self, did: str) -> dict[str, Any]:
        try:
            if did.startswith("did:plc:"):
                r = await self._http.get(f"{self.plc_url}/{did}")
                if r.status_code != 404:
                    r.raise_for_status()
                doc = r.json() if r.status_code == 200 else None
            elif did.startswith("did:web:"):
                r = await self._http.get(did_web_url(did))
                doc = r.json() if r.status_code == 200 else None
            else:
                raise IdentityError(f"{did}: unsupported DID method")
        except IdentityError:
            raise
        except Exception as e:
            raise IdentityError(f"{did}: resolution failed ({type(e).__name__}: {e})") from e
        if not isinstance(doc, dict):
            raise IdentityError(f"{did}: no DID document")
        return doc


class StaticIdentityResolver:
    """In-memory resolver for tests and the simulator."""

    def __init__(self, identities: dict[str, Identity] | None = None) -> None:
        self.identities = dict(identities or {})
        self.calls: list[str] = []

    def add(self, ident: Identity) -> None:
        self.identities[ident.did] = ident

    async def resolve(self, did: str, *, fresh: bool = False) -> Identity:
        self.calls.append(did)
        try:
            return self.identities[did]
        except KeyError:
            raise IdentityError(f"{did}: unknown DID") from None
