"""A registry's manifest endpoint, read the way podman reads it: which digest a tag means
now, and how many bytes pulling it costs (docs/protocol.md, section 24).

meshletd asks a registry two things itself, before podman pulls anything: the owner's
meshlet resolves a tag to its digest when the workload is published, and the meshlet that
won a slot checks the image's size against its bound and gets a precise "not found" or
"unauthorized" instead of a pull that fails late. Plain HTTP is used only for registries
the machine's registries.conf marks `insecure = true`, as podman does; credentials come from
an auth file's content (containers-auth.json), never from a command line.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import platform
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from meshletd.atproto.validity import IMAGE_DIGEST_RE as DIGEST_RE
from meshletd.runtime.reference import ImageRef

REGISTRIES_CONF = ("/etc/containers/registries.conf", "/etc/containers/registries.conf.d/*.conf")
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[:2]
MAX_MANIFEST_BYTES = 4 << 20  # a manifest or index bigger than this is not one we read
MAX_LAYERS = 1000
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}

Problem = Literal["not-found", "unauthorized", "unreachable", "invalid"]


class RegistryError(Exception):
    """The registry said no, or could not be asked. `problem` is the stable reason."""

    def __init__(self, problem: Problem, message: str) -> None:
        super().__init__(message)
        self.problem = problem
        self.message = message


@dataclass(frozen=True, slots=True)
class RemoteImage:
    """What a reference means in its registry right now."""

    digest: str  # of the top-level manifest (an index for a multi-platform image)
    size_bytes: int  # config + layers of this machine's platform, compressed
    layers: int


def machine_arch() -> str:
    """This machine's architecture in OCI's words (amd64, arm64, ...)."""
    m = platform.machine()
    return _ARCH.get(m, m)


def insecure_registries(paths: Iterable[str] = REGISTRIES_CONF) -> frozenset[str]:
    """Registries podman may reach over plain HTTP: `[[registry]] insecure = true` (v2
    format) or `[registries.insecure] registries = [...]` (v1) in registries.conf and its
    drop-ins. An unreadable file counts as saying nothing."""
    out: set[str] = set()
    for pattern in paths:
        for path in sorted(glob.glob(pattern)):
            try:
                with open(path, "rb") as f:
                    conf = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError):
                continue
            for entry in conf.get("registry", []) or []:
                if isinstance(entry, dict) and entry.get("insecure") is True:
                    loc = entry.get("location") or entry.get("prefix")
                    if isinstance(loc, str):
                        out.add(loc.rstrip("/"))
            v1 = (conf.get("registries") or {}).get("insecure") or {}
            for loc in v1.get("registries", []) if isinstance(v1, dict) else []:
                if isinstance(loc, str):
                    out.add(loc.rstrip("/"))
    return frozenset(out)


def auth_file(secret: bytes, registry: str) -> bytes:
    """The content of a containers-auth.json for `registry` from an owner's pull secret:
    either such a file already (`{"auths": {...}}`, as `podman login --authfile` writes) or
    `user:password`. ValueError when it is neither."""
    text = secret.decode("utf-8", errors="strict").strip()
    if text.startswith("{"):
        doc = json.loads(text)
        if not isinstance(doc, dict) or not isinstance(doc.get("auths"), dict):
            raise ValueError('a JSON pull secret must be an auth file: {"auths": {...}}')
        return json.dumps({"auths": doc["auths"]}).encode()
    user, sep, password = text.partition(":")
    if not sep or not user or "\n" in text:
        raise ValueError("a pull secret is an auth file (JSON) or user:password")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return json.dumps({"auths": {registry: {"auth": token}}}).encode()


def credentials(auth_json: bytes | None, registry: str) -> tuple[str, str] | None:
    """(user, password) for `registry` from an auth file's content, if it has them."""
    if not auth_json:
        return None
    try:
        auths = json.loads(auth_json).get("auths", {})
        entry = auths.get(registry) or auths.get(f"https://{registry}") or {}
        user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return user, password


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class RegistryClient:
    """Reads manifests from registries (one httpx client; close it with `aclose`)."""

    def __init__(
        self,
        *,
        insecure: frozenset[str] | None = None,
        timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._insecure = insecure
        self._http = httpx.AsyncClient(
            timeout=timeout_s, follow_redirects=True, transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def _base(self, ref: ImageRef) -> str:
        insecure = self._insecure if self._insecure is not None else insecure_registries()
        host = "registry-1.docker.io" if ref.registry == "docker.io" else ref.registry
        scheme = "http" if ref.registry in insecure else "https"
        return f"{scheme}://{host}/v2/{ref.repository}"

    async def inspect(
        self, ref: ImageRef, *, auth: bytes | None = None, arch: str | None = None
    ) -> RemoteImage:
        """The digest `ref` means now and its size for this machine's platform."""
        if ref.local_only:
            raise RegistryError("not-found", f"{ref} is a local image (localhost/): no registry")
        creds = credentials(auth, ref.registry)
        token: list[str] = []
        body, digest, media = await self._manifest(ref, ref.reference, creds, token)
        doc = _json(body, ref)
        if media in INDEX_TYPES or "manifests" in doc:
            want = arch or machine_arch()
            chosen = _platform_manifest(doc, want)
            if chosen is None:
                raise RegistryError("not-found", f"{ref} has no linux/{want} image")
            body2, _, _ = await self._manifest(ref, chosen, creds, token)
            doc = _json(body2, ref)
        layers = doc.get("layers")
        config = doc.get("config")
        if not isinstance(layers, list) or not isinstance(config, dict):
            raise RegistryError("invalid", f"{ref}: the manifest lists no config and layers")
        if len(layers) > MAX_LAYERS:
            raise RegistryError("invalid", f"{ref}: {len(layers)} layers, more than {MAX_LAYERS}")
        size = _size(config)
        for layer in layers:
            size += _size(layer)
        return RemoteImage(digest, size, len(layers))

    async def _manifest(
        self,
        ref: ImageRef,
        reference: str,
        creds: tuple[str, str] | None,
        token: list[str],
    ) -> tuple[bytes, str, str]:
        url = f"{self._base(ref)}/manifests/{reference}"
        headers = {"Accept": ", ".join(MANIFEST_TYPES)}
        resp = await self._get(url, headers, creds, token, ref)
        body = resp.body
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        said = resp.headers.get("Docker-Content-Digest", digest)
        if DIGEST_RE.match(reference) and digest != reference:
            raise RegistryError("invalid", f"{ref}: the registry sent a manifest of another digest")
        if said != digest:
            raise RegistryError("invalid", f"{ref}: Docker-Content-Digest {said} is not {digest}")
        media = resp.headers.get("Content-Type", "").split(";")[0].strip()
        return body, digest, media

    async def _get(
        self,
        url: str,
        headers: Mapping[str, str],
        creds: tuple[str, str] | None,
        token: list[str],
        ref: ImageRef,
    ) -> _Answer:
        for attempt in range(2):
            h = dict(headers)
            if token:
                h["Authorization"] = token[0]
            try:
                resp = await self._send(url, h)
            except httpx.HTTPError as err:
                raise RegistryError(
                    "unreachable", f"registry {ref.registry} unreachable: {err!r}"
                ) from err
            if resp.status_code == 401 and attempt == 0:
                token[:] = [await self._authorize(resp, creds, ref)]
                continue
            if resp.status_code in (401, 403):
                who = "with the pull secret" if creds else "without credentials"
                raise RegistryError(
                    "unauthorized", f"{ref}: the registry refused access {who} ({resp.status_code})"
                )
            if resp.status_code == 404:
                raise RegistryError("not-found", f"{ref}: not found in {ref.registry}")
            if resp.status_code != 200:
                raise RegistryError(
                    "unreachable", f"{ref}: registry {ref.registry} answered {resp.status_code}"
                )
            return resp
        raise AssertionError("unreachable")

    async def _send(self, url: str, headers: Mapping[str, str]) -> _Answer:
        async with self._http.stream("GET", url, headers=headers) as resp:
            chunks = []
            total = 0
            async for chunk in resp.aiter_bytes():
                total += len(chunk)
                if total > MAX_MANIFEST_BYTES:
                    raise httpx.DecodingError(f"manifest over {MAX_MANIFEST_BYTES} bytes")
                chunks.append(chunk)
            return _Answer(resp.status_code, resp.headers, b"".join(chunks))

    async def _authorize(self, resp: _Answer, creds: tuple[str, str] | None, ref: ImageRef) -> str:
        scheme, params = _challenge(resp.headers.get("WWW-Authenticate", ""))
        basic = None
        if creds is not None:
            basic = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        if scheme == "basic":
            if basic is None:
                raise RegistryError("unauthorized", f"{ref}: the registry wants credentials")
            return basic
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError("unauthorized", f"{ref}: unknown auth challenge {scheme!r}")
        query = {"scope": params.get("scope") or f"repository:{ref.repository}:pull"}
        if "service" in params:
            query["service"] = params["service"]
        headers = {"Authorization": basic} if basic else {}
        try:
            # Read within the same bound as a manifest: the realm is the registry's word.
            got = await self._send(str(httpx.URL(params["realm"], params=query)), headers)
        except (httpx.HTTPError, httpx.InvalidURL) as err:
            raise RegistryError("unreachable", f"token service unreachable: {err!r}") from err
        if got.status_code != 200:
            raise RegistryError("unauthorized", f"{ref}: token refused ({got.status_code})")
        try:
            data = json.loads(got.body)
            return "Bearer " + str(data.get("token") or data["access_token"])
        except (ValueError, KeyError, AttributeError) as err:
            raise RegistryError("unauthorized", f"{ref}: no token in the answer") from err


@dataclass(frozen=True, slots=True)
class _Answer:
    status_code: int
    headers: httpx.Headers
    body: bytes


def _json(body: bytes, ref: ImageRef) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError as err:
        raise RegistryError("invalid", f"{ref}: the manifest is not JSON") from err
    if not isinstance(doc, dict):
        raise RegistryError("invalid", f"{ref}: the manifest is not an object")
    return doc


def _size(descriptor: object) -> int:
    size = descriptor.get("size") if isinstance(descriptor, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError("invalid", "a manifest descriptor has no valid size")
    return size


def _platform_manifest(index: dict[str, Any], arch: str) -> str | None:
    for m in index.get("manifests", []) or []:
        if not isinstance(m, dict):
            continue
        plat = m.get("platform") or {}
        digest = m.get("digest")
        if (
            isinstance(plat, dict)
            and plat.get("os") == "linux"
            and plat.get("architecture") == arch
            and isinstance(digest, str)
            and DIGEST_RE.match(digest)
        ):
            return digest
    return None
