"""Stable error names shared by XRPC responses and meshletctl exit codes.

Every error the product reports to a user is a `MeshletError` subclass with a stable
`name` (sent as the XRPC `error` field) and an `exit_code` (used by meshletctl).
"""

from __future__ import annotations


class MeshletError(Exception):
    """Base of every error with a stable name."""

    name = "InternalError"
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"


class InvalidRequest(MeshletError):
    name = "InvalidRequest"
    exit_code = 2


class InvalidRecord(MeshletError):
    name = "InvalidRecord"
    exit_code = 3


class NotFound(MeshletError):
    name = "NotFound"
    exit_code = 4


class AuthRequired(MeshletError):
    name = "AuthRequired"
    exit_code = 5


class Forbidden(MeshletError):
    name = "Forbidden"
    exit_code = 6


class DaemonUnavailable(MeshletError):
    name = "DaemonUnavailable"
    exit_code = 7


class RuntimeFailure(MeshletError):
    name = "RuntimeFailure"
    exit_code = 8


class ConfigError(MeshletError):
    name = "ConfigError"
    exit_code = 9
