"""Stable error names shared by XRPC responses and meshletctl exit codes.

Every error the product reports to a user is a `MeshletError` subclass with a stable
`name` (sent as the XRPC `error` field), an HTTP `status` (used by the XRPC servers) and an
`exit_code` (used by meshletctl). Names and exit codes never change once released; add new
ones instead. The service-auth names follow the reference atproto implementation
(`BadJwt…`, `JwtExpired`) so peers written against it understand us.

Exit codes: 0 ok, 1 internal, 2 bad request / usage, 3 invalid record, 4 not found,
5 authentication failed, 6 permission denied, 7 daemon not running, 8 runtime failure,
9 configuration, 10 method not implemented, 11 conflict (e.g. already draining),
12 upstream (PDS or peer) failure, 13 rate limited / write budget exhausted,
14 timed out waiting (e.g. `meshletctl drain --wait --deadline`).
"""

from __future__ import annotations

from typing import ClassVar


class MeshletError(Exception):
    """Base of every error with a stable name."""

    name: ClassVar[str] = "InternalError"
    exit_code: ClassVar[int] = 1
    status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"

    def to_xrpc(self) -> dict[str, str]:
        """The XRPC error body: `{"error": name, "message": text}`."""
        return {"error": self.name, "message": self.message}


class InternalError(MeshletError):
    name = "InternalError"


class InvalidRequest(MeshletError):
    name = "InvalidRequest"
    exit_code = 2
    status = 400


class InvalidRecord(MeshletError):
    """A record (or method input) the lexicons or the protocol's validity rules refuse.
    `field` is the path of the offending field (`resources.milliCpu`, `env[2].name`; `""`
    for the record as a whole) and `reason` what is wrong with it, when known."""

    name = "InvalidRecord"
    exit_code = 3
    status = 400

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.field = field
        self.reason = reason if reason is not None else message


class NotFound(MeshletError):
    name = "NotFound"
    exit_code = 4
    status = 404


class AuthRequired(MeshletError):
    """No or unusable credentials; every service-auth failure is one of these."""

    name = "AuthRequired"
    exit_code = 5
    status = 401


class BadJwt(AuthRequired):
    """The token is malformed, lacks a required claim, or its issuer cannot be resolved."""

    name = "BadJwt"


class JwtExpired(AuthRequired):
    name = "JwtExpired"


class BadJwtAudience(AuthRequired):
    name = "BadJwtAudience"


class BadJwtLexiconMethod(AuthRequired):
    name = "BadJwtLexiconMethod"


class BadJwtSignature(AuthRequired):
    name = "BadJwtSignature"


class JwtReplayed(AuthRequired):
    """The token's `jti` was already used: service-auth tokens are single use here."""

    name = "JwtReplayed"


class Forbidden(MeshletError):
    """Authenticated, but not allowed to do this (not the owner, not in the admin group)."""

    name = "Forbidden"
    exit_code = 6
    status = 403


class DaemonUnavailable(MeshletError):
    name = "DaemonUnavailable"
    exit_code = 7
    status = 503


class RuntimeFailure(MeshletError):
    name = "RuntimeFailure"
    exit_code = 8
    status = 500


class ConfigError(MeshletError):
    name = "ConfigError"
    exit_code = 9
    status = 500


class MethodNotImplemented(MeshletError):
    name = "MethodNotImplemented"
    exit_code = 10
    status = 501


class Conflict(MeshletError):
    name = "Conflict"
    exit_code = 11
    status = 409


class UpstreamFailure(MeshletError):
    """A PDS, PLC or peer meshlet failed or could not be reached."""

    name = "UpstreamFailure"
    exit_code = 12
    status = 502


class RateLimited(MeshletError):
    """The PDS write budget is exhausted for now."""

    name = "RateLimited"
    exit_code = 13
    status = 429


class TimedOut(MeshletError):
    name = "TimedOut"
    exit_code = 14
    status = 504


def _all_subclasses(cls: type[MeshletError]) -> list[type[MeshletError]]:
    out: list[type[MeshletError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def by_name(name: str) -> type[MeshletError]:
    """The error class for a stable name (unknown names map to `InternalError`)."""
    for cls in _all_subclasses(MeshletError):
        if cls.name == name:
            return cls
    return InternalError


def from_xrpc(body: object, status: int = 500) -> MeshletError:
    """Rebuild an error from an XRPC error body (as returned by `to_xrpc`)."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        cls = by_name(body["error"])
        message = body.get("message")
        return cls(message if isinstance(message, str) else body["error"])
    return InternalError(f"unexpected error response (HTTP {status})")
