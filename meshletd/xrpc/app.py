"""One XRPC app (`farm.meshlet.*`) behind two transports, with one access policy.

A method is registered with its NSID, kind (query = GET, procedure = POST), parameter
types and an `Access` level. The transport decides who the caller is:

- TCP (`tcp_handler`): a peer proves its DID with a service-auth JWT (see `auth.py`);
  without a token it is anonymous and may only call `Access.ANYONE` methods.
- Unix socket (`unix_handler`): the kernel says the caller's uid and groups (SO_PEERCRED);
  root and the admin group may mutate, the socket's group may read.

Errors are `MeshletError`s rendered as `{"error": name, "message": …}` with their status.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from meshletd.errors import (
    AuthRequired,
    Forbidden,
    InternalError,
    InvalidRequest,
    MeshletError,
    MethodNotImplemented,
)
from meshletd.xrpc.auth import ServiceAuthVerifier
from meshletd.xrpc.http import PeerCred, Request, Response

log = logging.getLogger("meshletd.xrpc")


class Access(enum.Enum):
    """Who may call a method (checked before the handler runs)."""

    ANYONE = "anyone"  # no token needed (liveness)
    AUTHENTICATED = "authenticated"  # any verified DID; the handler checks ownership
    MEMBER = "member"  # a verified DID in one of our clusters
    MESHLET_OWNER = "meshlet-owner"  # this machine's owner DID, or a local admin
    LOCAL = "local"  # control socket only (reads: group; procedures: admin)


@dataclass(frozen=True)
class Caller:
    """Who is calling, as established by the transport."""

    transport: Literal["tcp", "unix"]
    did: str | None = None
    cred: PeerCred | None = None
    is_admin: bool = False
    is_reader: bool = False

    @property
    def local(self) -> bool:
        return self.transport == "unix"

    def describe(self) -> str:
        if self.did:
            return self.did
        if self.cred is not None:
            return f"uid {self.cred.uid}"
        return "anonymous"


ParamType = Literal["string", "integer", "boolean"]


@dataclass(frozen=True)
class Param:
    type: ParamType = "string"
    required: bool = False
    default: Any = None
    minimum: int | None = None
    maximum: int | None = None
    array: bool = False


MethodHandler = Callable[[Caller, dict[str, Any], Any], Awaitable[Any]]


@dataclass
class Method:
    nsid: str
    kind: Literal["query", "procedure"]
    access: Access
    handler: MethodHandler
    params: dict[str, Param] = field(default_factory=dict)


def from_json(value: Any) -> Any:
    """atproto JSON → data model: `{"$bytes": base64}` becomes `bytes`."""
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("$bytes"), str):
            try:
                return base64.b64decode(value["$bytes"] + "=" * (-len(value["$bytes"]) % 4))
            except (binascii.Error, ValueError):
                raise InvalidRequest("invalid base64 in a $bytes value") from None
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def to_json(value: Any) -> Any:
    """Data model → atproto JSON: `bytes` becomes `{"$bytes": base64}`."""
    if isinstance(value, bytes | bytearray):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def _coerce(name: str, spec: Param, raw: list[str]) -> Any:
    def one(value: str) -> Any:
        if spec.type == "integer":
            try:
                n = int(value)
            except ValueError:
                raise InvalidRequest(f"parameter {name} must be an integer") from None
            if spec.minimum is not None and n < spec.minimum:
                raise InvalidRequest(f"parameter {name} must be >= {spec.minimum}")
            if spec.maximum is not None and n > spec.maximum:
                raise InvalidRequest(f"parameter {name} must be <= {spec.maximum}")
            return n
        if spec.type == "boolean":
            if value not in ("true", "false"):
                raise InvalidRequest(f"parameter {name} must be true or false")
            return value == "true"
        return value

    if spec.array:
        return [one(v) for v in raw]
    if len(raw) > 1:
        raise InvalidRequest(f"parameter {name} given more than once")
    return one(raw[0])


class XrpcApp:
    """The method table and the dispatch shared by both transports."""

    def __init__(
        self,
        *,
        verifier: ServiceAuthVerifier | None = None,
        is_member: Callable[[str], bool] = lambda did: False,
        owner_did: str | None = None,
        admin_gids: frozenset[int] = frozenset(),
        reader_gids: frozenset[int] = frozenset(),
        lexicons: Any = None,
    ) -> None:
        self.methods: dict[str, Method] = {}
        # meshletd.atproto.lexicon.Lexicons: procedure inputs are checked against them.
        self.lexicons = lexicons
        self.verifier = verifier
        self.is_member = is_member
        self.owner_did = owner_did
        self.admin_gids = admin_gids
        self.reader_gids = reader_gids

    def add(
        self,
        nsid: str,
        kind: Literal["query", "procedure"],
        access: Access,
        handler: MethodHandler,
        params: dict[str, Param] | None = None,
    ) -> None:
        self.methods[nsid] = Method(nsid, kind, access, handler, params or {})

    # -- transports --------------------------------------------------------------------

    async def tcp_handler(self, request: Request) -> Response:
        return await self._handle(request, "tcp")

    async def unix_handler(self, request: Request) -> Response:
        return await self._handle(request, "unix")

    def local_caller(self, cred: PeerCred) -> Caller:
        admin = cred.uid == 0 or bool(cred.groups & self.admin_gids)
        reader = admin or bool(cred.groups & self.reader_gids)
        return Caller("unix", cred=cred, is_admin=admin, is_reader=reader)

    async def _handle(self, request: Request, transport: Literal["tcp", "unix"]) -> Response:
        nsid = ""
        try:
            if not request.path.startswith("/xrpc/"):
                raise MethodNotImplemented(f"no such path {request.path}")
            nsid = request.path[len("/xrpc/") :]
            method = self.methods.get(nsid)
            if method is None:
                raise MethodNotImplemented(f"method not implemented: {nsid}")
            want = "GET" if method.kind == "query" else "POST"
            if request.method != want and not (want == "GET" and request.method == "HEAD"):
                raise InvalidRequest(f"{nsid} is a {method.kind}: use HTTP {want}")
            caller = await self._caller(request, transport, method)
            self._authorize(caller, method)
            params = self._params(request, method)
            body = self._body(request, method)
            if self.lexicons is not None and nsid in self.lexicons.docs:
                if params:
                    self._check_params(nsid, params)
                if body is not None:
                    self._check_input(nsid, body)
            result = await method.handler(caller, params, body)
            return Response.json(200, {} if result is None else to_json(result))
        except MeshletError as e:
            if e.status >= 500 and not isinstance(e, MethodNotImplemented):
                log.warning("xrpc %s from %s failed: %s", nsid or request.path, request.remote, e)
            return Response.json(e.status, e.to_xrpc())
        except Exception:
            log.exception("xrpc %s from %s crashed", nsid or request.path, request.remote)
            err = InternalError("internal error (see the meshletd journal)")
            return Response.json(err.status, err.to_xrpc())

    async def _caller(
        self, request: Request, transport: Literal["tcp", "unix"], method: Method
    ) -> Caller:
        if transport == "unix":
            if request.peercred is None:
                raise AuthRequired("no peer credentials on the control socket")
            return self.local_caller(request.peercred)
        auth = request.header("authorization")
        if not auth:
            if method.access is Access.ANYONE:
                return Caller("tcp")
            raise AuthRequired(f"{method.nsid} needs a service-auth token")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthRequired("Authorization must be 'Bearer <service JWT>'")
        if method.access is Access.ANYONE:
            return Caller("tcp")  # a token is not needed; do not spend its jti
        if self.verifier is None:
            raise AuthRequired("this meshlet cannot verify service auth yet")
        did = await self.verifier.verify(token.strip(), method.nsid)
        return Caller("tcp", did=did)

    def _authorize(self, caller: Caller, method: Method) -> None:
        access = method.access
        if caller.local:
            if method.kind == "procedure" and not caller.is_admin:
                raise Forbidden(
                    f"{method.nsid} changes state: it needs root or the meshlet admin group"
                )
            if not caller.is_reader:
                raise Forbidden("the control socket needs membership of the meshlet group")
            return
        if access is Access.ANYONE or access is Access.AUTHENTICATED:
            return
        if access is Access.LOCAL:
            raise Forbidden(f"{method.nsid} is only available on the local control socket")
        if access is Access.MESHLET_OWNER:
            if caller.did != self.owner_did:
                raise Forbidden(f"{method.nsid} is reserved to this meshlet's owner")
            return
        if access is Access.MEMBER:
            if caller.did is None or not (
                caller.did == self.owner_did or self.is_member(caller.did)
            ):
                raise Forbidden(f"{caller.describe()} is not a member of this meshlet's clusters")
            return

    def _params(self, request: Request, method: Method) -> dict[str, Any]:
        grouped: dict[str, list[str]] = {}
        for k, v in request.query:
            grouped.setdefault(k, []).append(v)
        out: dict[str, Any] = {}
        for name, spec in method.params.items():
            if name in grouped:
                out[name] = _coerce(name, spec, grouped.pop(name))
            elif spec.required:
                raise InvalidRequest(f"parameter {name} is required")
            elif spec.default is not None:
                out[name] = spec.default
        if grouped:
            raise InvalidRequest(f"unknown parameter(s): {', '.join(sorted(grouped))}")
        return out

    def _check_params(self, nsid: str, params: dict[str, Any]) -> None:
        from meshletd.errors import InvalidRecord

        try:
            self.lexicons.validate_params(nsid, params)
        except InvalidRecord as e:
            raise InvalidRequest(e.message) from None

    def _check_input(self, nsid: str, body: dict[str, Any]) -> None:
        from meshletd.errors import InvalidRecord

        try:
            self.lexicons.validate_input(nsid, body)
        except InvalidRecord as e:
            raise InvalidRequest(e.message) from None

    @staticmethod
    def _body(request: Request, method: Method) -> Any:
        if method.kind == "query":
            return None
        if not request.body:
            return {}
        ctype = (request.header("content-type") or "").split(";")[0].strip()
        if ctype and ctype != "application/json":
            raise InvalidRequest(f"expected application/json, got {ctype}")
        try:
            body = json.loads(request.body)
        except ValueError:
            raise InvalidRequest("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object")
        return from_json(body)
