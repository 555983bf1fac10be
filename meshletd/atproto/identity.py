"""DID resolution: did:plc through a configurable PLC directory and did:web (the SDK's
resolver always uses https and does not decode `%3A`, so it cannot resolve
`did:web:localhost%3A8080`). Documents are read the way the SDK's `DidDocument` reads them
(same shape checks, same `#atproto` key and `#atproto_pds` service rules), without its
pydantic models and `cryptography`, which the idle daemon need not carry.

`IdentityResolver.resolve(did)` returns an `Identity` (PDS endpoint, signing key as a
`did:key`, handle, the meshlet XRPC endpoint if the document names one), cached with an
expiry. `resolve(did, fresh=True)` bypasses the cache (after a signature failure, the key
may have rotated).

A DID is chosen by whoever presents it, so resolution must not become a way to make the
daemon fetch what it should not (docs/protocol.md section 19.5): a did:web whose host is a
loopback, private, link-local or otherwise non-public address (by literal or by what its
name resolves to) is refused unless the host is on the resolver's explicit allow-list; the
configured PLC directory is always allowed. The cache holds at most `max_entries`
identities (expired ones out first, then the least recently used).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import httpx
import trio

from meshletd.atproto.keys import BadKey, check_point, did_key_from_method
from meshletd.errors import NotFound

log = logging.getLogger(__name__)

MAX_DID_DOC_BYTES = 64 * 1024
MESHLET_SERVICE_ID = "#meshlet"
MESHLET_SERVICE_TYPE = "MeshletXrpc"


class IdentityError(NotFound):
    name = "IdentityError"


class IdentityUnreachable(IdentityError):
    """The DID could not be resolved now (the PLC or the did:web host unreachable): unlike
    the other identity errors, this says nothing about whether the DID exists."""


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


def _non_public(addr: str) -> bool:
    """Whether an IP address is one a DID document must not make us fetch."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def _host_port(url: str) -> tuple[str, int | None]:
    parts = urlsplit(url)
    return (parts.hostname or "").lower(), parts.port


MAX_CACHED_IDENTITIES = 10_000


class IdentityResolver:
    """Resolves DIDs over HTTP, caching each answer for `ttl_s` seconds.

    `allow_hosts`: hosts (`name` or `name:port`) a did:web may name although they are not
    public addresses (a test network's own servers); the PLC directory's host is always
    allowed. `lookup` resolves a host name to addresses (tests replace it)."""

    def __init__(
        self,
        plc_url: str = "https://plc.directory",
        *,
        ttl_s: float = 600.0,
        timeout_s: float = 10.0,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        allow_hosts: Iterable[str] = (),
        max_entries: int = MAX_CACHED_IDENTITIES,
        lookup: Callable[[str, int], Awaitable[list[str]]] | None = None,
    ) -> None:
        self.plc_url = plc_url.rstrip("/")
        self.ttl_s = ttl_s
        self._clock = clock
        self._http = http or httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
        self._cache: OrderedDict[str, tuple[float, Identity]] = OrderedDict()
        self.max_entries = max_entries
        self.allow_hosts = frozenset(h.lower() for h in allow_hosts)
        self._lookup = lookup or _getaddrinfo

    async def aclose(self) -> None:
        await self._http.aclose()

    async def resolve(self, did: str, *, fresh: bool = False) -> Identity:
        now = self._clock()
        hit = self._cache.get(did)
        if hit is not None and not fresh and hit[0] > now:
            self._cache.move_to_end(did)
            return hit[1]
        doc = await self.fetch_doc(did)
        ident = identity_from_doc(did, doc)
        self._remember(did, (now + self.ttl_s, ident), now)
        return ident

    def _remember(self, did: str, entry: tuple[float, Identity], now: float) -> None:
        self._cache[did] = entry
        self._cache.move_to_end(did)
        if len(self._cache) > self.max_entries:
            for stale in [d for d, (exp, _) in self._cache.items() if exp <= now]:
                del self._cache[stale]
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)

    async def check_fetchable(self, url: str) -> None:
        """Raise IdentityError unless `url` may be fetched for a DID document: its host is
        allowed, or it is (and resolves only to) public addresses."""
        host, port = _host_port(url)
        if not host:
            raise IdentityError("no host to fetch")
        scheme_port = port or (443 if url.startswith("https:") else 80)
        if host in self.allow_hosts or f"{host}:{scheme_port}" in self.allow_hosts:
            return
        if host == "localhost" or host.endswith(".localhost"):
            raise IdentityError(f"{host} is not a public host")
        try:
            ipaddress.ip_address(host.strip("[]"))
            addrs = [host.strip("[]")]
        except ValueError:
            try:
                addrs = await self._lookup(host, scheme_port)
            except OSError:
                raise IdentityError(f"{host} does not resolve") from None
        if not addrs or any(_non_public(a) for a in addrs):
            raise IdentityError(f"{host} is not a public host")

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
                url = did_web_url(did)
                await self.check_fetchable(url)
                r = await self._http.get(url)
                if len(r.content) > MAX_DID_DOC_BYTES:
                    raise IdentityError(f"{did}: DID document over {MAX_DID_DOC_BYTES} bytes")
                doc = r.json() if r.status_code == 200 else None
            else:
                raise IdentityError(f"{did}: unsupported DID method")
        except IdentityError:
            raise
        except Exception as e:
            raise IdentityUnreachable(f"{did}: resolution failed ({type(e).__name__}: {e})") from e
        if not isinstance(doc, dict):
            raise IdentityError(f"{did}: no DID document")
        return doc


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


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
