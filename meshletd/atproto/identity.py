"""DID resolution: did:plc through a configurable PLC directory (the SDK's resolver) and
did:web through our own small resolver (the SDK's always uses https and does not decode
`%3A`, so it cannot resolve `did:web:localhost%3A8080`).

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
from urllib.parse import unquote

import httpx
from atproto_core.did_doc import DidDocument, is_valid_did_doc
from atproto_identity.did.resolvers.plc_resolver import AsyncDidPlcResolver

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


def identity_from_doc(did: str, doc: dict[str, Any]) -> Identity:
    """Parse a DID document (pure) and check it is the document of `did`."""
    if not is_valid_did_doc(doc):
        raise IdentityError(f"{did}: malformed DID document")
    parsed = DidDocument.from_dict(doc)
    if parsed.get_did() != did:
        raise IdentityError(f"{did}: DID document is for {parsed.get_did()}")
    endpoint = parsed.get_service_endpoint(MESHLET_SERVICE_ID, MESHLET_SERVICE_TYPE)
    try:
        key = parsed.get_did_key()
    except Exception as e:  # unsupported key type
        raise IdentityError(f"{did}: unusable signing key ({e})") from e
    return Identity(
        did=did,
        pds=(parsed.get_pds_endpoint() or "").rstrip("/") or None,
        signing_key=key,
        handle=parsed.get_handle(),
        meshlet_endpoint=endpoint,
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
        self._plc = AsyncDidPlcResolver(plc_url=self.plc_url, timeout=timeout_s)
        self._cache: dict[str, tuple[float, Identity]] = {}

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._plc._client.aclose()

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
                doc = await self._plc.resolve_without_validation(did)
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
